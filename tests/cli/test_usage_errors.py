"""Command-line mistakes through the real entry point (`python -m cxrgen`, i.e. cxrgen.cli.main): one line."""
from __future__ import annotations

import subprocess
import sys

import pytest


def cxrgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxrgen", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, words", [
    (["generate", "m.csv", "--stepz", "3"], ["no such option --stepz", "did you mean --steps?"]),
    (["generate", "m.csv", "--steps", "abc"], ["--steps: 'abc' is not a valid integer", "e.g. --steps 50"]),
    (["generate"], ["missing argument MANIFEST"]),
])
def test_usage_error_is_one_line_with_the_fix_and_the_help_hint(args, words):
    done = cxrgen(*args)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cxrgen: error: ") and lines[0].endswith("(see 'cxrgen generate --help')")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert done.stdout == "" and "Usage:" not in done.stderr


def test_usage_lines_name_arguments_without_braces():
    from typer.testing import CliRunner

    from cxrgen.cli import COMMANDS, app

    usages = {}
    for name, _ in COMMANDS:
        result = CliRunner().invoke(app, [*name.split(" "), "--help"], prog_name="cxrgen")
        assert result.exit_code == 0, result.output
        usages[name] = next(line for line in result.stdout.splitlines() if line.startswith("Usage:"))
    assert usages["generate"] == "Usage: cxrgen generate [OPTIONS] MANIFEST"
    assert usages["reproduce"] == "Usage: cxrgen reproduce [OPTIONS] OUT IMAGE_ID"
    assert usages["manifest from-labels"] == "Usage: cxrgen manifest from-labels [OPTIONS] LABELS"
    assert not [usage for usage in usages.values() if "{" in usage or "}" in usage], usages


def test_help_version_and_bare_commands_still_print_help():
    bare, group, help_, version = cxrgen(), cxrgen("manifest"), cxrgen("download", "--help"), cxrgen("--version")
    assert bare.returncode == 2 and "Commands:" in bare.stdout + bare.stderr and "download" in bare.stdout + bare.stderr
    assert group.returncode == 2 and "from-labels" in group.stdout + group.stderr
    assert help_.returncode == 0 and "Example: cxrgen download" in help_.stdout
    assert version.returncode == 0 and version.stdout.startswith("cxrgen ")


@pytest.mark.parametrize("raised, code, words", [
    (EOFError, 1, ["Aborted!"]),  # what Typer turns a closed stdin into (typer.Abort)
    (RuntimeError, None, []),  # a bug: its own traceback, not one of main's
])
def test_aborts_and_unexpected_errors_leave_main_as_themselves(monkeypatch, capsys, raised, code, words):
    import cxrgen.hub.info
    from cxrgen.cli import main

    def fail(*args, **kwargs):
        raise raised("stopped")

    monkeypatch.setattr(cxrgen.hub.info, "cache_report", fail)
    monkeypatch.setattr(sys, "argv", ["cxrgen", "info"])
    if code is None:
        with pytest.raises(raised, match="stopped"):
            main()
        return
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == code and capsys.readouterr().err.strip() in words
