"""Issue 19, item 12: a path given as a URL (s3://, gs://, hf://, file://, ...) is refused wherever a command takes a
local path: one line naming the option and the value, exit 2, nothing written (pathlib would have folded `s3://b/run`
into the local folder `s3:/b/run`). The library functions refuse such strings too. A run's own location (generate
--out, resume/status/evaluate/reproduce/export OUT, export --to) may be an s3:// URL since issue 21: those are
tested in tests/runs/test_object_store.py; here only the schemes they cannot take."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_input_error
from typer.testing import CliRunner

from cxrgen.cli import app
from cxrgen.errors import InputError

URL = "s3://bucket/run"

# (command line with {url} where the URL goes, the option or argument named in the refusal)
CASES = [
    (["generate", "{url}"], "MANIFEST"),
    (["generate", "m.csv", "-o", "out", "--cache-dir", "{url}"], "--cache-dir"),
    (["generate", "m.csv", "-o", "out", "--model", "{url}"], "--model"),
    (["generate", "m.csv", "-o", "out", "--text-encoder", "{url}"], "--text-encoder"),
    (["resume", "out", "--cache-dir", "{url}"], "--cache-dir"),
    (["evaluate", "out", "--real", "{url}"], "--real"),
    (["evaluate", "out", "--label-map", "{url}"], "--label-map"),
    (["evaluate", "out", "--evaluator-weights", "{url}"], "--evaluator-weights"),
    (["evaluate", "out", "--cache-dir", "{url}"], "--cache-dir"),
    (["reproduce", "out", "img_0000", "--out", "{url}"], "--out"),
    (["reproduce", "out", "img_0000", "--model", "{url}"], "--model"),
    (["reproduce", "out", "img_0000", "--text-encoder", "{url}"], "--text-encoder"),
    (["manifest", "from-labels", "{url}", "-o", "aug.csv", "--target", "5"], "LABELS"),
    (["manifest", "from-labels", "labels.csv", "-o", "{url}", "--target", "5"], "--out"),
    (["manifest", "from-labels", "labels.csv", "-o", "aug.csv", "--target", "5", "--templates", "{url}"],
     "--templates"),
    (["manifest", "from-labels", "labels.csv", "-o", "aug.csv", "--target", "5", "--tokenizer", "{url}"],
     "--tokenizer"),
    (["manifest", "from-reports", "{url}", "-o", "prompts.csv"], "REPORTS"),
    (["manifest", "from-reports", "reports.csv", "-o", "{url}"], "--out"),
    (["manifest", "from-reports", "reports.csv", "-o", "prompts.csv", "--tokenizer", "{url}"], "--tokenizer"),
    (["plan", "{url}"], "MANIFEST"),
    (["download", "--cache-dir", "{url}"], "--cache-dir"),
    (["download", "--model", "{url}"], "--model"),
    (["download", "--text-encoder", "{url}"], "--text-encoder"),
    (["info", "--cache-dir", "{url}"], "--cache-dir"),
    (["info", "--model", "{url}"], "--model"),
]


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    """A working folder with the local inputs the other arguments name, and CXRGEN_HOME inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXRGEN_HOME", str(tmp_path / "home"))
    (tmp_path / "m.csv").write_text("prompt\nSmall left effusion.\n")
    (tmp_path / "labels.csv").write_text("Edema\n1\n0\n")
    (tmp_path / "reports.csv").write_text("report\nFINDINGS: Small effusion.\n")
    (tmp_path / "out").mkdir()
    return tmp_path


@pytest.mark.parametrize("args, what", CASES, ids=[" ".join(a).replace("{url}", "URL") for a, _ in CASES])
@pytest.mark.parametrize("url", [URL])
def test_every_path_given_as_a_url_is_refused_and_nothing_is_written(args, what, url, workdir):
    before = tree(workdir)
    result = CliRunner().invoke(app, [a.replace("{url}", url) for a in args])
    assert_input_error(result, f"{what} {url}:", "s3:// paths are not supported", "mounted")
    assert tree(workdir) == before  # no ./s3:/bucket/run, no cache, no manifest, no export
    assert not (workdir / "s3:").exists()


@pytest.mark.parametrize("url", ["gs://b/run", "az://c/run", "hf://datasets/x", "https://host/run", "file:///tmp/x"])
@pytest.mark.parametrize("command", [["generate", "m.csv", "--out"], ["resume"], ["status"], ["evaluate"],
                                     ["export", "out", "--to"], ["plan", "m.csv", "--out"]],
                         ids=lambda c: " ".join(c))
def test_every_scheme_a_run_cannot_live_in_is_refused(url, command, workdir):
    before = tree(workdir)
    result = CliRunner().invoke(app, [*command, url])
    assert_input_error(result, f"{url}:")
    assert tree(workdir) == before and not any(workdir.glob("*:"))


def test_preview_refuses_a_bucket_with_the_sync_command(workdir):
    result = CliRunner().invoke(app, ["preview", "s3://bucket/run"])
    assert_input_error(result, "s3://bucket/run", "aws s3 sync s3://bucket/run ./run", "cxrgen preview ./run")


def test_the_library_refuses_urls_too(tmp_path):
    from cxrgen.config import RunConfig
    from cxrgen.publish.export import ExportOptions, export_run
    from cxrgen.publish.preview import build_preview
    from cxrgen.runs.generate import resume
    from cxrgen.runs.state import inspect_run

    calls = [lambda: RunConfig(manifest=URL, out=str(tmp_path / "out")),
             lambda: RunConfig(manifest=str(tmp_path / "m.csv"), out=str(tmp_path / "out"), model=URL)]
    for call in calls:
        with pytest.raises(InputError, match="s3:// paths are not supported"):
            call()
    for call in (lambda: export_run(ExportOptions(out="gs://b/run", to=str(tmp_path / "x"))),
                 lambda: inspect_run("gs://b/run"), lambda: resume("hf://datasets/x")):
        with pytest.raises(InputError, match="://"):
            call()
    with pytest.raises(InputError, match="local folder"):
        build_preview(URL)
    assert list(tmp_path.iterdir()) == []


def test_local_paths_that_merely_contain_a_colon_are_still_paths(workdir):
    from cxrgen.files import local_path

    assert local_path("runs/a:b", "--out") == Path("runs/a:b")
    assert local_path("C:/data/run", "--out") == Path("C:/data/run")  # one slash: a (Windows-style) path
    result = CliRunner().invoke(app, ["status", "weird:name"])
    assert result.exit_code == 2 and "not a cxrgen run" in result.stderr
