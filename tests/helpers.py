"""Helpers that several test files use: one copy each (test files never import one another).

Fixtures live in the conftest.py of the folder that uses them; these are plain functions and constants.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from cxrgen.cli import app
from cxrgen.manifests.templates import keyword_pattern

# ------------------------------------------------------------------ the command line

def run_args(manifest: Path, bundle_dir: Path, text_encoder_dir: Path, tmp_path: Path, *extra) -> list:
    return ["generate", manifest, "--model", bundle_dir, "--text-encoder", text_encoder_dir, "--steps", "1",
            "--cache-dir", tmp_path / "cache", "--quiet", *extra]


def assert_input_error(result, *words: str) -> str:
    """Exit code 2 and exactly one line on stderr, starting 'cxrgen: error:'; returns that line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cxrgen: error: "), lines[0]
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ------------------------------------------------------------------ a small finished run (export, provenance)

# Row ids that hold split keywords (test, val, dev, eval) and a dot: none may create a split or a dotted key.
SMALL_RUN_MANIFEST = ("id,prompt,Edema,view,num_images\n"
            "test-3,Small left pleural effusion,1,PA,2\n"
            "val.x,Enlarged heart <script>alert(1)</script>,0,AP,1\n"
            "dev_eval,No acute cardiopulmonary process,,PA,1\n"
            "p4,Right lower lobe opacity,1,,1\n")


def make_small_run(root: Path, bundle_dir: Path, text_encoder_dir: Path, image_format: str = "jpg", *extra) -> Path:
    """A finished tiny run of SMALL_RUN_MANIFEST (5 images) in root/out; extra: more generate options."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "m.csv").write_text(SMALL_RUN_MANIFEST, encoding="utf-8")
    result = CliRunner().invoke(app, [str(a) for a in ("generate", root / "m.csv", "--out", root / "out", "--model", bundle_dir, "--text-encoder",
                    text_encoder_dir, "--steps", "1", "--cache-dir", root / "cache", "--image-format", image_format,
                    "--quiet", *extra)])
    assert result.exit_code == 0, result.output
    return root / "out"


# ------------------------------------------------------------------ label tables (from-labels)

# A sentence that denies rather than asserts: what a finding labelled 0 may appear in
NEGATION = re.compile(r"\b(no|not|without|normal|clear|unremarkable)\b", re.IGNORECASE)


def write_table(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def table_with(path: Path, combos: dict[tuple[str, ...], int], findings: list[str], extra: bool = True) -> Path:
    """A label table with `count` rows positive for exactly each combination (others 0.0 or blank)."""
    rows = []
    for combo, count in combos.items():
        for i in range(count):
            cells = ["1.0" if f in combo else ("0.0" if i % 2 else "") for f in findings]
            rows.append(([f"p{len(rows):05d}/view1_frontal.jpg", "F"] if extra else []) + cells)
    return write_table(path, (["Path", "Sex"] if extra else []) + findings, rows)


def check_labels_match_prompts(frame: pd.DataFrame, templates, columns: dict[str, str]) -> None:
    """Every finding labelled 1 is named in a sentence that asserts; one labelled 0 only in sentences that deny."""
    patterns = {f: keyword_pattern(templates.keywords[f]) for f in templates.findings}
    for record in frame.to_dict("records"):
        sentences = re.split(r"(?<=\.)\s+", record["prompt"])
        for column, finding in columns.items():
            if finding == templates.normal:
                continue
            mentions = [s for s in sentences if patterns[finding].search(s)]
            if record[column] == 1:
                assert any(not NEGATION.search(s) for s in mentions), (column, record["prompt"])
            else:
                assert all(NEGATION.search(s) for s in mentions), (column, record["prompt"])
        if templates.normal in columns.values():
            normal_column = next(c for c, f in columns.items() if f == templates.normal)
            others = [c for c, f in columns.items() if f != templates.normal]
            if record[normal_column] == 1:
                assert all(record[c] == 0 for c in others), record
                assert all(NEGATION.search(s) for s in sentences), record["prompt"]


# ------------------------------------------------------------------ the preview run (preview, gallery)

SCRIPT_PROMPT = '<script>alert(1)</script><img src=x onerror="window.pwned=1"> left pleural effusion'
QUOTES_PROMPT = 'Heart size "quotes" & ampersands </script> normal'
NORMAL_PROMPT = "Normal chest radiograph."
# Rows c and d share a prompt (one group, one sheet) but not a label value.
MANIFEST_ROWS = [("a", SCRIPT_PROMPT, 1, 2), ("b", QUOTES_PROMPT, 0, 2), ("c", NORMAL_PROMPT, 0, 2),
                 ("d", NORMAL_PROMPT, 1, 1)]
PROMPTS = [SCRIPT_PROMPT, QUOTES_PROMPT, NORMAL_PROMPT]


def preview(*args):
    return CliRunner().invoke(app, ["preview", *map(str, args)])


def write_preview_manifest(path: Path) -> Path:
    lines = ["id,prompt,Pleural Effusion,num_images"]
    for row_id, prompt, label, count in MANIFEST_ROWS:
        lines.append(f'{row_id},"{prompt.replace(chr(34), chr(34) * 2)}",{label},{count}')
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ the resume manifest (runs)

RESUME_MANIFEST = "prompt,label\nbig heart,1\nsmall lung,0\nclear chest,1\n"
PLANNED = 6  # 3 rows x 2 images, 3 batches of 2: "mid-batch" and "between batches" are different instants


# ------------------------------------------------------------------ a verified run made directly (gallery)

def make_verified_folder(out: Path) -> Path:
    """A finished `--verify` run folder written directly, no model: 3 images, verified true / false / null.

    img0 (Pneumothorax 1) was accepted at its second attempt, img1 (Pneumothorax 1) rejected twice (the best kept,
    verified false), img2 (no positive label) made once, not verified; the journals say so, as a run writes them.
    """
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    ids = ["img0_0000", "img1_0000", "img2_0000"]
    names = [f"images/00000/{i:08d}.jpg" for i in range(3)]
    for i, name in enumerate(names):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), 40 + 60 * i, dtype=np.uint8)).save(out / name)
    verified, attempts, scores = [True, False, None], [1, 0, 0], [0.7, 0.4, None]
    pq.write_table(pa.table({"image_id": ids, "file_name": names, "prompt": ["left pneumothorax"] * 2 + ["clear"],
                             "seed": [1, 2, 3], "attempt": pa.array(attempts, pa.int64()),
                             "verified": pa.array(verified, pa.bool_()), "verify_score": pa.array(scores, pa.float64()),
                             "Pneumothorax": [1, 1, 0]}), out / "metadata.parquet")
    block = {"min_score": 0.5, "max_attempts": 2, "verify_negatives": False, "keep_rejected": False,
             "release": "densenet121-res224-chex", "weights_file": "w.pt", "weights_sha256": "0" * 64,
             "findings": {"Pneumothorax": "Pneumothorax"}}
    run = {"config": {"out": str(out)}, "settings": {"planned_images": 3, "verify": block},
           "verification": {"weights": "w.pt", "planned": {"Pneumothorax": 2}, "not_verified_images": 1,
                            "unverified_columns": {}}}
    (out / "run.json").write_text(json.dumps(run))
    tried = [("img0_0000", 0, 0.3, False), ("img0_0000", 1, 0.7, True), ("img1_0000", 0, 0.4, False),
             ("img1_0000", 1, 0.2, False)]
    lines = [{"image_id": i, "attempt": j, "verify_score": s, "accepted": a, "positives": ["Pneumothorax"],
              "passed": ["Pneumothorax"] if a else [], "scores": {"Pneumothorax": s}} for i, j, s, a in tried]
    kept = [{"image_id": i, "file_name": n, "attempt": a, "verified": v} for i, n, a, v in
            zip(ids, names, attempts, verified)]
    for folder, records in ((".cxrgen/attempts", lines), (".cxrgen/records", kept)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / "part-main.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


# ------------------------------------------------------------------ runs in a bucket (object-store tests)

def upload_run(folder: Path, s3, prefix: str = "run") -> str:
    """Copy a local run folder into a new bucket of the loopback S3 server (the same layout); returns its URL."""
    import boto3
    from s3_server import CREDENTIALS

    bucket = s3.bucket()
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                          aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


def bucket_objects(s3, url: str) -> dict[str, bytes]:
    """Every object under an s3:// URL, by key relative to it."""
    import boto3
    from s3_server import CREDENTIALS

    bucket, _, prefix = url[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                          aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            found[item["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


# ------------------------------------------------------------------ the five-prompt run of the workers and Ray tests

FIVE_PROMPTS = ["Pleural effusion", "Left pneumothorax", "No acute findings", "Cardiomegaly", "Lobar pneumonia"]
VOLATILE = ["created_at", "worker"]  # metadata columns that differ between equal runs


def five_prompt_manifest(folder: Path) -> Path:
    """m.csv: the five prompts with a label column `finding`."""
    import pandas as pd

    path = folder / "m.csv"
    pd.DataFrame({"prompt": FIVE_PROMPTS, "finding": [1, 0, 0, 1, 1]}).to_csv(path, index=False)
    return path


def five_prompt_config(manifest, out, bundle_dir, text_encoder_dir, **kw):
    """A RunConfig of 2 PNG images per prompt at 2 steps in batches of 2; kw overrides any field."""
    from cxrgen.config import RunConfig

    options = dict(steps=2, num_images=2, batch_size=2, image_format="png", quiet=True)
    return RunConfig(manifest=str(manifest), out=str(out), model=str(bundle_dir), text_encoder=str(text_encoder_dir),
                     **{**options, **kw})

