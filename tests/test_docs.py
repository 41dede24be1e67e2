"""The docs stay true: docs/cli.md is what the code prints, every relative link and anchor resolves, every
repository path and `cxrgen.x.y` name the README and docs/ cite exists, and the README stays a short front page
holding the exact commands CI runs.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import typer

from cxrgen.cli import COMMANDS, app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKING = [README, *DOCS, ROOT / "manifests" / "README.md", ROOT / "CHANGELOG.md"]  # relative links checked
CITING = [README, *DOCS]  # backticked paths and dotted names checked
# Paths the docs name that a run creates, absent from a fresh clone.
CREATED_BY_A_RUN = {"manifests/demo/"}
README_MAX_LINES = 300
INSTALL_AND_RUN = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1"
                   " && pip install -e . && cxrgen generate manifests/demo.csv")
INSTALL_AND_TEST = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1"
                    " && pip install -e \".[test]\" && python -m pytest -q")

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"(?<!!)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?<![\w.$/~-])((?:cxrgen|tests|benchmarks|examples|manifests|docs)/[\w./-]*)")
DOTTED = re.compile(r"(?<![\w.$/-])cxrgen(?:\.[A-Za-z_]\w*)+")


def _script():
    """docs/make_cli_md.py, loaded from its path (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("make_cli_md", ROOT / "docs" / "make_cli_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """The Markdown without its fenced code blocks."""
    return FENCE.sub("", text)


def _fences(text: str) -> str:
    return "\n".join(m.group(0) for m in FENCE.finditer(text))


def slug(heading: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped (but - and _), each space a -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()  # a link in a heading: its text
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in _prose(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------ (a) docs/cli.md

def _command_paths() -> list[str]:
    """Every command and group of the app, found independently of the script."""
    paths = []

    def walk(command, path: str) -> None:
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "cxrgen")
    return paths


def test_cli_md_is_what_the_script_writes():
    expected = _script().render()
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == expected, "docs/cli.md is stale: run `python docs/make_cli_md.py`"


def test_cli_md_names_every_command_and_subcommand():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^## (.+)$", _prose(text), re.M))
    paths = _command_paths()
    assert {"cxrgen manifest", "cxrgen manifest from-labels", "cxrgen manifest from-reports"} <= set(paths)
    assert set(paths) == headings
    assert {f"cxrgen {name}" for name, _ in COMMANDS} <= headings
    for path in paths:  # each section holds that command's own help
        section = text.split(f"## {path}\n", 1)[1]
        assert section.lstrip().startswith("```text\nUsage: " + path), path


def test_check_mode_exits_1_when_cli_md_is_stale(tmp_path, monkeypatch, capsys):
    script = _script()
    stale = tmp_path / "cli.md"
    stale.write_text(script.render() + "\nan edit by hand\n", encoding="utf-8")
    monkeypatch.setattr(script, "CLI_MD", stale)
    monkeypatch.setattr(script, "ROOT", tmp_path)
    assert script.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert script.main([]) == 0  # rewrites it ...
    assert script.main(["--check"]) == 0  # ... and then it is current
    assert stale.read_text(encoding="utf-8") == script.render()


# ------------------------------------------------------------------ (b) relative links

def _links(path: Path) -> list[str]:
    return [target for _, target in LINK.findall(_prose(path.read_text(encoding="utf-8")))]


@pytest.mark.parametrize("path", LINKING, ids=_rel)
def test_relative_links_point_at_existing_files_and_headings(path):
    problems = []
    for target in _links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{target}: no heading with anchor #{anchor} in {_rel(linked)}")
    assert problems == [], f"{_rel(path)}: " + "; ".join(problems)


def test_the_slug_rule():
    assert slug("Seeds and names: the rule") == "seeds-and-names-the-rule"
    assert slug("Looking at a run: `cxrgen preview`") == "looking-at-a-run-cxrgen-preview"
    assert slug("What cxrgen changes, and what that does to the pixels") == \
        "what-cxrgen-changes-and-what-that-does-to-the-pixels"
    assert slug("GPU figures: pending") == "gpu-figures-pending"


# ------------------------------------------------------------------ (c) cited paths and names

def _cited(path: Path) -> tuple[set[str], set[str]]:
    """(repository paths, dotted cxrgen names) cited in code spans, link texts and code blocks of a file."""
    text = path.read_text(encoding="utf-8")
    prose = _prose(text)
    pieces = CODE_SPAN.findall(prose) + [label for label, _ in LINK.findall(prose)] + [_fences(text)]
    paths, names = set(), set()
    for piece in pieces:
        paths.update(p.rstrip(".,;:") for p in REPO_PATH.findall(piece))
        names.update(DOTTED.findall(piece))
    return paths, names


def resolve(dotted: str):
    """Import the longest importable module prefix of a dotted name, then getattr the rest."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as exc:
            if exc.name and ".".join(parts[:i]).startswith(exc.name) and exc.name.startswith("cxrgen"):
                continue  # this prefix is not a module: try a shorter one
            raise
        for attribute in parts[i:]:
            obj = getattr(obj, attribute)  # AttributeError: the name does not exist
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("path", CITING, ids=_rel)
def test_cited_repository_paths_exist(path):
    paths, _ = _cited(path)
    missing = sorted(p for p in paths if p not in CREATED_BY_A_RUN and not (ROOT / p).exists())
    assert missing == [], f"{_rel(path)} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("path", CITING, ids=_rel)
def test_cited_cxrgen_names_resolve(path):
    _, names = _cited(path)
    broken = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            broken.append(f"{name} ({type(exc).__name__}: {exc})")
    assert broken == [], f"{_rel(path)} cites names that do not resolve: {broken}"


def test_the_citation_checks_catch_old_paths_and_names():
    assert REPO_PATH.findall("see `cxrgen/run.py` and tests/test_export.py") == ["cxrgen/run.py", "tests/test_export.py"]
    assert not (ROOT / "cxrgen/run.py").exists()
    assert DOTTED.findall("`cxrgen.engine.tune_cpu_allocator`, OUT/.cxrgen/x, a.cxrgen.b") == \
        ["cxrgen.engine.tune_cpu_allocator"]
    with pytest.raises((ImportError, AttributeError)):
        resolve("cxrgen.engine.tune_cpu_allocator")  # moved to cxrgen.model.engine
    with pytest.raises(AttributeError):
        resolve("cxrgen.runs.generate.no_such_function")
    assert callable(resolve("cxrgen.runs.generate.generate"))
    assert callable(resolve("cxrgen.model.engine.tune_cpu_allocator"))


# ------------------------------------------------------------------ (d) the README as a front page

def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}); move detail to docs/"


def test_readme_holds_the_commands_ci_runs():
    readme = README.read_text(encoding="utf-8").splitlines()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    test_command = ci[-1]
    assert test_command == "python -m pytest -q"
    assert INSTALL_AND_TEST in readme and INSTALL_AND_RUN in readme  # whole lines, exactly
    assert INSTALL_AND_TEST.endswith(" && " + test_command)
    # the packages CI installs are the ones the README's test command installs
    for line in ci:
        if line.startswith("pip install "):
            assert line.replace(" -q", "") in INSTALL_AND_TEST, line
    section = "\n".join(readme[readme.index("## Two commands on a fresh machine"):])
    assert section.index(INSTALL_AND_RUN) < section.index(INSTALL_AND_TEST)


def test_readme_links_every_docs_page():
    targets = {target.partition("#")[0] for target in _links(README)}
    missing = [page.name for page in DOCS if f"docs/{page.name}" not in targets]
    assert missing == [], f"README.md does not link {missing}"
