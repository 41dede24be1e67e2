#!/usr/bin/env python
"""cxrgen's bookkeeping at scale: write path, resume start-up, status and merge, without a GPU.

Everything but the sampling is cxrgen's real code. Three parts, each in a fresh child process so its
peak memory is its own:

  write      cxrgen.runs.generate.generate on a manifest of N images with an engine stand-in that returns
             ready-made 512 x 512 uint8 images instantly: plan, JPEG encoding, crash-safe writes
             (fsync + rename), journal, merge. images/s of the batch loop = the write path's ceiling.
  scale      for each size: a run folder built quickly (tiny stand-in image files, journal lines in the
             real format through cxrgen's Journal, run.json as generate writes it), then timed:
             `merge` (finalize: metadata.parquet from every record), `resume start-up` (generate on the
             finished run: plan, locks, one stat per image, nothing to sample), `status`
             (inspect_run), each with the process's peak memory.
  merge      the merge alone (`finalize_run`, as `cxrgen status --finalize` runs it) on a finished run of 10M
             planned images by default, in a process of its own: its time and peak memory. The records are
             real; the images are hard links to one tiny file (directory entries, not 10M files' blocks).
  model      loading the full-size architecture's checkpoints (random weights) as cxrgen does, built on
             the meta device, against the same networks built with their random initialisation first
             (the previous behaviour), interleaved; the ratio is the start-up saved per process.

The last line printed is one JSON object for the largest size.

    python benchmarks/bookkeeping.py                          # 10k, 100k and 1M planned images, merge at 10M
    python benchmarks/bookkeeping.py --images 10000 --write-images 2000 --merge-images 100000
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LINKS_PER_FILE = 60_000  # hard links per tiny source file in the merge row (below ext4's 65,000 per inode)
ROWS_IMAGES = 10  # images per manifest row in the scale runs (a class-balanced set repeats prompts)


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def models(root: Path) -> tuple[Path, Path]:
    """A tiny bundle and text encoder (the write path does not sample; their size does not matter)."""
    import fake_model

    return (fake_model.build_bundle(root / "bundle", tiny=True),
            fake_model.build_text_encoder(root / "text", tiny=True))


def manifest(path: Path, images: int, per_row: int) -> Path:
    """A CSV of distinct prompts, per_row images each."""
    import csv

    import fake_model

    rows = max(1, images // per_row)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "num_images", "finding"])
        for i, prompt in enumerate(fake_model.report_prompts(rows)):
            writer.writerow([prompt, per_row, i % 2])
    return path


def config(root: Path, manifest_path: Path, bundle: Path, text: Path, **kw):
    from cxrgen.config import RunConfig

    return RunConfig(manifest=str(manifest_path), out=str(root / "out"), model=str(bundle), text_encoder=str(text),
                     steps=1, quiet=True, **kw)


class Instant:
    """engine_hook: run_batch returns ready-made 512 x 512 images (chest-X-ray-like smooth pictures)."""

    def __init__(self):
        import numpy as np
        import torch

        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:512, 0:512] / 512.0
        bases = []
        for k in range(8):  # smooth shapes plus mild noise: JPEG sizes like real radiographs (~40-60 kB)
            picture = 120 + 60 * np.sin(3 * x + k) * np.cos(2 * y - k) + rng.normal(0, 6, (512, 512))
            bases.append(np.clip(picture, 0, 255).astype(np.uint8))
        self.images = torch.from_numpy(np.stack(bases))

    def __call__(self, engine, name):
        images = self.images

        def run_batch(items, on_step=None):
            return images[[i % len(images) for i in range(len(items))]]

        engine.run_batch = run_batch
        return engine


# ------------------------------------------------------------------ the parts, each in its own process


def part_write(args) -> dict:
    """images/s of generate's batch loop with instant sampling: real encoding, writes, journal."""
    from cxrgen.runs.generate import generate

    root = Path(args.root)
    bundle, text = models(root)
    path = manifest(root / "m.csv", args.write_images, 1)
    started = time.perf_counter()
    result = generate(config(root, path, bundle, text, batch_size=64, device="cpu"), engine_hook=Instant())
    total = time.perf_counter() - started
    sizes = [p.stat().st_size for p in list((root / "out" / "images").rglob("*.jpg"))[:200]]
    return {"write_images": result.written, "write_images_per_s": result.written / result.seconds,
            "write_total_s": total, "mean_jpeg_bytes": statistics.mean(sizes),
            "peak_memory_bytes": peak_memory_bytes()}


def build_run(root: Path, images: int) -> tuple:
    """A finished run of `images` planned images without sampling: tiny files, real journal, run.json."""
    import io

    import numpy as np
    from PIL import Image

    from cxrgen.files import file_check, write_json
    from cxrgen.manifests.workitems import load_plan
    from cxrgen.runs.generate import _pixel_settings, load_models
    from cxrgen.runs.journal import Journal
    from cxrgen.runs.loop import make_record
    from cxrgen.runs.record import run_record

    bundle, text_dir = models(root)
    cfg = config(root, manifest(root / "m.csv", images, ROWS_IMAGES), bundle, text_dir, device="cpu")
    m, plan = load_plan(cfg)
    loaded, text = load_models(cfg, bundle, "cpu")
    settings = _pixel_settings(cfg, m, plan, "float32", loaded.md5, text.fingerprint)
    out = Path(cfg.out)
    out.mkdir()
    write_json(out / "run.json", run_record(cfg, m, settings, loaded, ["cpu"]))
    tiny = io.BytesIO()
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tiny, format="JPEG", quality=95)
    data = tiny.getvalue()
    common = {"steps": 1, "scheduler": "ddim", "height": 512, "width": 512, "model_name": "m", "model_version": "1",
              "autoencoder_md5": "0" * 32, "diffusion_model_md5": "0" * 32, "text_encoder": str(text_dir),
              "dtype": "float32", "device_type": "cpu", "cxrgen_version": "bench", "worker": "main",
              "text_encoder_fingerprint": text.fingerprint}
    journal = Journal(out, "main")
    folders = set()
    chunk = []
    for item in plan:
        path = out / item.file_name
        if path.parent not in folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            folders.add(path.parent)
        path.write_bytes(data)  # no fsync: building the folder is not what is measured
        chunk.append({**make_record(item, common, {"token_count": 12, "truncated": False}), **file_check(data)})
        if len(chunk) == 10_000:
            journal.append(chunk)
            chunk = []
    journal.append(chunk)
    journal.close()
    return cfg, m, plan


def part_scale(args) -> dict:
    """Merge, resume start-up and status times on a finished run of args.images planned images."""
    import gc

    from cxrgen.manifests.workitems import load_plan
    from cxrgen.runs.generate import generate
    from cxrgen.runs.state import finalize_once, inspect_run

    root = Path(args.root)
    started = time.perf_counter()
    cfg, m, plan = build_run(root, args.images)
    build_s = time.perf_counter() - started
    out = Path(cfg.out)
    del plan
    gc.collect()
    # merge: what the last rank does once every image exists
    _, plan = load_plan(cfg)
    started = time.perf_counter()
    assert finalize_once(out, plan, m) is not None
    merge_s = time.perf_counter() - started
    del plan, m
    gc.collect()
    # resume start-up on the finished run: everything but sampling (there is nothing left to sample)
    started = time.perf_counter()
    result = generate(cfg)
    resume_s = time.perf_counter() - started
    assert result.complete and result.written == 0, result
    del result
    gc.collect()
    started = time.perf_counter()
    report = inspect_run(out)
    status_s = time.perf_counter() - started
    assert report.complete and report.done == args.images, (report.done, args.images)
    return {"planned_images": args.images, "build_s": build_s, "merge_s": merge_s, "resume_start_s": resume_s,
            "status_s": status_s, "peak_memory_bytes": peak_memory_bytes()}


def part_model(args) -> dict:
    """Seconds to load the full-size networks' checkpoints: meta-device build vs random init first."""
    import fake_model

    from cxrgen.model.bundle import load_bundle, read_spec
    from cxrgen.model.checkpoint import load_into, md5sum, read_state_dict

    root = Path(args.root)
    bundle = fake_model.build_bundle(root / "bundle", tiny=False)
    spec = read_spec(bundle)
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    def initialised_first():  # the previous way: build (random init), then load; the same md5 check
        for cls, kw, stem in ((AutoencoderKL, spec.autoencoder_args, "autoencoder"),
                              (DiffusionModelUNet, spec.unet_args, "diffusion_model")):
            model = cls(**kw)
            load_into(model, read_state_dict(spec.checkpoints[stem]), spec.checkpoints[stem])
        return {path.name: md5sum(path) for path in spec.checkpoints.values()}

    times = {"cxrgen": [], "init_first": []}
    for _ in range(args.repeats):
        for name, load in (("cxrgen", lambda: load_bundle(spec)), ("init_first", initialised_first)):
            started = time.perf_counter()
            load()
            times[name].append(time.perf_counter() - started)
    return {"model_load_s": statistics.median(times["cxrgen"]),
            "model_load_init_first_s": statistics.median(times["init_first"]),
            "model_load_speedup": statistics.median(times["init_first"]) / statistics.median(times["cxrgen"])}


def part_merge(args) -> dict:
    """The merge alone on a finished run of args.images planned images, in a fresh process: its peak memory.

    The folder is built here (records in the real format through cxrgen's Journal; every image a hard link to
    one tiny file, so ten million of them cost directory entries, not inodes or blocks); the merge then runs in
    a child process of its own: `finalize_run`, which walks the plan instead of holding it and streams the
    records into metadata.parquet row group by row group.
    """
    import io

    import numpy as np
    from PIL import Image

    from cxrgen.files import file_check, write_json
    from cxrgen.manifests.reader import read_manifest
    from cxrgen.manifests.workitems import iter_plan
    from cxrgen.runs.generate import _pixel_settings, load_models
    from cxrgen.runs.journal import Journal
    from cxrgen.runs.loop import make_record
    from cxrgen.runs.record import run_record

    root = Path(args.root)
    started = time.perf_counter()
    bundle, text_dir = models(root)
    cfg = config(root, manifest(root / "m.csv", args.images, ROWS_IMAGES), bundle, text_dir, device="cpu")
    m = read_manifest(cfg.manifest)
    plan = lambda: iter_plan(m.rows, seed=cfg.seed, num_images=cfg.num_images,  # noqa: E731
                             guidance_scale=cfg.guidance_scale, negative_prompt=cfg.negative_prompt,
                             image_format=cfg.image_format, file_names=cfg.file_names)
    loaded, text = load_models(cfg, bundle, "cpu")
    settings = _pixel_settings(cfg, m, range(args.images), "float32", loaded.md5, text.fingerprint)
    out = Path(cfg.out)
    out.mkdir()
    write_json(out / "run.json", run_record(cfg, m, settings, loaded, ["cpu"]))
    tiny = io.BytesIO()
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tiny, format="JPEG", quality=95)
    check = file_check(tiny.getvalue())
    sources: list[Path] = []  # one tiny file per LINKS_PER_FILE images (ext4 allows 65,000 links to a file)
    common = {"steps": 1, "scheduler": "ddim", "height": 512, "width": 512, "model_name": "m", "model_version": "1",
              "autoencoder_md5": "0" * 32, "diffusion_model_md5": "0" * 32, "text_encoder": str(text_dir),
              "dtype": "float32", "device_type": "cpu", "cxrgen_version": "bench", "worker": "main",
              "text_encoder_fingerprint": text.fingerprint}
    journal, chunk, folders = Journal(out, "main"), [], set()
    for number, item in enumerate(plan()):
        path = out / item.file_name
        if path.parent not in folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            folders.add(path.parent)
        if number % LINKS_PER_FILE == 0:
            sources.append(out / f"tiny-{len(sources)}.jpg")
            sources[-1].write_bytes(tiny.getvalue())
        os.link(sources[-1], path)
        chunk.append({**make_record(item, common, {"token_count": 12, "truncated": False}), **check})
        if len(chunk) == 10_000:
            journal.append(chunk)
            chunk = []
    journal.append(chunk)
    journal.close()
    for source in sources:
        source.unlink()
    build_s = time.perf_counter() - started
    done = subprocess.run([sys.executable, __file__, "--part", "merge-only", "--root", str(out)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the merge failed:\n{done.stderr[-3000:]}")
    return {"merge_images": args.images, "merge_build_s": build_s, **json.loads(done.stdout.strip().splitlines()[-1])}


def part_merge_only(args) -> dict:
    """finalize_run on the run in args.root (built by part_merge): seconds and this process's peak memory."""
    import pyarrow.parquet as pq

    from cxrgen.runs.generate import finalize_run

    started = time.perf_counter()
    path = finalize_run(args.root)
    seconds = time.perf_counter() - started
    assert path is not None, "not merged: an image or a record is missing"
    rows = pq.ParquetFile(path).metadata.num_rows
    return {"merge_only_s": seconds, "merge_rows": rows, "merge_peak_memory_bytes": peak_memory_bytes()}


PARTS = {"write": part_write, "scale": part_scale, "model": part_model, "merge": part_merge,
         "merge-only": part_merge_only}


def child(part: str, **options) -> dict:
    """Run one part in a fresh process and return its JSON line."""
    root = Path(tempfile.mkdtemp(prefix=f"cxrgen-bench-{part}-"))
    try:
        argv = [sys.executable, __file__, "--part", part, "--root", str(root)]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{part} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="10000,100000,1000000", help="planned images of the scale runs")
    parser.add_argument("--write-images", type=int, default=10_000, help="images through the write path")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the model-load comparison")
    parser.add_argument("--skip-model", action="store_true", help="leave out the full-size model-load comparison")
    parser.add_argument("--merge-images", type=int, default=10_000_000,
                        help="planned images of the merge-only row (0: leave it out)")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:  # inside a child process
        args.images = int(args.images) if args.part in ("scale", "merge") else args.images
        print(json.dumps(PARTS[args.part](args)))
        return
    write = child("write", write_images=args.write_images)
    print(f"write path: {write['write_images_per_s']:.0f} images/s ({write['write_images']} real-size JPEGs, "
          f"{write['mean_jpeg_bytes'] / 1e3:.0f} kB each), peak {write['peak_memory_bytes'] / 2**30:.2f} GiB",
          flush=True)
    results = []
    for size in (int(s) for s in args.images.split(",")):
        found = child("scale", images=size)
        results.append(found)
        print(f"{size:>9,} images: merge {found['merge_s']:.1f} s, resume start-up {found['resume_start_s']:.1f} s, "
              f"status {found['status_s']:.1f} s, peak {found['peak_memory_bytes'] / 2**30:.2f} GiB "
              f"(folder built in {found['build_s']:.0f} s)", flush=True)
    summary = {**results[-1], "write_images_per_s": write["write_images_per_s"],
               "write_peak_memory_bytes": write["peak_memory_bytes"], "cpu_count": os.cpu_count(),
               "sizes": results}
    if args.merge_images:
        merge = child("merge", images=args.merge_images)
        print(f"{merge['merge_images']:>9,} images: merge alone (finalize_run, streamed) {merge['merge_only_s']:.1f} s, "
              f"peak {merge['merge_peak_memory_bytes'] / 2**30:.2f} GiB (folder built in {merge['merge_build_s']:.0f} s: "
              "tiny hard-linked images)", flush=True)
        summary.update(merge)
    if not args.skip_model:
        model = child("model", repeats=args.repeats)
        print(f"full-size model load: {model['model_load_s']:.2f} s built on the meta device vs "
              f"{model['model_load_init_first_s']:.2f} s initialised first ({model['model_load_speedup']:.1f}x)",
              flush=True)
        summary.update(model)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
