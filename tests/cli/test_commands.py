"""The command line: help, a real tiny run, default output folder, and every bad input's one-line error."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer.main
from helpers import assert_input_error, run_args
from PIL import Image
from typer.testing import CliRunner

import cxrgen
from cxrgen.cli import app
from cxrgen.model import demo

# Every column issue 2 asks metadata.parquet to have, in cxrgen's names.
METADATA_COLUMNS = [
    "image_id", "file_name", "prompt", "negative_prompt", "manifest_row", "row_id", "sample_index", "seed",
    "guidance_scale", "steps", "scheduler", "height", "width", "model_name", "model_version", "autoencoder_md5",
    "diffusion_model_md5", "text_encoder", "dtype", "device_type", "cxrgen_version", "token_count", "truncated",
    "created_at",
]
LONG_PROMPT = " ".join(["opacity"] * 90)



def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])




def seed_rule(base: int, key: str, k: int) -> int:
    digest = hashlib.sha256(f"cxrgen-seed:{base}:{key}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1




def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def manifest(tmp_path) -> Path:
    path = tmp_path / "reports.csv"
    path.write_text(
        "id,prompt,finding,score,num_images\n"
        "p1,Small left pleural effusion,1,0.75,2\n"
        f"p2,{LONG_PROMPT},0,,\n"
    )
    return path


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["generate"], ["resume"], ["status"]])
def test_help_lists_every_option(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    click_command = typer.main.get_command(app)
    if command:
        click_command = click_command.commands[command[0]]
    options = [p for p in click_command.params if p.param_type_name == "option"]
    assert options
    for option in options:
        for name in option.opts + option.secondary_opts:
            assert name in result.output, f"{name} missing from {' '.join(command)} --help"
        assert option.help, f"{option.opts[0]} has no help text"
    if not command:
        for sub in ("generate", "resume", "status"):
            assert sub in result.output
        assert "research use only" in result.output.replace("\n", " ")


def test_generate_help_documents_the_manifest_options():
    names = {o for p in typer.main.get_command(app).commands["generate"].params for o in p.opts}
    for flag in ("--out", "-o", "--manifest-format", "--prompt-column", "--allow-empty-prompt", "--model",
                 "--text-encoder", "--num-images", "--guidance-scale", "--negative-prompt", "--seed", "--steps",
                 "--batch-size", "--device", "--dtype", "--image-format", "--jpeg-quality", "--quiet"):
        assert flag in names, flag


def test_version_and_python_dash_m():
    result = invoke("--version")
    assert result.exit_code == 0 and cxrgen.__version__ in result.output
    proc = subprocess.run([sys.executable, "-m", "cxrgen", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and cxrgen.__version__ in proc.stdout


# --------------------------------------------------------------------------- a real tiny run


def test_generate_makes_images_metadata_and_run_json(tmp_path, manifest, bundle_dir, text_encoder_dir):
    out = tmp_path / "out"
    result = invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out, "--seed", "5",
                              "--image-format", "png", "--guidance-scale", "3.5", "--negative-prompt", "blurry"))
    assert result.exit_code == 0, result.output

    table = pq.read_table(out / "metadata.parquet")
    missing = [c for c in METADATA_COLUMNS if c not in table.column_names]
    assert not missing, missing
    assert table.num_rows == 3
    assert table.column_names[-2:] == ["finding", "score"]  # the pass-through labels come last
    assert pa.types.is_integer(table.schema.field("finding").type)
    assert pa.types.is_floating(table.schema.field("score").type)
    rows = table.to_pylist()
    assert [(r["row_id"], r["sample_index"], r["manifest_row"]) for r in rows] == [("p1", 0, 1), ("p1", 1, 1),
                                                                                   ("p2", 0, 2)]
    assert [r["seed"] for r in rows] == [seed_rule(5, "id=p1", 0), seed_rule(5, "id=p1", 1), seed_rule(5, "id=p2", 0)]
    assert [r["finding"] for r in rows] == [1, 1, 0] and [r["score"] for r in rows] == [0.75, 0.75, None]
    ae_md5 = hashlib.md5((bundle_dir / "models" / "autoencoder.pth").read_bytes()).hexdigest()
    unet_md5 = hashlib.md5((bundle_dir / "models" / "diffusion_model.pth").read_bytes()).hexdigest()
    for r in rows:
        assert (r["guidance_scale"], r["negative_prompt"], r["steps"], r["scheduler"]) == (3.5, "blurry", 1, "ddim")
        assert (r["height"], r["width"]) == (32, 32)
        assert (r["model_name"], r["model_version"]) == ("tiny_cxr_bundle", "1.0.1")
        assert (r["autoencoder_md5"], r["diffusion_model_md5"]) == (ae_md5, unet_md5)
        assert r["text_encoder"] == str(text_encoder_dir)
        assert (r["dtype"], r["device_type"], r["cxrgen_version"]) == ("float32", "cpu", cxrgen.__version__)
        assert datetime.fromisoformat(r["created_at"]).tzinfo is not None
        # file_name is relative to OUT and points at an 8-bit grayscale image of the bundle's size
        assert not Path(r["file_name"]).is_absolute() and r["file_name"].startswith("images/")
        assert r["file_name"].endswith(".png")
        with Image.open(out / r["file_name"]) as image:
            assert image.mode == "L" and image.size == (32, 32)
    assert rows[0]["prompt"] == "Small left pleural effusion"
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / "fixtures" / "sd2-tokenizer"))
    count = len(tokenizer("Small left pleural effusion")["input_ids"])
    assert (rows[0]["token_count"], rows[0]["truncated"]) == (count, False)
    assert rows[2]["prompt"] == LONG_PROMPT and rows[2]["truncated"] is True
    assert rows[2]["token_count"] == len(tokenizer(LONG_PROMPT)["input_ids"]) > 77
    assert len(list((out / "images").rglob("*.png"))) == 3

    run = json.loads((out / "run.json").read_text())
    config = run["config"]
    assert (config["steps"], config["seed"], config["guidance_scale"], config["image_format"]) == (1, 5, 3.5, "png")
    assert config["manifest"] == str(manifest.resolve()) and config["out"] == str(out.resolve())
    assert config["model"] == str(bundle_dir) and config["text_encoder"] == str(text_encoder_dir)
    assert run["manifest"]["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert run["settings"]["manifest_sha256"] == run["manifest"]["sha256"]
    assert run["settings"]["planned_images"] == 3
    versions = run["versions"]
    for package in ("python", "torch", "monai", "transformers", "pyarrow", "pandas", "numpy"):
        assert versions.get(package), package
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert run["cxrgen_version"] == cxrgen.__version__


def test_default_out_is_beside_the_manifest_named_after_it(tmp_path, bundle_dir, text_encoder_dir):
    manifest = tmp_path / "data" / "chexpert_effusion.csv"
    manifest.parent.mkdir()
    manifest.write_text("prompt\nSmall effusion\n")
    result = invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path))
    assert result.exit_code == 0, result.output
    out = tmp_path / "data" / "chexpert_effusion"
    assert pq.read_table(out / "metadata.parquet").num_rows == 1
    assert json.loads((out / "run.json").read_text())["config"]["out"] == str(out.resolve())


def test_default_out_of_a_manifest_without_suffix(tmp_path, bundle_dir, text_encoder_dir):
    manifest = tmp_path / "reports"
    manifest.write_text("prompt\nSmall effusion\n")
    result = invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "--manifest-format", "csv"))
    assert result.exit_code == 0, result.output
    assert manifest.is_file() and (tmp_path / "reports_out" / "metadata.parquet").is_file()


def test_progress_and_summary_go_to_stderr_into_an_empty_existing_folder(tmp_path, bundle_dir, text_encoder_dir):
    manifest = _write(tmp_path / "m.csv", GOOD)
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is a fine place for a new run
    args = [a for a in run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out) if a != "--quiet"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # stdout stays clean for scripts
    assert "2 image" in result.stderr
    assert pq.read_table(out / "metadata.parquet").column("row_id").to_pylist() == ["a", "b"]


def test_allow_empty_prompt_through_cli(tmp_path, bundle_dir, text_encoder_dir):
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt,label\n,a\nEffusion,b\n")
    out = tmp_path / "out"
    assert_input_error(invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out)),
                       "row 1, column prompt", "--allow-empty-prompt")
    assert not out.exists()
    result = invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out, "--allow-empty-prompt"))
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out / "metadata.parquet").to_pylist()
    assert [(r["prompt"], r["label"]) for r in rows] == [("", "a"), ("Effusion", "b")]


# --------------------------------------------------------------------------- bad input: exit 2, one line, no files


def _csv(text: str):
    return lambda tmp: _write(tmp / "m.csv", text)


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _folder(tmp: Path) -> Path:
    (tmp / "m.csv").mkdir()
    return tmp / "m.csv"


GOOD = "id,prompt\na,Effusion\nb,Normal\n"

BAD_MANIFESTS = {
    "missing file": (lambda tmp: tmp / "nope.csv", ["nope.csv", "does not exist"]),
    "directory": (_folder, ["m.csv", "not a file"]),
    "unknown suffix": (lambda tmp: _write(tmp / "m.xlsx", GOOD), ["m.xlsx", "--manifest-format"]),
    "not parquet": (lambda tmp: _write(tmp / "m.parquet", GOOD), ["m.parquet", "cannot be read as parquet"]),
    "not utf-8": (lambda tmp: _write(tmp / "m.csv", "prompt\nopacit\xe9\n".encode("latin-1")), ["cannot be read"]),
    "empty file": (lambda tmp: _write(tmp / "m.csv", b""), ["cannot be read"]),
    "no prompt column": (_csv("text\nEffusion\n"), ["column 'prompt'", "--prompt-column"]),
    "blank prompt": (_csv("prompt,x\nok,1\n  ,2\n"), ["row 2, column prompt", "--allow-empty-prompt"]),
    "missing prompt": (_csv("x,prompt\n1,ok\n2\n"), ["row 2, column prompt"]),
    "text num_images": (_csv("prompt,num_images\na,1\nb,two\n"), ["row 2, column num_images", "'two'"]),
    "negative num_images": (_csv("prompt,num_images\na,-1\n"), ["row 1, column num_images", "negative"]),
    "fractional num_images": (_csv("prompt,num_images\na,1.5\n"), ["row 1, column num_images", "whole"]),
    "huge num_images": (_csv("prompt,num_images\na,1\nb,1\nc,999999999\n"), ["row 3, column num_images", "large"]),
    "nan guidance": (_csv("prompt,guidance_scale\na,nan\n"), ["row 1, column guidance_scale", "finite"]),
    "inf guidance": (_csv("prompt,guidance_scale\na,inf\n"), ["row 1, column guidance_scale", "finite"]),
    "negative guidance": (_csv("prompt,guidance_scale\na,7\nb,-2\n"), ["row 2, column guidance_scale", "negative"]),
    "huge guidance": (_csv("prompt,guidance_scale\na,1e9\n"), ["row 1, column guidance_scale", "large"]),
    "negative seed": (_csv("prompt,seed\na,-1\n"), ["row 1, column seed", "negative"]),
    "huge seed": (_csv(f"prompt,seed\na,{2**64}\n"), ["row 1, column seed", "large"]),
    "fractional seed": (_csv("prompt,seed\na,0.5\n"), ["row 1, column seed", "whole"]),
    "duplicate ids": (_csv("id,prompt\nx,a\ny,b\nx,c\n"), ["rows 1 and 3, column id", "'x'"]),
    "blank id": (_csv("id,prompt\nx,a\n,b\n"), ["row 2, column id"]),
    "wrapped header cells": (_csv('"Report\nsentence","Label\r\n(0/1)"\nEffusion,1\n'), ["column 'prompt'", "Report"]),
    "header only": (_csv("id,prompt,label\n"), ["no data rows"]),
    "no images planned": (_csv("prompt,num_images\na,0\nb,0\n"), ["plans no images", "--num-images"]),
    "ids equal as file names": (_csv("id,prompt\na b,a\na_b-" + hashlib.sha256(b"a b").hexdigest()[:8] + ",b\n"),
                                ["rows 1 and 2, column id"]),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_exit_2_one_line_nothing_written(tmp_path, bundle_dir, text_encoder_dir, case):
    make, words = BAD_MANIFESTS[case]
    manifest = make(tmp_path)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    result = invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out))
    assert_input_error(result, *words)
    assert not out.exists()
    assert snapshot(tmp_path) == before  # not even a cache folder or a lock file


def test_bad_manifest_with_default_out_writes_nothing(tmp_path, bundle_dir, text_encoder_dir):
    manifest = _write(tmp_path / "m.csv", "prompt,seed\na,x\n")
    assert_input_error(invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path)), "row 1, column seed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


BAD_OPTIONS = {
    "steps 0": (["--steps", "0"], ["--steps"]),
    "steps huge": (["--steps", "100000"], ["--steps"]),
    "num-images negative": (["--num-images", "-1"], ["--num-images"]),
    "guidance negative": (["--guidance-scale", "-1"], ["--guidance-scale"]),
    "guidance nan": (["--guidance-scale", "nan"], ["--guidance-scale"]),
    "guidance inf": (["--guidance-scale", "inf"], ["--guidance-scale"]),
    "seed negative": (["--seed", "-3"], ["--seed"]),
    "batch-size negative": (["--batch-size", "-1"], ["--batch-size"]),
    "jpeg quality 0": (["--jpeg-quality", "0"], ["--jpeg-quality"]),
    "jpeg quality 100": (["--jpeg-quality", "100"], ["--jpeg-quality"]),
    "scheduler": (["--scheduler", "euler"], ["--scheduler", "ddim"]),
    "image format": (["--image-format", "bmp"], ["--image-format", "png"]),
    "dtype": (["--dtype", "float64"], ["--dtype"]),
    "manifest format": (["--manifest-format", "xlsx"], ["--manifest-format", "parquet"]),
    "device": (["--device", "tpu"], ["--device"]),
    "prompt column": (["--prompt-column", "sentence"], ["'sentence'", "--prompt-column"]),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_option_exit_2_one_line_nothing_written(tmp_path, bundle_dir, text_encoder_dir, case):
    extra, words = BAD_OPTIONS[case]
    manifest = _write(tmp_path / "m.csv", GOOD)
    out = tmp_path / "out"
    assert_input_error(invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out, *extra)), *words)
    assert not out.exists()


def test_cuda_device_without_cuda(tmp_path, bundle_dir, text_encoder_dir):
    if torch.cuda.is_available():  # the same check, the other way round: it must run
        device = f"cuda:{torch.cuda.device_count()}"
    else:
        device = "cuda:0"
    manifest = _write(tmp_path / "m.csv", GOOD)
    out = tmp_path / "out"
    assert_input_error(invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out,
                                        "--device", device)), "--device")
    assert not out.exists()


def _damaged_bundle(tmp: Path, bundle_dir: Path) -> Path:
    root = shutil.copytree(bundle_dir, tmp / "damaged")
    path = root / "models" / "diffusion_model.pth"
    state = torch.load(path, weights_only=True)
    state.pop("out.2.conv.weight")
    torch.save(state, path)
    return root


BAD_MODELS = {
    "model folder missing": (lambda tmp, b, t: (tmp / "no_bundle", t), ["--model"]),
    "bundle without inference.json": (
        lambda tmp, b, t: (_strip(shutil.copytree(b, tmp / "b"), "configs/inference.json"), t), ["inference.json"]),
    "bundle without checkpoint": (
        lambda tmp, b, t: (_strip(shutil.copytree(b, tmp / "b"), "models/autoencoder.pth"), t), ["autoencoder.pth"]),
    "checkpoint missing a key": (lambda tmp, b, t: (_damaged_bundle(tmp, b), t),
                                 ["diffusion_model.pth", "'out.2.conv.weight'"]),
    "text encoder folder missing": (lambda tmp, b, t: (b, tmp / "no_text"), ["--text-encoder"]),
    "text encoder repo offline": (lambda tmp, b, t: (b, "cxrgen-tests/no-such-repo"),
                                  ["cxrgen-tests/no-such-repo", "--text-encoder"]),
    "text width mismatch": (lambda tmp, b, t: (b, demo.build_text_encoder(tmp / "narrow", width=16)),
                            ["cross_attention_dim"]),
}


def _strip(root: Path, relative: str) -> Path:
    (root / relative).unlink()
    return root


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_or_text_encoder_exit_2_nothing_written(tmp_path, bundle_dir, text_encoder_dir, case):
    make, words = BAD_MODELS[case]
    model, text = make(tmp_path, bundle_dir, text_encoder_dir)
    manifest = _write(tmp_path / "m.csv", GOOD)
    out = tmp_path / "out"
    assert_input_error(invoke(*run_args(manifest, model, text, tmp_path, "-o", out)), *words)
    assert not out.exists()


# --------------------------------------------------------------------------- output folders


def test_output_folder_of_a_different_run_is_refused(tmp_path, bundle_dir, text_encoder_dir):
    manifest = _write(tmp_path / "m.csv", GOOD)
    out = tmp_path / "out"
    assert invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out)).exit_code == 0
    before = snapshot(out)
    assert "run.json" in before and "metadata.parquet" in before
    # other pixel settings
    for extra, word in ((["--seed", "1"], "seed"), (["--guidance-scale", "2"], "guidance_scale"),
                        (["--image-format", "png"], "image_format"), (["--num-images", "2"], "num_images")):
        line = assert_input_error(invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out,
                                                   *extra)), str(out), word)
        assert "--out" in line or "new" in line
    # another manifest into the same folder
    other = _write(tmp_path / "other.csv", "id,prompt\na,Effusion\nb,Cardiomegaly\n")
    assert_input_error(invoke(*run_args(other, bundle_dir, text_encoder_dir, tmp_path, "-o", out)), "manifest")
    assert snapshot(out) == before


@pytest.mark.parametrize("content", ["notes.txt", "photos", "images"])
def test_non_empty_folder_without_a_run_is_refused(tmp_path, bundle_dir, text_encoder_dir, content):
    manifest = _write(tmp_path / "m.csv", GOOD)
    out = tmp_path / "out"
    out.mkdir()
    if content.endswith(".txt"):
        (out / content).write_text("my notes")
    else:
        (out / content).mkdir()  # a user's own images/ folder must not be written into either
        (out / content / "mine.jpg").write_bytes(b"not ours")
    before = snapshot(out)
    assert_input_error(invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out)),
                       str(out), "not empty")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == [content]


def test_out_that_is_a_file_is_refused(tmp_path, bundle_dir, text_encoder_dir):
    manifest = _write(tmp_path / "m.csv", GOOD)
    out = _write(tmp_path / "out", "precious")
    assert_input_error(invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out)), str(out))
    assert out.read_text() == "precious"


def test_damaged_run_json_is_refused(tmp_path, bundle_dir, text_encoder_dir):
    manifest = _write(tmp_path / "m.csv", GOOD)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{ torn")
    assert_input_error(invoke(*run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out)), "run.json")
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
