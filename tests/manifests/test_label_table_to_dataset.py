"""The path of issue 9 end to end on the tiny bundle: label table -> `cxrgen manifest from-labels` -> `cxrgen plan`
-> `cxrgen generate` -> examples/train_classifier.py for one step, real-only and real + synthetic."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from helpers import check_labels_match_prompts, table_with
from PIL import Image
from typer.testing import CliRunner

from cxrgen.cli import app
from cxrgen.manifests.templates import load_templates
from cxrgen.manifests.tokens import load_counter
from cxrgen.runs.card import front_matter

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_classifier.py"
FINDINGS = ["Edema", "Pneumothorax", "Cardiomegaly"]


def load_example():
    spec = importlib.util.spec_from_file_location("train_classifier", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def real_set(folder: Path, name: str, count: int, seed: int) -> Path:
    """Random 32 x 32 grayscale PNGs and a label table with a path column relative to it; both classes per finding."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        path = f"images/{name}{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / path)
        rows.append({"Path": path, "Edema": ["1.0", "0.0", ""][i % 3], "Pneumothorax": ["1.0", "", "-1.0"][i % 3 - 1],
                     "Cardiomegaly": "1" if i % 2 else "0"})
    table = folder / f"{name}.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def test_label_table_to_trained_classifier(tmp_path, bundle_dir, text_encoder_dir, one_torch_thread):
    # 1. a manifest from a (tiny) real label table; one extra row whose id starts like a dataset split name
    labels = table_with(tmp_path / "labels.csv", {("Edema",): 2, ("Edema", "Cardiomegaly"): 1, ("Pneumothorax",): 1},
                        FINDINGS)
    manifest = tmp_path / "aug.csv"
    result = runner.invoke(app, ["manifest", "from-labels", str(labels), "--target", "3", "--normals", "1",
                                 "-o", str(manifest)])
    assert result.exit_code == 0, result.output + result.stderr
    with open(manifest, "a") as handle:
        handle.write("test-001,No acute cardiopulmonary process.,1,0,0,0,1,normal-1\n")
    # 2. plan, then generate with the tiny bundle
    planned = runner.invoke(app, ["plan", str(manifest), "--device", "cpu", "--steps", "1"])
    assert planned.exit_code == 0, planned.output
    out = tmp_path / "aug_out"
    made = runner.invoke(app, ["generate", str(manifest), "--out", str(out), "--model", str(bundle_dir),
                               "--text-encoder", str(text_encoder_dir), "--steps", "1", "--image-format", "png",
                               "--batch-size", "4", "--quiet"])
    assert made.exit_code == 0, made.output + made.stderr
    metadata = pq.read_table(out / "metadata.parquet").to_pandas()
    images = int(pd.read_csv(manifest)["num_images"].sum())
    assert len(metadata) == images
    assert f"images:      {images} from" in planned.output
    # the dataset's label columns match its prompts
    templates = load_templates(None, load_counter())
    check_labels_match_prompts(metadata, templates, {f: f for f in FINDINGS + ["No Finding"]})
    assert metadata["template_id"].notna().all()

    # 3. what `cxrgen evaluate` leaves behind: scores.parquet, and PNG plots in OUT/quality/
    (out / "quality").mkdir()
    accepted = [i != 0 for i in range(len(metadata))]
    pq.write_table(pa.table({"image_id": metadata["image_id"].tolist(), "accepted": accepted}),
                   out / "quality" / "scores.parquet")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(out / "quality" / "ms_ssim.png")

    # 4. the example, one step per setting at 64 x 64
    train, test = real_set(tmp_path / "real", "train", 9, 0), real_set(tmp_path / "real", "test", 6, 1)
    report = tmp_path / "results.json"
    example = load_example()
    results = example.main(["--real", str(train), "--test", str(test), "--synthetic", str(out), "--only-accepted",
                            "--max-steps", "1", "--epochs", "1", "--image-size", "64", "--batch-size", "4",
                            "--workers", "0", "--cache-dir", str(tmp_path / "hf-cache"), "--report", str(report)])
    assert results["findings"] == ["Cardiomegaly", "Edema", "Pneumothorax"]
    assert set(results["settings"]) == {"real_only", "real_plus_synthetic"}
    assert results["settings"]["real_only"]["train_images"] == 9
    assert results["settings"]["real_plus_synthetic"]["train_images"] == 9 + images - 1  # one image not accepted
    for setting in results["settings"].values():
        assert setting["steps"] == 1
        assert set(setting["auroc"]) == set(results["findings"])
        assert all(0.0 <= v <= 1.0 for v in setting["auroc"].values())
    assert json.loads(report.read_text()) == results


def test_two_commands_give_every_finding_its_target_in_verified_images(tmp_path, bundle_dir, text_encoder_dir,
                                                                       verifier_file, one_torch_thread):
    """Issue 20's tour: `manifest from-labels --target N` then `generate --verify`: every finding the model draws at
    the threshold (not named rare) reaches N positives, real ones plus synthetic images the verifier confirmed."""
    from cxrgen.runs.state import inspect_run

    labels = table_with(tmp_path / "labels.csv", {("Edema",): 1, ("Cardiomegaly",): 1}, FINDINGS)
    manifest = tmp_path / "aug.csv"
    made = runner.invoke(app, ["manifest", "from-labels", str(labels), "--target", "3", "--max-findings", "1",
                               "-o", str(manifest)])
    assert made.exit_code == 0, made.output
    out = tmp_path / "aug_out"
    made = runner.invoke(app, ["generate", str(manifest), "--out", str(out), "--model", str(bundle_dir),
                               "--text-encoder", str(text_encoder_dir), "--steps", "1", "--batch-size", "4", "--quiet",
                               "--verify", "--verifier-weights", str(verifier_file), "--max-attempts", "60"])
    assert made.exit_code == 0, made.output + made.stderr
    metadata = pq.read_table(out / "metadata.parquet").to_pandas()
    real = pd.read_csv(labels)
    stats = inspect_run(out).verification
    drawn = [f for f in FINDINGS if f not in stats["rare"]]
    assert drawn, stats  # a verifier that accepts nothing would prove nothing here
    for finding in FINDINGS:
        verified = int(((metadata[finding] == 1) & metadata["verified"].eq(True)).sum())
        assert stats["findings"][finding]["verified"] == verified
        if finding in drawn:
            assert int((real[finding] == 1).sum()) + verified >= 3, (finding, stats["findings"][finding])
        else:
            assert stats["findings"][finding]["acceptance"] < 0.1


def test_the_loader_reads_every_labelled_image_despite_split_names(tmp_path):
    """load_synthetic() loads the folder by its card, so `quality/` and ids like `test-001` stay in the one split."""
    out = tmp_path / "out"
    (out / "images" / "00000").mkdir(parents=True)
    (out / "quality").mkdir()
    names = ["test-001_0000", "val-002_0000", "edema-00001_0000"]
    for name in names:
        Image.fromarray(np.full((8, 8), 50, dtype=np.uint8)).save(out / "images" / "00000" / f"{name}.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(out / "quality" / "ms_ssim.png")
    pq.write_table(pa.table({"image_id": names, "file_name": [f"images/00000/{n}.png" for n in names],
                             "Edema": [0, 0, 1]}), out / "metadata.parquet")
    (out / "README.md").write_text(front_matter("png"), encoding="utf-8")  # the part of the card that pins the split
    dataset = load_example().load_synthetic(out, cache_dir=str(tmp_path / "hf-cache"))
    assert dataset["image_id"][:] == names and dataset["Edema"][:] == [0, 0, 1]
    assert dataset[2]["image"].size == (8, 8)
