#!/usr/bin/env python
"""What --engine ray costs against the local engine at equal work on the CPU: N Ray actors vs --workers N.

Builds, in a work folder, a bundle with the real architecture and random weights (fake_model; --tiny: toy
sizes) and a manifest of distinct report-like prompts. Starts one local Ray with as many CPUs as torch uses
threads here (a cluster is already up when a user runs; its start is reported apart as ray_start_s). Then,
interleaved, --repeats times, into a fresh folder each:

  local   cxrgen.runs.generate.generate(config, workers=N): N spawned processes, each loading the models and
          pulling batches from a queue, its share of the cores as torch threads
  ray     the same config with engine="ray", ray_workers=N: a Ray Data pool of N actors, each loading the
          models, reserving (and using as torch threads) its share of the Ray's CPUs

Same plan, batch size, steps and threads per worker. Timed: the whole generate() call (workers starting,
models loading, sampling, writing, merging): what a user waits for. overhead = median(ray) / median(local) - 1.
Also the sampling rate over the workers' busy time (images/s, start-up excluded) and whether both engines
wrote byte-identical files.

The last line printed is one JSON object.

    python benchmarks/ray_overhead.py                        # real architecture: 8 images, 2 steps, 3 repetitions
    python benchmarks/ray_overhead.py --tiny --images 4 --repeats 1 --steps 1      # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is local; never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # Ray's C++ start-up lines are not results
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def log(message: str) -> None:
    print(f"[ray_overhead] {message}", file=sys.stderr, flush=True)


def build(work: Path, tiny: bool, images: int) -> tuple[Path, Path, Path]:
    import fake_model

    bundle, text = work / "bundle", work / "text"
    if not (bundle / "configs" / "metadata.json").is_file():
        fake_model.build_bundle(bundle, tiny=tiny)
    if not (text / "tokenizer").is_dir():
        fake_model.build_text_encoder(text, tiny=tiny)
    manifest = fake_model.write_manifest(work / "manifest.csv", fake_model.report_prompts(images))
    return bundle, text, manifest


def one_run(engine: str, out: Path, base: dict, workers: int) -> dict:
    from cxrgen.config import RunConfig
    from cxrgen.runs.generate import generate

    shutil.rmtree(out, ignore_errors=True)
    extra = {"engine": "ray", "ray_workers": str(workers)} if engine == "ray" else {"workers": workers}
    started = time.perf_counter()
    result = generate(RunConfig(out=str(out), **base, **extra))
    seconds = time.perf_counter() - started
    if not result.complete:
        raise SystemExit(f"the {engine} run in {out} did not complete")
    return {"seconds": seconds, "images_per_s": result.written / result.seconds if result.seconds else 0.0}


def same_files(a: Path, b: Path) -> bool:
    names = sorted(str(p.relative_to(a)) for p in (a / "images").rglob("*") if p.is_file())
    return names == sorted(str(p.relative_to(b)) for p in (b / "images").rglob("*") if p.is_file()) and \
        all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy network sizes (smoke test)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="local worker processes = Ray actors")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and runs here (default: a temp dir)")
    args = parser.parse_args()

    import ray
    import torch

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cxrgen-ray-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle, text, manifest = build(work, args.tiny, args.images)
    base = dict(manifest=str(manifest), model=str(bundle), text_encoder=str(text), steps=args.steps,
                batch_size=args.batch_size, image_format="png", device="cpu", quiet=True, offline=True)
    cpus = max(args.workers, torch.get_num_threads())
    started = time.perf_counter()
    ray.init(num_cpus=cpus, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_start = time.perf_counter() - started
    log(f"local Ray of {cpus} CPU(s) started in {ray_start:.1f} s; {args.images} images, {args.steps} steps, "
        f"batch {args.batch_size}, {args.workers} workers, {args.repeats} repetition(s)")
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    try:
        for repeat in range(args.repeats):
            # alternate which engine goes first, so a drift of the machine's load hits both alike
            for engine in (("local", "ray") if repeat % 2 == 0 else ("ray", "local")):
                runs[engine].append(one_run(engine, work / "runs" / f"{engine}-{repeat}", base, args.workers))
                log(f"{engine} #{repeat}: {runs[engine][-1]['seconds']:.1f} s, "
                    f"{runs[engine][-1]['images_per_s']:.3f} images/s while sampling")
    finally:
        ray.shutdown()
    local_s = statistics.median(r["seconds"] for r in runs["local"])
    ray_s = statistics.median(r["seconds"] for r in runs["ray"])
    report = {
        "device": "cpu", "tiny": args.tiny, "images": args.images, "steps": args.steps,
        "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats, "ray_cpus": cpus,
        "ray_version": ray.__version__, "ray_start_s": round(ray_start, 2),
        "local_s": round(local_s, 2), "ray_s": round(ray_s, 2), "overhead": round(ray_s / local_s - 1, 4),
        "local_images_per_s": round(statistics.median(r["images_per_s"] for r in runs["local"]), 4),
        "ray_images_per_s": round(statistics.median(r["images_per_s"] for r in runs["ray"]), 4),
        "local_runs_s": [round(r["seconds"], 2) for r in runs["local"]],
        "ray_runs_s": [round(r["seconds"], 2) for r in runs["ray"]],
        "identical_files": same_files(work / "runs" / "local-0", work / "runs" / "ray-0"),
    }
    print(f"local engine {local_s:.1f} s, Ray engine {ray_s:.1f} s (median of {args.repeats}): overhead "
          f"{100 * report['overhead']:+.1f} %; same files: {report['identical_files']}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
