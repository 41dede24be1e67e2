#!/usr/bin/env python
"""Images per second of `cxrgen evaluate` (cxrgen.evaluation.evaluate.evaluate_run) on this machine.

Builds, in a work folder, torchxrayvision's DenseNet-121 with the `densenet121-res224-all` architecture and
seeded random weights (pickled whole, like the release file), a finished run of N synthetic 512 x 512 JPEGs
(smooth noise; 4 images per prompt; one label column) and a folder of N "real" JPEGs. Then, per repetition,
it evaluates the run against the real folder with an empty real-feature cache (so both sets go through the
network) and reads the phase timings the evaluation records in summary.json.

  images_per_s             (synthetic + real images) / whole evaluation, model load and plots included
  image_pass_images_per_s  (synthetic + real images) / the image pass: decode + preprocess threads and the
                           DenseNet forward pass (features and scores), the part that scales with N
  ms_ssim_pairs_per_s      MS-SSIM pairs / their time (a fixed cost: --max-pairs per set at most)

The last line printed is one JSON object with the medians over the repetitions.

    python benchmarks/evaluate.py                          # 64 images, 3 repetitions, default --max-pairs 2000
    python benchmarks/evaluate.py --images 256 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image


def log(message: str) -> None:
    print(f"[evaluate-bench] {message}", file=sys.stderr, flush=True)


def build_weights(path: Path, seed: int = 0) -> Path:
    """The release's architecture (18 outputs) with random weights, pickled whole as the release file is."""
    with warnings.catch_warnings():
        import torchxrayvision as xrv
    torch.manual_seed(seed)
    entry = xrv.models.model_urls["densenet121-res224-all"]
    model = xrv.models.DenseNet(weights=None, num_classes=len(entry["labels"]),
                                op_threshs=torch.tensor(entry["op_threshs"])).eval()
    model.pathologies = list(entry["labels"])
    torch.save(model, path)
    return path


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = (rng.random((16, 16)) * 200 + 20).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def build_inputs(work: Path, images: int, size: int) -> tuple[Path, Path]:
    """A finished run folder (run.json, metadata.parquet, JPEGs) and a real folder of as many JPEGs."""
    rng = np.random.default_rng(0)
    run, real = work / "run", work / "real"
    ids = [f"img{i:05d}_0000" for i in range(images)]
    names = [f"images/00000/{image_id}.jpg" for image_id in ids]
    (run / "images" / "00000").mkdir(parents=True, exist_ok=True)
    real.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(smooth_image(rng, size)).save(run / name, quality=95)
        Image.fromarray(smooth_image(rng, size)).save(real / f"real{i:05d}.jpg", quality=95)
    (run / "run.json").write_text(json.dumps({"config": {"out": str(run)}, "settings": {"planned_images": images}}))
    table = pa.table({"image_id": ids, "file_name": names, "prompt": [f"prompt {i // 4}" for i in range(images)],
                      "Pleural Effusion": [i % 2 for i in range(images)]})
    pq.write_table(table, run / "metadata.parquet")
    return run, real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="synthetic images, and as many real ones")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (cxrgen makes 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=0, help="0: cxrgen's default for the device")
    parser.add_argument("--threads", type=int, default=2, help="decode/preprocess threads")
    parser.add_argument("--max-pairs", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated files here")
    args = parser.parse_args()

    from cxrgen.evaluation.evaluate import EvalOptions, evaluate_run

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cxrgen-eval-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    weights = build_weights(work / "weights.pt")
    run, real = build_inputs(work, args.images, args.size)
    log(f"built weights and {2 * args.images} images of {args.size} px in {time.monotonic() - started:.1f} s")
    runs = []
    for repeat in range(args.repeats):
        cache = work / f"home-{repeat}"
        shutil.rmtree(cache, ignore_errors=True)  # an empty cache: the real set goes through the network too
        t0 = time.monotonic()
        result = evaluate_run(EvalOptions(out=str(run), real=str(real), evaluator_weights=str(weights),
                                          batch_size=args.batch_size, threads=args.threads, device=args.device,
                                          max_pairs=args.max_pairs, cache_dir=str(cache), quiet=True))
        wall = time.monotonic() - t0
        s = result.summary
        t = s["timings"]
        n = s["n_images"] + s["n_real"]
        pairs = sum(s[f"ms_ssim_{k}_pairs"] or 0 for k in ("within_prompt", "random", "real"))
        runs.append({"wall_s": wall, "timings": t, "images_per_s": n / wall,
                     "image_pass_images_per_s": n / t["image_pass_s"], "pairs": pairs})
        log(f"repeat {repeat}: {n / wall:.2f} images/s end to end, {n / t['image_pass_s']:.2f} images/s image pass, "
            f"timings {t}")
    report = {
        "images": args.images, "real_images": args.images, "size": args.size, "repeats": args.repeats,
        "batch_size": args.batch_size, "threads": args.threads, "max_pairs": args.max_pairs, "device": args.device,
        "images_per_s": statistics.median(r["images_per_s"] for r in runs),
        "image_pass_images_per_s": statistics.median(r["image_pass_images_per_s"] for r in runs),
        "ms_ssim_pairs": runs[-1]["pairs"],
        "ms_ssim_s": statistics.median(r["timings"]["ms_ssim_s"] for r in runs),
        "runs": runs, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
    }
    print(f"evaluate: {report['images_per_s']:.2f} images/s end to end, {report['image_pass_images_per_s']:.2f} "
          f"images/s image pass (median of {args.repeats})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
