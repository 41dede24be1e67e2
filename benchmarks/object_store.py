#!/usr/bin/env python
"""cxrgen's object-store path against an S3-compatible server on the loopback (moto's server, its own process).

Two parts, each with its baseline measured in the same run:

  write      cxrgen.runs.generate.generate with an engine stand-in that returns ready-made 512 x 512 images
             instantly (bookkeeping.py's Instant), once into a local folder and once into s3://bench/run:
             JPEG encoding, one PUT per image, one record object per batch, the merge. images/s of the batch
             loop = the write path's ceiling per process (issue 21's target: >= 100 images/s, 8 GPUs' worth).
  listing    a prefix holding the records of N images (one record object per batch, real record lines) and
             their image objects, then resume start-up's look at it: the records read
             (cxrgen.runs.journal.read_records), the image objects listed (the quick size check) and both
             together (cxrgen.runs.state.done_items), against the same on a local folder.

moto is a Python server and the slower side of the wire here: real S3 or MinIO take PUTs faster and in
parallel. The last line printed is one JSON object.

    python benchmarks/object_store.py                            # 2,000 images written, 100k records listed
    python benchmarks/object_store.py --write-images 500 --records 10000
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BATCH = 8  # images per batch, so per record object, in the listing part (a GPU batch of 8)


def start_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (not sharing this process's GIL), on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("moto's server did not start (pip install 'moto[server]')")
            time.sleep(0.2)
    return server, endpoint


def client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def part_write(root: Path, endpoint: str, images: int) -> dict:
    """images/s of the batch loop into a local folder and into the bucket, same images, same process."""
    from bookkeeping import Instant, config, manifest, models

    from cxrgen.runs.generate import generate

    bundle, text = models(root)
    path = manifest(root / "m.csv", images, 1)
    client(endpoint).create_bucket(Bucket="bench")
    hook, rates = Instant(), {}
    for name, out in (("local", str(root / "out")), ("s3", "s3://bench/run")):
        cfg = config(root, path, bundle, text, batch_size=BATCH * 4, device="cpu")
        cfg = type(cfg).from_dict({**cfg.to_dict(), "out": out})
        started = time.perf_counter()
        result = generate(cfg, engine_hook=hook)
        assert result.complete and result.written == images, result
        rates[name] = {"images_per_s": result.written / result.seconds, "total_s": time.perf_counter() - started}
    return {"write_images": images, "local_images_per_s": rates["local"]["images_per_s"],
            "s3_images_per_s": rates["s3"]["images_per_s"], "local_total_s": rates["local"]["total_s"],
            "s3_total_s": rates["s3"]["total_s"]}


def _records(plan, common: dict, data: bytes) -> list[bytes]:
    """One record object's bytes per batch of BATCH images, in the real record format."""
    from cxrgen.files import file_check
    from cxrgen.runs.loop import make_record

    check = file_check(data)
    lines = [json.dumps({**make_record(item, common, {"token_count": 12, "truncated": False}), **check}) + "\n"
             for item in plan]
    return ["".join(lines[i:i + BATCH]).encode() for i in range(0, len(lines), BATCH)]


def part_listing(root: Path, endpoint: str, records: int) -> dict:
    """Resume start-up's look at N recorded images: in the bucket and in a local folder."""
    import io

    import numpy as np
    from bookkeeping import ROWS_IMAGES, config, manifest, models
    from PIL import Image

    from cxrgen.manifests.workitems import load_plan
    from cxrgen.runs.journal import read_records
    from cxrgen.runs.state import CHECK_FIELDS, done_items
    from cxrgen.storage.objects import share_folder
    from cxrgen.storage.open import open_store

    bundle, text = models(root)
    cfg = config(root, manifest(root / "m.csv", records, ROWS_IMAGES), bundle, text)
    _, plan = load_plan(cfg)
    tiny = io.BytesIO()
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tiny, format="JPEG", quality=95)
    data = tiny.getvalue()
    common = {"steps": 1, "scheduler": "ddim", "height": 512, "width": 512, "model_name": "m", "model_version": "1",
              "autoencoder_md5": "0" * 32, "diffusion_model_md5": "0" * 32, "text_encoder": "t", "dtype": "float32",
              "device_type": "cpu", "cxrgen_version": "bench", "worker": "main", "text_encoder_fingerprint": "f"}
    batches = _records(plan, common, data)
    # the bucket: record objects as the batch loop names them, the image objects
    s3 = client(endpoint)
    s3.create_bucket(Bucket="listing")
    folder = f"run/.cxrgen/records/{share_folder((0, 1))}"
    puts = [(f"{folder}/20260101T000000-bench00-main-{i + 1:08d}.jsonl", body) for i, body in enumerate(batches)]
    puts += [(f"run/{item.file_name}", data) for item in plan]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket="listing", Key=kv[0], Body=kv[1]), puts))
    seed_s = time.perf_counter() - started
    # the same run in a local folder: one journal part, the image files
    local = root / "local"
    (local / ".cxrgen" / "records").mkdir(parents=True)
    (local / ".cxrgen" / "records" / "part-main.jsonl").write_bytes(b"".join(batches))
    for item in plan:
        (local / item.file_name).parent.mkdir(parents=True, exist_ok=True)
        (local / item.file_name).write_bytes(data)
    found = {}
    for name, where in (("s3", "s3://listing/run"), ("local", local)):
        store = open_store(where)
        started = time.perf_counter()
        recorded = read_records(store, CHECK_FIELDS)
        records_s = time.perf_counter() - started
        started = time.perf_counter()
        sizes = store.sizes([item.file_name for item in plan])
        sizes_s = time.perf_counter() - started
        started = time.perf_counter()
        done = done_items(store, plan)
        done_s = time.perf_counter() - started
        assert len(recorded) == len(plan) and None not in sizes and len(done) == len(plan)
        found[name] = {"read_records_s": records_s, "list_images_s": sizes_s, "done_items_s": done_s}
    return {"records": len(plan), "record_objects": len(batches), "seed_s": seed_s,
            **{f"{store}_{key}": value for store, times in found.items() for key, value in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-images", type=int, default=2000, help="images through the write path")
    parser.add_argument("--records", type=int, default=100_000, help="recorded images in the listing part")
    args = parser.parse_args()
    server, endpoint = start_server()
    try:
        with tempfile.TemporaryDirectory(prefix="cxrgen-bench-s3-") as folder:
            write = part_write(Path(folder) / "write", endpoint, args.write_images)
        print(f"write path: {write['s3_images_per_s']:.0f} images/s into the bucket vs "
              f"{write['local_images_per_s']:.0f} images/s into a local folder ({args.write_images} 512 x 512 "
              "JPEGs, one process)", flush=True)
        with tempfile.TemporaryDirectory(prefix="cxrgen-bench-s3-") as folder:
            listing = part_listing(Path(folder) / "listing", endpoint, args.records)
        print(f"resume start-up look at {listing['records']:,} recorded images ({listing['record_objects']:,} record "
              f"objects): bucket {listing['s3_done_items_s']:.1f} s (records {listing['s3_read_records_s']:.1f} s, "
              f"image listing {listing['s3_list_images_s']:.1f} s) vs local folder {listing['local_done_items_s']:.1f} s",
              flush=True)
    finally:
        server.terminate()
        server.wait(30)
    print(json.dumps({**write, **listing, "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
