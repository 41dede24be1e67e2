"""`cxrgen download --demo DIR` (issue 19, item 14): the demo model runs the whole pipeline through the commands it
prints, and every output says its images are noise."""
from __future__ import annotations

import json
import shlex
import tarfile

import pyarrow.parquet as pq
import tiny_eval as te
from helpers import assert_input_error
from PIL import Image
from typer.testing import CliRunner

from cxrgen.cli import app
from cxrgen.model.demo import DEMO_NAME, DEMO_VERSION
from cxrgen.provenance import read_provenance

runner = CliRunner()


def test_the_demo_runs_every_printed_command_and_every_output_says_noise(tmp_path, one_torch_thread):
    kit = tmp_path / "demo"
    made = runner.invoke(app, ["download", "--demo", str(kit)])
    assert made.exit_code == 0, made.output
    assert "noise" in made.stdout.splitlines()[0]
    commands = [shlex.split(line.strip()) for line in made.stdout.splitlines() if line.startswith("  cxrgen ")]
    assert [c[1] for c in commands] == ["generate", "status", "preview", "export"]
    printed = {}
    for command in commands:  # exactly as a user would paste them
        result = runner.invoke(app, command[1:])
        assert result.exit_code == 0, (command, result.output)
        printed[command[1]] = result.stdout + result.stderr
    out = kit / "out"
    # the run, its table and each image's own marker name the demo model
    assert "DEMO MODEL" in printed["generate"] and "noise" in printed["generate"]
    assert json.loads((out / "run.json").read_text())["resolved"]["demo"] is True
    meta = pq.read_table(out / "metadata.parquet").to_pylist()
    assert len(meta) == 8 and {(r["model_name"], r["model_version"]) for r in meta} == {(DEMO_NAME, DEMO_VERSION)}
    marker = read_provenance(out / meta[0]["file_name"])
    assert "noise" in json.dumps(marker)
    with Image.open(out / meta[0]["file_name"]) as image:
        assert image.size == (64, 64)
    # status, the card, the gallery and the exported shards' card
    assert "DEMO (random weights): every image of this run is noise" in printed["status"]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "# Demo dataset: random noise, not chest X-rays" in card and "**Every image here is noise.**" in card
    assert "pretty_name: cxrgen demo (random noise" in card and "- chest-x-ray" not in card
    page = (out / "preview" / "index.html").read_text(encoding="utf-8")
    assert '"demo":true' in page
    shards = kit / "shards"
    assert "**Every image here is noise.**" in (shards / "README.md").read_text(encoding="utf-8")
    with tarfile.open(shards / "train-000000.tar") as tar:
        row = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    assert row["model_name"] == DEMO_NAME
    # evaluate (optional in the demo: it needs the evaluator's weights; here a random-weight one)
    weights = te.save_release(tmp_path / "weights" / te.RELEASE_FILE)
    result = runner.invoke(app, ["evaluate", str(out), "--evaluator-weights", str(weights), "--max-pairs", "0",
                                 "--cache-dir", str(tmp_path / "home")])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("DEMO MODEL: these images are noise")
    assert json.loads((out / "quality" / "summary.json").read_text())["demo_model"] is True
    assert "**Demo model: every image of this run is noise.**" in (out / "quality" / "report.md").read_text()
    # the same folder again: rebuilt in place, the run kept
    assert runner.invoke(app, ["download", "--demo", str(kit), "--quiet"]).exit_code == 0
    assert (out / "metadata.parquet").is_file()


def test_the_demo_never_writes_into_a_folder_of_other_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert_input_error(runner.invoke(app, ["download", "--demo", str(folder)]), f"--demo {folder}", "new folder")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert_input_error(runner.invoke(app, ["download", "--demo", str(tmp_path / "new"), "--evaluator"]),
                       "--demo", "--evaluator")
    assert not (tmp_path / "new").exists()
