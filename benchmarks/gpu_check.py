#!/usr/bin/env python
"""The first hour on a GPU, prepared: one command, one JSON line (issue 18).

On a machine with one or more GPUs, after the README's test install (`pip install -e ".[test]"`), on a fresh
clone, in under 8 minutes; the model is the bundle's real architecture with random weights, built on the fly
by benchmarks/fake_model.py (nothing is downloaded):

    python benchmarks/gpu_check.py                 # every visible GPU; exit code 0 when every check passed
    python benchmarks/gpu_check.py --tiny          # the same checks with toy models on the CPU (CI runs it)

Checks, each a key of the JSON line (with "ok" and its figures, or "error"):

  cuda_tests       `pytest -m cuda` on the CUDA-only tests: passed / failed / skipped (all skipped on the CPU)
  throughput       images/s at 20 and 50 steps, the fraction of the device's dense bf16 peak, the ratio to the
                   reference loop (docs/algorithm.md, float32, batch 1), and --channels-last's ratio at 20 steps
  bf16_vs_fp32     gray-level difference (mean, max) between bfloat16 autocast and float32 on the same seeds,
                   and whether float32 ran with TF32 off
  fp16             float16 autocast: finite, not blank, difference to float32
  syncs            host reads of device data (each a host-device synchronisation on a GPU) per denoising step,
                   which must be 0 (they must not grow with the steps), and per batch
  prompt_encoding  one text-encoder call per batch, and its difference to one prompt per call
  oom_backoff      with the allocator capped (torch.cuda.set_per_process_memory_fraction) so that a known number
                   of images fits, the batch settles at that number (on the CPU: an injected out-of-memory error)
  multi_device     a two-worker and a two-rank run (two GPUs; on the CPU two processes): each process on its own
                   device, the parent of local workers without a CUDA context, images equal to one device's
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is local; never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import fake_model  # noqa: E402
import numpy as np  # noqa: E402
import throughput  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

CUDA_TESTS = ["tests/model/test_speed_options.py", "tests/model/test_cuda.py"]
CHILD_FLAG = "--child"


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- shared

class Setup:
    """Model files, a manifest, the plan, and one text encoder per device, shared by the checks."""

    def __init__(self, work: Path, tiny: bool, device: torch.device):
        self.work, self.tiny, self.device = work, tiny, device
        self.bundle_dir, self.text_dir = throughput.prepare(work, tiny)
        self.prompts = fake_model.report_prompts(64)
        self.manifest = fake_model.write_manifest(work / "manifest.csv", self.prompts)
        self._text = None

    def config(self, out: Path, **kw):
        from cxrgen.config import RunConfig

        options = dict(manifest=str(self.manifest), model=str(self.bundle_dir), text_encoder=str(self.text_dir),
                       cache_dir=str(self.work / "cache"), quiet=True, image_format="png")
        return RunConfig(out=str(out), **{**options, **kw})

    def items(self, count: int):
        from cxrgen.manifests.workitems import load_plan

        return load_plan(self.config(self.work / "unused"))[1][:count]

    def text(self):
        from cxrgen.model.text_encoder import load_text_encoder

        if self._text is None:
            self._text = load_text_encoder(str(self.text_dir), self.device)
        return self._text

    def engine(self, dtype: str, steps: int, **options):
        """A fresh engine (it moves and may rewrite the networks, so each gets its own load of the bundle)."""
        from cxrgen.model.bundle import load_bundle, read_spec
        from cxrgen.model.engine import Engine, EngineOptions

        options = {"scheduler": "ddim", "steps": steps, **options}
        return Engine(load_bundle(read_spec(self.bundle_dir)), self.text(),
                      EngineOptions(device=self.device, dtype=dtype, **options))


def gray_diff(a, b) -> dict:
    diff = (np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).__abs__()
    return {"mean_gray_diff": float(diff.mean()), "max_gray_diff": int(diff.max()),
            "within_1_level": float((diff <= 1).mean())}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- checks

def start_cuda_tests(setup: Setup):
    """Start `pytest -m cuda` on the CUDA-only tests in a subprocess; the returned function waits and counts
    passed / failed / skipped from its JUnit XML."""
    xml = setup.work / "cuda-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", *CUDA_TESTS,
           f"--junitxml={xml}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish() -> dict:
        output = proc.communicate(timeout=400)[0]
        if not xml.is_file():
            return {"ok": False, "error": output[-800:] or f"pytest exited {proc.returncode}"}
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = counts["failures"] + counts["errors"]
        passed = counts["tests"] - failed - counts["skipped"]
        report = {"passed": passed, "failed": failed, "skipped": counts["skipped"], "returncode": proc.returncode}
        # on a GPU every CUDA test must run and pass; without one every CUDA test must skip cleanly
        report["ok"] = failed == 0 and counts["tests"] > 0 and \
            (passed == counts["tests"] if setup.device.type == "cuda" else counts["skipped"] == counts["tests"])
        if failed:
            report["output"] = output[-1500:]
        return report
    return finish


def check_throughput(setup: Setup, images: int, reference_images: int) -> dict:
    """cxrgen's generate (auto batch size and dtype) against the reference loop, at 20 and 50 steps."""
    device, name = setup.device, throughput.device_name(setup.device)
    flags = throughput.backend_flags()
    models = throughput.load_networks(setup.bundle_dir, setup.text_dir, device)
    items = setup.items(max(images, reference_images))
    peak = throughput.default_peak(name) if device.type == "cuda" and not setup.tiny else None
    report = {"device_name": name, "images": images, "reference_images": reference_images, "peak_tflops": peak}
    throughput.reference_image(models, items[0].prompt, items[0].seed, 1, device, None)  # warm-up
    for steps in (20, 50):
        throughput.restore_flags(flags)
        reference_s = throughput.run_reference(models, items[:reference_images], steps, device,
                                                setup.work / f"reference-{steps}")
        runs = {}
        for label, extra in (("default", {}), ("channels_last", {"channels_last": True})):
            if label == "channels_last" and steps != 20:
                continue
            kwargs = dict(manifest=str(setup.manifest), model=str(setup.bundle_dir), text_encoder=str(setup.text_dir),
                          cache_dir=str(setup.work / "cache"), steps=steps, device=str(device), quiet=True,
                          num_images=1, **extra)
            seconds = []
            for rep in range(2 if device.type == "cuda" else 1):  # the first includes cuDNN's autotuning
                out = setup.work / f"cxrgen-{steps}-{label}-{rep}"
                shutil.rmtree(out, ignore_errors=True)
                manifest = fake_model.write_manifest(setup.work / f"m{images}.csv", setup.prompts[:images])
                seconds.append(throughput.run_cxrgen({**kwargs, "manifest": str(manifest)}, out, images)[0])
            runs[label] = images / seconds[-1]
        ips, reference_ips = runs["default"], reference_images / reference_s
        entry = {"images_per_s": ips, "reference_images_per_s": reference_ips,
                 "ratio_to_reference": ips / reference_ips}
        if "channels_last" in runs:
            entry["channels_last_ratio"] = runs["channels_last"] / ips
        if peak:
            tflop = throughput.UNET_TFLOP_PER_STEP * steps + throughput.DECODE_TFLOP
            entry.update(tflops=ips * tflop, peak_fraction=ips * tflop / peak)
        report[str(steps)] = entry
        log(f"throughput at {steps} steps: {ips:.3f} images/s, {entry['ratio_to_reference']:.2f}x the reference")
    del models
    report["ok"] = all(report[s]["images_per_s"] > 0 for s in ("20", "50"))
    return report


def check_precision(setup: Setup, count: int, steps: int) -> tuple[dict, dict]:
    """bfloat16 and float16 autocast against float32 on the same seeds (float32 with TF32 off)."""
    from cxrgen.errors import RunError

    items = setup.items(count)
    fp32 = setup.engine("float32", steps)
    tf32 = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    reference = fp32.run_batch(items)
    del fp32
    bf16 = setup.engine("bfloat16", steps).run_batch(items)
    bf16_report = {**gray_diff(bf16, reference), "images": count, "steps": steps, "float32_tf32": tf32}
    # random weights: the figures are for the record (a chaotic network can spread 16-bit rounding far); the check
    # is that both ran and that float32 ran as IEEE float32
    bf16_report["ok"] = not tf32["matmul"] and not tf32["cudnn"]
    engine = setup.engine("float16", steps)
    folded = sum(1 for m in engine.unet.modules() if hasattr(m, "to_q") and getattr(m, "scale", None) == 1.0)
    try:
        fp16 = engine.run_batch(items)
    except RunError as exc:  # the NaN guard: non-finite output is refused, never written
        return bf16_report, {"ok": False, "finite": False, "error": str(exc), "attention_blocks_folded": folded}
    fp16_report = {"finite": True, "not_blank": bool(fp16.float().std() > 1), **gray_diff(fp16, reference),
                   "attention_blocks_folded": folded}
    fp16_report["ok"] = fp16_report["not_blank"] and folded > 0
    return bf16_report, fp16_report


class HostReads(TorchDispatchMode):
    """Counts the host's reads of device data: a tensor's value turned into a Python number or bool, nonzero,
    and copies to the CPU. Device data is what derives, op by op, from the networks' weights, so the count
    means the same on the CPU as on a GPU, where each such read waits for the device (a synchronisation);
    the schedule's own timesteps, host data, are not counted."""

    def __init__(self, modules):
        super().__init__()
        from torch.utils.weak import WeakTensorKeyDictionary

        self.device_data = WeakTensorKeyDictionary()
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                self.device_data[tensor] = True
        aten = torch.ops.aten
        self.scalar_ops = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
                           aten.equal.default}
        self.copy_ops = {aten._to_copy.default, aten.copy_.default}
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        derived = any(t in self.device_data for t in tensors)
        to_host = func in self.copy_ops and any(t.device.type != "cpu" for t in tensors) and \
            (str(kwargs.get("device", "")) == "cpu" or (func is torch.ops.aten.copy_.default and
                                                        args[0].device.type == "cpu"))
        if derived and (func in self.scalar_ops or to_host):
            self.reads += 1
        out = func(*args, **kwargs)
        if derived and not to_host:  # a copy on the host is host data: reading it costs no synchronisation
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.device_data[t] = True
        return out


def check_syncs(setup: Setup) -> dict:
    """Host reads (and on CUDA, synchronisations seen by torch's sync debug mode) per step and per batch."""
    items = setup.items(2)
    engine = setup.engine("bfloat16" if setup.device.type == "cuda" else "float32", 2, batch_size=2)
    engine.run_batch(items)  # warm-up: cuDNN autotuning and caches are not the loop's cost
    counts = {}
    for steps in (2, 6):
        engine.options.steps = steps  # the scheduler is made per batch from the options
        mode = HostReads([engine.unet, engine.autoencoder, engine.text.model])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if setup.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with mode:
                    engine.run_batch(items)
                sync(setup.device)
            finally:
                if setup.device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        cuda_syncs = sum(1 for w in caught if "synchroniz" in str(w.message))
        counts[steps] = (mode.reads, cuda_syncs)
    per_step = (counts[6][0] - counts[2][0]) / 4
    report = {"host_reads_per_step": per_step, "host_reads_per_batch": counts[2][0] - 2 * per_step,
              "steps_compared": [2, 6]}
    if setup.device.type == "cuda":
        cuda_per_step = (counts[6][1] - counts[2][1]) / 4
        report.update(cuda_syncs_per_step=cuda_per_step, cuda_syncs_per_batch=counts[2][1] - 2 * cuda_per_step)
    report["ok"] = per_step == 0 and report.get("cuda_syncs_per_step", 0) == 0
    return report


def check_prompt_encoding(setup: Setup) -> dict:
    """One encoder call for a batch's uncached prompts, against one call per prompt."""
    from cxrgen.model.text_encoder import load_text_encoder

    prompts = setup.prompts[:16] + [""]
    one, many = (load_text_encoder(str(setup.text_dir), setup.device) for _ in range(2))
    calls = []
    many.model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    batched = many.encode(prompts, setup.device, batched=True)
    single = one.encode(prompts, setup.device, batched=False)
    diff = float((batched - single).abs().max())
    report = {"calls": len(calls), "prompts": len(prompts), "max_abs_diff": diff,
              "max_abs_value": float(single.abs().max()), "bit_identical": bool(torch.equal(batched, single))}
    report["ok"] = len(calls) == 1 and diff <= 1e-3 * max(1.0, report["max_abs_value"])
    return report


def check_oom_backoff(setup: Setup, steps: int = 2, expected: int = 5, requested: int = 12) -> dict:
    """The batch settles at the largest size that fits under a memory cap (on the CPU: an injected error)."""
    items = setup.items(requested)
    engine = setup.engine("bfloat16" if setup.device.type == "cuda" else "float32", steps, decode_batch_size=1,
                          batch_size=requested)
    attempts = []
    original = engine.denoise

    def denoise(x, timesteps, context):
        attempts.append(x.shape[0] // 2)
        return original(x, timesteps, context)

    report = {"requested": requested, "expected_batch": expected}
    if setup.device.type == "cuda":
        device = setup.device
        peaks = {}
        for n in (1, 2):  # the allocator's peak for one and for two images (decoder sub-batch 1: constant)
            engine.run_batch(items[:n])
            sync(device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            engine.run_batch(items[:n])
            sync(device)
            peaks[n] = torch.cuda.max_memory_allocated(device) - base
        per_image, fixed = peaks[2] - peaks[1], 2 * peaks[1] - peaks[2]
        limit = base + fixed + (expected + 0.5) * per_image
        fraction = limit / torch.cuda.get_device_properties(device).total_memory
        report.update(per_image_bytes=per_image, fixed_bytes=fixed, memory_fraction=fraction)
        engine.fit = engine.fail = 0
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        engine.denoise = denoise
        try:
            engine.run_batch(items)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()
    else:  # no allocator to cap: the out-of-memory error is injected above `expected` images
        def oom_above(x, timesteps, context):
            attempts.append(x.shape[0] // 2)
            if x.shape[0] // 2 > expected:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return original(x, timesteps, context)

        report["injected"] = True
        engine.denoise = oom_above
        engine.run_batch(items)
    report.update(settled_batch=engine.batch_size, first_attempts=list(dict.fromkeys(attempts)))
    # allocator rounding can move the boundary by one image on a GPU; the injected one is exact
    report["ok"] = abs(engine.batch_size - expected) <= (1 if setup.device.type == "cuda" else 0)
    return report


# ------------------------------------------------------------------------------------------ multi-device

def record_placement(engine, name: str, folder: str = ""):
    """engine_hook: each worker or rank writes where it samples (its engine, its current GPU, its weights)."""
    device = engine.options.device
    placement = {"name": name, "device": str(device), "weights": str(next(engine.unet.parameters()).device),
                 "current": torch.cuda.current_device() if device.type == "cuda" else None}
    (Path(folder) / f"{name}.json").write_text(json.dumps(placement))
    return engine


def own_gpu_memory_mib() -> int | None:
    """GPU memory (MiB) nvidia-smi sees this process hold; None when nvidia-smi is missing."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(int(used) for pid, used in (line.split(",") for line in out.strip().splitlines() if "," in line)
               if int(pid) == os.getpid())


def child(job: dict) -> None:
    """Body of one multi-device process: a run with several local workers, or one rank of a launch."""
    from cxrgen.config import RunConfig
    from cxrgen.runs.generate import generate
    from cxrgen.runs.workers import rank_from_env

    rank = rank_from_env(os.environ) if job["kind"] == "rank" else None
    result = generate(RunConfig.from_dict(job["config"]), rank=rank, log=lambda message: None,
                      engine_hook=functools.partial(record_placement, folder=job["placements"]))
    print(json.dumps({"written": result.written, "complete": result.complete,
                      "gpu_memory_mib": own_gpu_memory_mib() if torch.cuda.is_available() else None}))


def _start_child(job: dict, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, json.dumps(job)],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _child_result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"child exited {proc.returncode}: {err[-1500:]}")
    return json.loads(out.strip().splitlines()[-1])


def start_multi_device(setup: Setup, images: int, steps: int):
    """Start a two-worker run and a two-rank launch (two GPUs; on the CPU two processes each); the returned
    function waits, makes the same images on one device, and compares: placement, the GPU memory the parent
    of the workers holds (none: it must open no CUDA context), equal images."""
    gpus = torch.cuda.device_count() if setup.device.type == "cuda" else 0
    if setup.device.type == "cuda" and gpus < 2:
        return lambda: {"ok": True, "skipped": f"{gpus} GPU visible: needs two"}
    manifest = fake_model.write_manifest(setup.work / "multi.csv", setup.prompts[:images])
    base = setup.config(setup.work / "unused", manifest=str(manifest), steps=steps, batch_size=0, rank_wait=30.0)
    # a bare `cuda`: every visible GPU for local workers, this rank's GPU for ranks (two GPUs made visible)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(gpus))).split(",")
    device, env = ("cuda", {"CUDA_VISIBLE_DEVICES": ",".join(visible[:2])}) if gpus else ("cpu", {})
    started = {}
    for kind in ("workers", "ranks"):
        out, placements = setup.work / f"multi-{kind}", setup.work / f"placements-{kind}"
        for folder in (out, placements):
            shutil.rmtree(folder, ignore_errors=True)
        placements.mkdir()
        config = {**base.to_dict(), "out": str(out), "device": device,
                  "workers": 2 if kind == "workers" and not gpus else 1}
        job = {"kind": "workers" if kind == "workers" else "rank", "config": config, "placements": str(placements)}
        envs = [env] if kind == "workers" else \
            [{**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)} for r in range(2)]
        started[kind] = (out, placements, [_start_child(job, e) for e in envs])

    def finish() -> dict:
        from cxrgen.runs.generate import generate

        single = setup.work / "multi-single"
        shutil.rmtree(single, ignore_errors=True)
        one_device = "cuda:0" if gpus else "cpu"
        generate(base.__class__.from_dict({**base.to_dict(), "out": str(single), "device": one_device}))
        report = {"gpus": gpus}
        for kind, (out, placements, procs) in started.items():
            children = [_child_result(proc) for proc in procs]
            placed = sorted((json.loads(p.read_text()) for p in placements.glob("*.json")), key=lambda p: p["name"])
            expected = [f"cuda:{i}" for i in range(2)] if gpus else ["cpu", "cpu"]
            diffs = [gray_diff(Image.open(out / p.relative_to(single)), Image.open(p))
                     for p in sorted((single / "images").rglob("*.png"))]
            entry = {"placement": placed, "processes": children,
                     "equal_to_one_device": {"images": len(diffs),
                                             "max_gray_diff": max(d["max_gray_diff"] for d in diffs),
                                             "within_1_level": min(d["within_1_level"] for d in diffs)}}
            on_own_device = [p["device"] for p in placed] == expected and all(
                p["weights"] == p["device"] and (p["current"] is None or f"cuda:{p['current']}" == p["device"])
                for p in placed)
            parent_clean = kind != "workers" or children[0]["gpu_memory_mib"] in (0, None)
            entry["ok"] = on_own_device and parent_clean and all(c["complete"] for c in children) and \
                len(diffs) == images and entry["equal_to_one_device"]["within_1_level"] >= 0.999
            report[kind] = entry
        report["ok"] = report["workers"]["ok"] and report["ranks"]["ok"]
        return report
    return finish


# ------------------------------------------------------------------------------------------------ driver

def _guarded(name: str, run):
    """run(), timed and logged; an exception becomes the check's {"ok": false, "error": ...}: one failing check
    must not hide the others' figures."""
    began = time.perf_counter()
    log(f"{name} ...")
    try:
        result = run()
    except Exception as exc:  # noqa: BLE001
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "where": traceback.format_exc().strip().splitlines()[-3:]}
    log(f"{name}: {time.perf_counter() - began:.1f} s")
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy models (on the CPU unless --device says otherwise)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda, or cpu with --tiny)")
    parser.add_argument("--workdir", default=None, help="keep the model files here (default: a temporary folder)")
    parser.add_argument("--skip", default="", help="comma-separated checks to leave out, e.g. throughput")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run `python benchmarks/gpu_check.py --tiny` for the CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("gpu_check: the real architecture on the CPU takes hours; add --tiny")
    if device.type == "cpu":
        # toy networks on shared cores: one intra-op thread per process is several times faster than two
        # contended ones (the test suite's one_torch_thread); child processes inherit it
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="cxrgen-gpu-check-")) if own_tmp else Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = {"check": "gpu_check", "device": str(device), "device_name": throughput.device_name(device),
              "gpus": torch.cuda.device_count() if device.type == "cuda" else 0, "tiny": args.tiny,
              "torch": torch.__version__, "cuda": torch.version.cuda}
    gpu = device.type == "cuda" and not args.tiny
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    try:
        setup = Setup(work, args.tiny, device)
        starts = {"cuda_tests": lambda: start_cuda_tests(setup),
                  "multi_device": lambda: start_multi_device(setup, 8 if gpu else 4, 10 if gpu else 2)}
        inline = {"throughput": lambda: check_throughput(setup, 64 if gpu else 4, 2 if gpu else 1),
                  "precision": lambda: check_precision(setup, 4, 50 if gpu else 4),
                  "syncs": lambda: check_syncs(setup),
                  "prompt_encoding": lambda: check_prompt_encoding(setup),
                  "oom_backoff": lambda: check_oom_backoff(setup)}
        finishes = {}
        if device.type == "cpu":
            # the subprocess checks start now and run beside the others (most of their time is importing); on a
            # GPU they would share the device with the timed checks, so there each runs alone, in order
            finishes = {name: _guarded(f"{name} (start)", start) for name, start in starts.items() if name not in skip}
        for name in ("cuda_tests", *inline, "multi_device"):
            if name in skip:
                continue
            if name in starts:
                finish = finishes.get(name) or _guarded(f"{name} (start)", starts[name])
                result = finish if isinstance(finish, dict) else _guarded(name, finish)  # a dict: the start failed
            else:
                result = _guarded(name, inline[name])
            if name == "precision" and isinstance(result, tuple):
                report["bf16_vs_fp32"], report["fp16"] = result
            else:
                report[name] = result
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    checked = [k for k, v in report.items() if isinstance(v, dict) and "ok" in v]
    report["failed"] = [k for k in checked if not report[k]["ok"]]
    report["ok"] = not report["failed"]
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
        child(json.loads(sys.argv[2]))
    else:
        sys.exit(0 if main()["ok"] else 1)
