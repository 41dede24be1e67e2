"""Bad input to `cxrgen generate --verify` (issue 20): exit 2, one line naming the value and the fix, nothing written.

A resume that changes a verify setting is refused the same way, whether it comes as `cxrgen generate` into the
run's folder or through the library's resume().
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import assert_input_error
from typer.testing import CliRunner

import cxrgen.extras
from cxrgen.cli import app
from cxrgen.errors import InputError
from cxrgen.runs.generate import resume

runner = CliRunner()
MANIFEST = "prompt,Pneumothorax,Support Devices\nleft pneumothorax,1,0\nclear chest,0,1\n"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("m") / "m.csv"
    path.write_text(MANIFEST)
    return path


@pytest.fixture
def generate_args(manifest, bundle_dir, text_encoder_dir, verifier_file, tmp_path):
    def make(*extra, out: Path | None = None, weights: bool = True, source: Path = manifest) -> list[str]:
        return ["generate", str(source), "--out", str(out or tmp_path / "out"), "--model", str(bundle_dir),
                "--text-encoder", str(text_encoder_dir), "--steps", "1", "--device", "cpu", "--cache-dir",
                str(tmp_path / "cache"), "--quiet", *(["--verifier-weights", str(verifier_file)] if weights else []),
                *extra]
    return make


def invoke(args):
    return runner.invoke(app, [str(a) for a in args])


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, words", [
    (["--verify", "--min-score", "1.5"], ["--min-score 1.5", "from 0 to 1"]),
    (["--verify", "--min-score", "-0.1"], ["--min-score -0.1", "from 0 to 1"]),
    (["--verify", "--max-attempts", "0"], ["--max-attempts 0", "from 1 to 1000"]),
    (["--min-score", "0.3"], ["--min-score", "only apply with --verify"]),
    (["--max-attempts", "3", "--keep-rejected"], ["--max-attempts, --keep-rejected", "only apply with --verify"]),
])
def test_bad_verify_options_exit_2_one_line_nothing_written(extra, words, generate_args, tmp_path):
    assert_input_error(invoke(generate_args(*extra, weights="--verify" in extra)), *words)
    assert_nothing_written(tmp_path)


def test_verify_without_the_evaluate_extra(generate_args, tmp_path, monkeypatch):
    real = cxrgen.extras.importlib.import_module

    def missing(name, *args):
        if name == "torchxrayvision":
            raise ImportError("No module named 'torchxrayvision'")
        return real(name, *args)
    monkeypatch.setattr(cxrgen.extras.importlib, "import_module", missing)
    assert_input_error(invoke(generate_args("--verify")), "--verify needs torchxrayvision", 'pip install "cxrgen[evaluate]"')
    assert_nothing_written(tmp_path)


def test_verify_offline_without_staged_weights_names_the_download_command(generate_args, tmp_path):
    line = assert_input_error(invoke(generate_args("--verify", "--offline", weights=False)),
                              "verifier weights", "cxrgen download --verifier")
    assert str(tmp_path / "cache") in line
    assert_nothing_written(tmp_path)


def test_weights_that_are_not_a_release_file_or_no_release(generate_args, verifier_file, tmp_path):
    renamed = tmp_path / "w" / "my-model.pt"
    renamed.parent.mkdir()
    shutil.copyfile(verifier_file, renamed)
    assert_input_error(invoke(generate_args("--verify", "--verifier-weights", renamed, weights=False)),
                       "cannot tell which torchxrayvision release", "chex-densenet121")
    assert_input_error(invoke(generate_args("--verify", "--verifier-weights", "densenet121-res224-none",
                                            weights=False)), "no torchxrayvision release of that name", "chex")
    garbage = tmp_path / "g" / verifier_file.name
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a model")
    assert_input_error(invoke(generate_args("--verify", "--verifier-weights", garbage, weights=False)),
                       "is not a torchxrayvision model file")
    assert_nothing_written(tmp_path)


def test_a_manifest_without_a_label_the_verifier_knows(generate_args, tmp_path):
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("prompt,Support Devices,Infiltration\nline in place,1,1\n")
    # Infiltration is a pathology of the classifier, but not of the CheXpert release that verifies
    assert_input_error(invoke(generate_args("--verify", source=unknown)),
                       "none of the manifest's label columns (Support Devices, Infiltration)", "--label-map")
    bare = tmp_path / "bare.csv"
    bare.write_text("prompt\nleft pneumothorax\n")
    assert_input_error(invoke(generate_args("--verify", source=bare)), "(it has none)")
    assert_nothing_written(tmp_path)


def test_the_label_map_is_evaluates_and_is_checked(generate_args, tmp_path):
    labels = tmp_path / "ptx.csv"
    labels.write_text("prompt,ptx\nleft pneumothorax,1\n")
    bad = tmp_path / "bad.json"
    bad.write_text('{"ptx": "Pneumo"}')
    assert_input_error(invoke(generate_args("--verify", "--label-map", bad, source=labels)),
                       "--label-map", "'Pneumo'", "Pneumothorax")
    assert_nothing_written(tmp_path)
    good = tmp_path / "good.json"
    good.write_text('{"ptx": "Pneumothorax"}')
    result = invoke(generate_args("--verify", "--label-map", good, "--min-score", "0", source=labels))
    assert result.exit_code == 0, result.output
    import json

    assert json.loads((tmp_path / "out" / "run.json").read_text())["settings"]["verify"]["findings"] == \
        {"ptx": "Pneumothorax"}


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "lock"}


def test_a_resume_that_changes_a_verify_setting_is_refused(generate_args, tmp_path):
    out = tmp_path / "out"
    assert invoke(generate_args("--verify", "--min-score", "0")).exit_code == 0
    before = _snapshot(out)
    for extra, words in ((["--verify", "--min-score", "0.3"], "verify min_score: 0.0 -> 0.3"),
                         (["--verify", "--min-score", "0", "--max-attempts", "2"], "verify max_attempts: 8 -> 2"),
                         (["--verify", "--min-score", "0", "--verify-negatives"], "verify verify_negatives"),
                         ([], "--verify: on -> off")):
        assert_input_error(invoke(generate_args(*extra, weights=bool(extra))), words, "choose a new --out")
    with pytest.raises(InputError, match="resume cannot change max_attempts, min_score"):
        resume(out, min_score=0.2, max_attempts=3)
    assert _snapshot(out) == before
    # and a plain run cannot be turned into a verified one
    plain = tmp_path / "plain"
    assert invoke(generate_args(out=plain, weights=False)).exit_code == 0
    before = _snapshot(plain)
    assert_input_error(invoke(generate_args("--verify", out=plain)), "--verify: off -> on")
    assert _snapshot(plain) == before
