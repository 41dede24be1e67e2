#!/usr/bin/env python
"""Images per second of cxrgen against the reference loop and the bundle's per-image command.

Builds, in a temporary folder, a bundle with the real architecture and random weights (old checkpoint
layout), a text encoder with the SD 2.x text architecture (random weights, real tokenizer files) and
a manifest of distinct report-like prompts. Then, in this one process and interleaved:

  reference   docs/algorithm.md's single-image loop: models loaded once, float32, batch 1; per image
              tokenize ["", prompt], encode, DDIM with cat([x, x]) and u + g * (c - u), decode
              x / 0.3, clip * 255 -> uint8, save a JPEG.
  cxrgen      cxrgen.runs.generate.generate on the same manifest into a fresh folder per repetition (real
              JPEGs, journal, metadata); images/s is over the batch loop, model loading is reported
              apart as load_s.
  bundle-cli  the bundle's own command pattern: load every network and the text encoder from
              disk, then make one image; repeated per image.

The last line printed is one JSON object (see docs/performance.md).

    python benchmarks/throughput.py                      # CPU defaults: 4 steps, 4 images, 2 repetitions
    python benchmarks/throughput.py --device cuda        # 50 steps, 64 images, bf16 autocast for cxrgen
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is local; never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_model  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

UNET_TFLOP_PER_STEP = 0.6393  # per image, both guidance rows, 64x64 latent (torch flop counter; docs/performance.md)
DECODE_TFLOP = 0.304  # per 512x512 image
SCALE_FACTOR = 0.3
GUIDANCE = 7.0
JPEG_QUALITY = 95  # cxrgen's default, so both sides encode the same way
# Dense bf16 tensor-core peak in TFLOP/s, by a name fragment of torch.cuda.get_device_name().
# The first fragment found wins, so the PCIe and NVL cards (lower clocks and power) come before their SXM names:
# get_device_name() says "NVIDIA H100 PCIe", "NVIDIA H100 NVL", but "NVIDIA H100 80GB HBM3" for SXM. V100 and T4
# have no bfloat16 units: their float16 peak, the dtype --dtype auto picks there.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "GH200": 989.0, "H200": 989.0,
                    "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 70.0, "A10": 125.0,
                    "L4": 121.0, "RTX 4090": 165.0, "V100": 125.0, "T4": 65.0}


def log(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- memory

class PeakMemory:
    """Peak memory of one phase: CUDA allocator peak, or the process's peak RSS on CPU.

    On Linux the RSS high-water mark can be reset (/proc/self/clear_refs), so each phase gets its own
    peak; elsewhere the figure is the process peak so far (getrusage).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.per_phase = False

    def start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset VmHWM to the current RSS
            self.per_phase = True
        except OSError:
            self.per_phase = False
        return self._rss("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return self._rss("VmHWM") if self.per_phase else self.process_peak()

    @staticmethod
    def process_peak() -> int:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kib if sys.platform == "darwin" else kib * 1024)  # bytes on macOS, KiB on Linux

    @staticmethod
    def _rss(field: str) -> int:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return PeakMemory.process_peak()


def cpu_counters() -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of this process and its finished children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
            own.ru_minflt + children.ru_minflt)


def default_allocator() -> None:
    """Put glibc's malloc back to its steady default before a reference phase.

    cxrgen's engine tunes the process's allocator on CPU (cxrgen.model.engine.tune_cpu_allocator); the
    reference loop and the bundle's command run in plain processes that never do, so they must not
    profit from it here. glibc's default serves blocks above a dynamic threshold (at most 32 MiB) with
    mmap and trims at twice that; 32/64 MiB is the most generous steady state of that default.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-4, 65536)  # M_MMAP_MAX: glibc's default
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)  # hand back what cxrgen's phase kept, so the reference cannot reuse it
    except (OSError, AttributeError):
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------- the reference loop

def load_networks(bundle_dir: Path, text_dir: Path, device: torch.device):
    """Load everything the way the bundle's command does: networks from configs/inference.json, old
    checkpoints through load_old_state_dict, the tokenizer and text encoder from their folders."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    from transformers import CLIPTextModel, CLIPTokenizer

    config = json.loads((bundle_dir / "configs" / "inference.json").read_text())
    nets = []
    for key, cls, file_name in (("autoencoder_def", AutoencoderKL, "autoencoder.pth"),
                                ("diffusion_def", DiffusionModelUNet, "diffusion_model.pth")):
        net = cls(**{k: v for k, v in config[key].items() if not k.startswith("_")})
        state = torch.load(bundle_dir / "models" / file_name, map_location="cpu", weights_only=True)
        with contextlib.redirect_stdout(io.StringIO()):
            net.load_old_state_dict(state)
        nets.append(net.to(device).eval())
    tokenizer = CLIPTokenizer.from_pretrained(str(text_dir / "tokenizer"))
    text_model = CLIPTextModel.from_pretrained(str(text_dir / "text_encoder")).to(device).eval()
    scheduler_args = {k: v for k, v in config["scheduler"].items() if not k.startswith("_")}
    return {"autoencoder": nets[0], "unet": nets[1], "tokenizer": tokenizer, "text_model": text_model,
            "scheduler_args": scheduler_args, "latent": _latent_of(config)}


def _latent_of(config: dict) -> tuple[int, ...]:
    """The latent shape from the bundle's noise expression, e.g. torch.randn((1, 3, 64, 64))."""
    import re

    return tuple(int(v) for v in re.search(r"\(1, (\d+), (\d+), (\d+)\)", config["noise"]).groups())


@torch.no_grad()
def reference_image(models: dict, prompt: str, seed: int, steps: int, device: torch.device,
                    path: Path | None) -> np.ndarray:
    """One image exactly as docs/algorithm.md describes the bundle's sampler (batch 1, float32)."""
    from monai.networks.schedulers import DDIMScheduler

    ids = models["tokenizer"](["", prompt], padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids.to(device)
    context = models["text_model"](ids)[0]  # rows: unconditional, conditional
    scheduler = DDIMScheduler(**models["scheduler_args"])
    scheduler.set_timesteps(num_inference_steps=steps)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    x = torch.randn((1, *models["latent"]), generator=generator).to(device)
    for t in scheduler.timesteps:
        out = models["unet"](torch.cat([x, x]), timesteps=torch.Tensor((t,)).to(device).long(), context=context)
        uncond, cond = out.chunk(2)
        x, _ = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x)
    image = models["autoencoder"].decode_stage_2_outputs(x / SCALE_FACTOR)
    pixels = (torch.clip(image, 0, 1) * 255).to(torch.uint8)[0, 0].cpu().numpy()
    if path is not None:
        Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)
    return pixels


def run_reference(models: dict, items: list, steps: int, device: torch.device, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    sync(device)
    start = time.perf_counter()
    for item in items:
        reference_image(models, item.prompt, item.seed, steps, device, out / f"{item.image_id}.jpg")
    sync(device)
    return time.perf_counter() - start


def run_bundle_pattern(bundle_dir: Path, text_dir: Path, items: list, steps: int, device: torch.device,
                       out: Path) -> tuple[float, list[dict]]:
    """The bundle's command, once per image: a fresh Python process imports torch, MONAI and
    transformers, loads every network and the text encoder from disk, makes one image and exits."""
    out.mkdir(parents=True, exist_ok=True)
    children = []
    start = time.perf_counter()
    for item in items:
        job = {"bundle": str(bundle_dir), "text": str(text_dir), "prompt": item.prompt, "seed": item.seed,
               "steps": steps, "device": str(device), "out": str(out / f"{item.image_id}.jpg")}
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), BUNDLE_CLI_FLAG, json.dumps(job)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bundle-cli child failed: {proc.stderr[-2000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        child["process_s"] = time.perf_counter() - began
        children.append(child)
    return time.perf_counter() - start, children


BUNDLE_CLI_FLAG = "--bundle-cli-child"


def bundle_cli_child(job: dict) -> None:
    """Body of one bundle-cli process: load everything, make one image, print timings as JSON."""
    device = torch.device(job["device"])
    start = time.perf_counter()
    models = load_networks(Path(job["bundle"]), Path(job["text"]), device)
    sync(device)
    loaded = time.perf_counter()
    reference_image(models, job["prompt"], job["seed"], job["steps"], device, Path(job["out"]))
    sync(device)
    done = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else PeakMemory.process_peak()
    print(json.dumps({"load_s": loaded - start, "image_s": done - loaded, "peak_memory_bytes": int(peak)}))


# ------------------------------------------------------------------------------------------- cxrgen

class KeepFirstEngine:
    """engine_hook for --compile: every repetition samples with the first repetition's engine, whose UNet was
    compiled once. Each generate call builds a new engine, and a new engine compiles again (minutes each)."""

    def __init__(self):
        self.engine = None

    def __call__(self, engine, name):
        self.engine = self.engine or engine
        return self.engine


def run_cxrgen(config_kwargs: dict, out: Path, images: int, engine_hook=None) -> tuple[float, float]:
    """(seconds of the batch loop, seconds of the whole generate call) of one fresh run."""
    from cxrgen.config import RunConfig
    from cxrgen.runs.generate import generate

    config = RunConfig(out=str(out), **config_kwargs)
    start = time.perf_counter()
    result = generate(config, log=lambda message: None, engine_hook=engine_hook)
    wall = time.perf_counter() - start
    if result.written != images:
        raise RuntimeError(f"cxrgen wrote {result.written} image(s), expected {images}")
    return result.seconds, wall


# ------------------------------------------------------------------------------------------- driver

def backend_flags() -> dict:
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_precision": torch.get_float32_matmul_precision(),
            "threads": torch.get_num_threads()}


def restore_flags(flags: dict) -> None:
    """Give the reference PyTorch's defaults back, whatever global switches cxrgen's engine set."""
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]
    torch.set_float32_matmul_precision(flags["matmul_precision"])
    torch.set_num_threads(flags["threads"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def default_peak(name: str) -> float | None:
    for fragment, peak in BF16_PEAK_TFLOPS.items():
        if fragment in name:
            return peak
    return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 4 on CPU, 50 on CUDA)")
    parser.add_argument("--images", type=int, default=None,
                        help="images per cxrgen repetition (default: 4 on CPU, 64 on CUDA)")
    parser.add_argument("--reference-images", type=int, default=None,
                        help="images per reference repetition (default: --images on CPU, min(16, --images) on CUDA)")
    parser.add_argument("--bundle-images", type=int, default=1, help="images made the bundle's reload-per-image way")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default: 2 on CPU, 3 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=0, help="cxrgen --batch-size (0: the engine's default)")
    parser.add_argument("--decode-batch-size", type=int, default=0, help="cxrgen --decode-batch-size")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="cxrgen --dtype (auto: float32 on CPU, bfloat16 on CUDA); the reference is float32")
    parser.add_argument("--scheduler", default="ddim", choices=["ddim", "dpmpp2m"],
                        help="cxrgen --scheduler; the reference always uses DDIM")
    parser.add_argument("--channels-last", action="store_true", help="cxrgen --channels-last")
    parser.add_argument("--compile", action="store_true", help="cxrgen --compile (compile time falls in its loop)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device bf16 dense peak for the efficiency figure (default by device name, e.g. H100 989)")
    parser.add_argument("--workdir", default=None,
                        help="keep the generated model files here and reuse them next time (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="toy architecture (smoke test only; figures mean nothing)")
    args = parser.parse_args(argv)
    from cxrgen.model.engine import resolve_device

    args.device = resolve_device(args.device)
    cuda = args.device.type == "cuda"
    args.steps = args.steps or (50 if cuda else 4)
    args.images = args.images or (64 if cuda else 4)
    args.repeats = args.repeats or (3 if cuda else 2)
    if args.reference_images is None:
        args.reference_images = min(16, args.images) if cuda else args.images
    for name in ("steps", "images", "repeats", "reference_images", "bundle_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def prepare(work: Path, tiny: bool) -> tuple[Path, Path]:
    """Model files in work/, built unless a previous run with the same --tiny left them there."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    kind = "tiny" if tiny else "real"
    bundle_dir, text_dir, marker = work / f"bundle-{kind}", work / f"text-{kind}", work / f".built-{kind}"
    if not marker.is_file():
        start = time.perf_counter()
        for folder in (bundle_dir, text_dir):
            shutil.rmtree(folder, ignore_errors=True)
        fake_model.build_bundle(bundle_dir, tiny=tiny)
        fake_model.build_text_encoder(text_dir, tiny=tiny)
        marker.write_text("ok\n")
        log(f"built {kind} model files in {time.perf_counter() - start:.1f} s")
    return bundle_dir, text_dir


def compare_outputs(reference_dir: Path, cxrgen_dir: Path, items: list) -> dict:
    """Gray-level differences between the reference's and cxrgen's JPEGs of the same seeds."""
    diffs = []
    for item in items:
        ours = cxrgen_dir / item.file_name
        theirs = reference_dir / f"{item.image_id}.jpg"
        if ours.is_file() and theirs.is_file():
            a = np.asarray(Image.open(ours), dtype=np.int16)
            b = np.asarray(Image.open(theirs), dtype=np.int16)
            diffs.append(np.abs(a - b))
    if not diffs:
        return {"compared": 0}
    stacked = np.stack(diffs)
    return {"compared": len(diffs), "max_gray_diff": int(stacked.max()), "mean_gray_diff": float(stacked.mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    from cxrgen.manifests.workitems import load_plan
    from cxrgen.model.engine import resolve_dtype

    dtype = resolve_dtype(args.dtype, device)
    name = device_name(device)
    flags = backend_flags()
    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="cxrgen-bench-")) if own_tmp else Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    memory = PeakMemory(device)
    try:
        bundle_dir, text_dir = prepare(work, args.tiny)
        runs = work / "runs"
        shutil.rmtree(runs, ignore_errors=True)
        runs.mkdir()
        count = max(args.images, args.reference_images, args.bundle_images)
        manifest = fake_model.write_manifest(work / "manifest.csv", fake_model.report_prompts(args.images))
        cxrgen_kwargs = dict(manifest=str(manifest), model=str(bundle_dir), text_encoder=str(text_dir),
                             cache_dir=str(work / "cache"), steps=args.steps, scheduler=args.scheduler,
                             guidance_scale=GUIDANCE, batch_size=args.batch_size,
                             decode_batch_size=args.decode_batch_size, device=str(device), dtype=args.dtype,
                             channels_last=args.channels_last, compile=args.compile, jpeg_quality=JPEG_QUALITY,
                             quiet=True)
        from cxrgen.config import RunConfig

        plan = load_plan(RunConfig(out=str(runs / "unused"), **cxrgen_kwargs))[1]
        if count > len(plan):  # more reference/bundle images than the manifest: reuse prompts, new seeds
            plan = plan + [item.__class__(**{**item.__dict__, "seed": item.seed + 1, "image_id": item.image_id + "b"})
                           for item in plan][: count - len(plan)]
        reference_items, bundle_items = plan[:args.reference_images], plan[:args.bundle_images]

        log(f"loading the reference's models on {device} ({name})")
        start = time.perf_counter()
        models = load_networks(bundle_dir, text_dir, device)
        reference_load_s = time.perf_counter() - start
        reference_image(models, plan[0].prompt, plan[0].seed, 1, device, None)  # warm-up (kernels, allocator)

        reference_s, cxrgen_s, cxrgen_wall_s, bundle_s = [], [], [], None
        peaks: dict[str, dict] = {}

        counters: dict[str, list] = {}

        def phase(label: str, fn):
            gc.collect()
            if label != "cxrgen":
                restore_flags(flags)
                default_allocator()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            base = memory.start()
            cpu0, faults0 = cpu_counters()
            result = fn()
            cpu1, faults1 = cpu_counters()
            peak = memory.peak()
            entry = peaks.setdefault(label, {"start_bytes": base, "peak_bytes": peak})
            entry["peak_bytes"] = max(entry["peak_bytes"], peak)
            counters.setdefault(label, []).append((cpu1 - cpu0, faults1 - faults0))
            return result

        keep = KeepFirstEngine() if args.compile else None
        if keep is not None:  # compiled once, outside the timed repetitions; its time is reported apart
            run_cxrgen(cxrgen_kwargs, runs / "cxrgen-compile", args.images, keep)
            log(f"torch.compile: the first batch took {keep.engine.first_batch_seconds:.1f} s with compilation")
        for rep in range(args.repeats):
            order = ("reference", "cxrgen") if rep % 2 == 0 else ("cxrgen", "reference")
            for label in order:
                if label == "reference":
                    seconds = phase(label, lambda: run_reference(models, reference_items, args.steps, device,
                                                                 runs / f"reference-{rep}"))
                    reference_s.append(seconds)
                    log(f"rep {rep + 1}/{args.repeats} reference: {len(reference_items)} image(s) in {seconds:.2f} s")
                else:
                    loop_s, wall_s = phase(label, lambda: run_cxrgen(cxrgen_kwargs, runs / f"cxrgen-{rep}", args.images,
                                                                         keep))
                    cxrgen_s.append(loop_s)
                    cxrgen_wall_s.append(wall_s)
                    log(f"rep {rep + 1}/{args.repeats} cxrgen: {args.images} image(s) in {loop_s:.2f} s "
                        f"(generate call {wall_s:.2f} s)")
            if rep == 0:
                bundle_s, bundle_children = phase("bundle_cli", lambda: run_bundle_pattern(
                    bundle_dir, text_dir, bundle_items, args.steps, device, runs / "bundle"))
                peaks.pop("bundle_cli")  # this process only waited; the children report their own peaks
                log(f"bundle-cli pattern: {len(bundle_items)} image(s) in {bundle_s:.2f} s, one process each")

        consistency = compare_outputs(runs / "reference-0", runs / "cxrgen-0", reference_items)
        reference_ips = len(reference_items) / statistics.median(reference_s)
        cxrgen_ips = args.images / statistics.median(cxrgen_s)
        bundle_ips = len(bundle_items) / bundle_s
        cxrgen_load_s = statistics.median(w - s for w, s in zip(cxrgen_wall_s, cxrgen_s))
        report = {
            "device": str(device), "device_name": name, "tiny": args.tiny, "steps": args.steps,
            "images": args.images, "reference_images": len(reference_items), "bundle_images": len(bundle_items),
            "repeats": args.repeats, "guidance_scale": GUIDANCE, "scheduler": args.scheduler, "dtype": dtype,
            "batch_size": args.batch_size, "decode_batch_size": args.decode_batch_size,
            "channels_last": args.channels_last, "compile": args.compile,
            "compile_first_batch_s": keep.engine.first_batch_seconds if keep is not None else None,
            "reference_images_per_s": reference_ips, "cxrgen_images_per_s": cxrgen_ips,
            "ratio": cxrgen_ips / reference_ips, "bundle_cli_images_per_s": bundle_ips,
            "ratio_vs_bundle_cli": cxrgen_ips / bundle_ips,
            "cxrgen_end_to_end_images_per_s": args.images / statistics.median(cxrgen_wall_s),
            "reference_seconds": reference_s, "cxrgen_seconds": cxrgen_s, "cxrgen_generate_seconds": cxrgen_wall_s,
            "bundle_cli_seconds": bundle_s, "bundle_cli_processes": bundle_children,
            "bundle_cli_peak_memory_bytes": max(c["peak_memory_bytes"] for c in bundle_children),
            "cxrgen_load_s": cxrgen_load_s, "reference_load_s": reference_load_s,
            "peak_memory_bytes": peaks["cxrgen"]["peak_bytes"],
            "reference_peak_memory_bytes": peaks["reference"]["peak_bytes"],
            "memory_per_phase": peaks,
            "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else
            ("peak RSS per phase (VmHWM)" if memory.per_phase else "process peak RSS (getrusage)"),
            # CPU seconds and minor page faults per image of each phase (medians; cxrgen's include
            # its model loading): steadier than wall time on a shared machine.
            "cpu_seconds_per_image": {
                label: statistics.median(c[0] for c in values) / n
                for label, values, n in per_image_counts(counters, len(reference_items), args.images,
                                                         len(bundle_items))},
            "page_faults_per_image": {
                label: statistics.median(c[1] for c in values) / n
                for label, values, n in per_image_counts(counters, len(reference_items), args.images,
                                                         len(bundle_items))},
            "reference_vs_cxrgen": consistency,
            "torch": torch.__version__, "threads": flags["threads"], "cpu_count": os.cpu_count(),
        }
        if device.type == "cuda" and not args.tiny:
            tflop_per_image = UNET_TFLOP_PER_STEP * args.steps + DECODE_TFLOP
            peak = args.peak_tflops or default_peak(name)
            report.update(tflop_per_image=tflop_per_image, peak_tflops=peak,
                          cxrgen_tflops=cxrgen_ips * tflop_per_image,
                          reference_tflops=reference_ips * tflop_per_image,
                          cxrgen_peak_fraction=(cxrgen_ips * tflop_per_image / peak) if peak else None)
        print_summary(report)
        print(json.dumps(report), flush=True)
        return report
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def per_image_counts(counters: dict, reference: int, cxrgen: int, bundle: int):
    sizes = {"reference": reference, "cxrgen": cxrgen, "bundle_cli": bundle}
    return [(label, values, sizes[label]) for label, values in counters.items()]


def print_summary(r: dict) -> None:
    gib = 2 ** 30
    lines = [
        f"device        {r['device']} ({r['device_name']}), torch {r['torch']}, {r['threads']} thread(s)"
        + ("  [TINY architecture: smoke test only]" if r["tiny"] else ""),
        f"workload      {r['steps']} steps, guidance {r['guidance_scale']}, cxrgen {r['scheduler']} {r['dtype']} "
        f"batch {r['batch_size'] or 'auto'}; {r['repeats']} interleaved repetitions, medians",
        f"reference     {r['reference_images_per_s']:.4f} images/s  ({r['reference_images']} images/repetition, "
        f"fp32, batch 1; peak {r['reference_peak_memory_bytes'] / gib:.2f} GiB)",
        f"cxrgen        {r['cxrgen_images_per_s']:.4f} images/s  ({r['images']} images/repetition; model load "
        f"{r['cxrgen_load_s']:.1f} s apart; peak {r['peak_memory_bytes'] / gib:.2f} GiB)",
        f"bundle-cli    {r['bundle_cli_images_per_s']:.4f} images/s  (a fresh process per image: imports, "
        f"load {statistics.median(c['load_s'] for c in r['bundle_cli_processes']):.1f} s, one image; "
        f"{r['bundle_images']} image(s))",
        f"ratio         cxrgen/reference {r['ratio']:.3f}x, cxrgen/bundle-cli {r['ratio_vs_bundle_cli']:.2f}x",
    ]
    if "cxrgen_tflops" in r:
        fraction = f"{100 * r['cxrgen_peak_fraction']:.1f}% of {r['peak_tflops']:.0f}" if r["peak_tflops"] else "n/a"
        lines.append(f"compute       cxrgen {r['cxrgen_tflops']:.1f} TFLOP/s ({fraction} bf16 peak), "
                     f"reference {r['reference_tflops']:.1f} TFLOP/s")
    if r["device"] == "cpu":
        cpu, faults = r["cpu_seconds_per_image"], r["page_faults_per_image"]
        lines.append("cpu per image  " + ", ".join(f"{k} {cpu[k]:.1f} s / {faults[k] / 1e3:.0f}k page faults"
                                                   for k in cpu))
    consistency = r["reference_vs_cxrgen"]
    if consistency.get("compared"):
        lines.append(f"same pixels?  {consistency['compared']} image(s) compared: max gray-level diff "
                     f"{consistency['max_gray_diff']}, mean {consistency['mean_gray_diff']:.3f} (JPEG vs JPEG)")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == BUNDLE_CLI_FLAG:
        bundle_cli_child(json.loads(sys.argv[2]))
    else:
        main()
