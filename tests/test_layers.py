"""The house: imports only point down the pipeline's layers, no import cycle, and the torch-free parts stay torch-free.

The import graph is read from the source (every `import` and `from ... import`, including the lazy ones inside
functions), so a module that imports upward only when a command runs is caught too.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cxrgen"

# The allowed layers, bottom first. A module may import modules of its own unit and of any unit in a lower
# layer; never a unit beside it (hub <-> manifests, evaluation <-> publish) or above it.
LAYERS = [
    ["cxrgen"],  # the root modules: errors, config, pins, files, provenance, extras
    ["cxrgen.manifests", "cxrgen.hub", "cxrgen.storage"],
    ["cxrgen.model"],
    ["cxrgen.runs"],
    ["cxrgen.evaluation", "cxrgen.publish"],
    ["cxrgen.cli"],
]
# Units that must import without torch (checked in the source: no module-level `import torch` anywhere in them).
TORCH_FREE = ["cxrgen", "cxrgen.manifests", "cxrgen.hub", "cxrgen.storage", "cxrgen.cli"]
MAX_LINES = 500


def read_tree(root: Path = PACKAGE) -> dict[str, str]:
    """Source of every module by dotted name (a package's __init__ under the package's own name)."""
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = path.read_text(encoding="utf-8")
    return sources


def imports_of(name: str, source: str, modules: set[str]) -> dict[str, list[int]]:
    """cxrgen modules imported by `name` (anywhere in its body), with the line numbers."""
    found: dict[str, list[int]] = {}
    package = name if f"{name}.__init__" in modules or any(m.startswith(name + ".") for m in modules) else \
        name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from cxrgen.cli import run` imports the submodule cxrgen.cli.run
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("cxrgen") and target != name:
                found.setdefault(target, []).append(node.lineno)
    return found


def unit_of(module: str) -> str:
    """The layer unit a module belongs to: its subpackage, or "cxrgen" for a root module."""
    if module == "cxrgen.__main__":
        return "cxrgen.cli"  # `python -m cxrgen` is the command line
    parts = module.split(".")
    candidate = ".".join(parts[:2])
    units = {u for layer in LAYERS for u in layer}
    return candidate if candidate in units else "cxrgen"


def layer_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def violations(sources: dict[str, str]) -> list[str]:
    """Every upward or sideways import and every cycle, one line each."""
    modules = set(sources)
    graph = {name: imports_of(name, source, modules) for name, source in sources.items()}
    problems = []
    for name, targets in graph.items():
        unit = unit_of(name)
        for target, lines in targets.items():
            other = unit_of(target)
            if other == unit:
                continue
            if other == "cxrgen" and target == "cxrgen":
                continue  # `from cxrgen import __version__`: the package's own version string
            if layer_of(other) >= layer_of(unit):
                where = "beside" if layer_of(other) == layer_of(unit) else "above"
                problems.append(f"{name} (line {lines[0]}) imports {target}, which is {where} it")
    # cycles, over modules (a package's __init__ counts as the package)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in graph.get(node, {}):
            if state.get(target) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return problems


def test_imports_point_down_and_nothing_cycles():
    assert violations(read_tree()) == []


@pytest.mark.parametrize("module, planted", [
    ("cxrgen.manifests.reader", "from cxrgen.runs.journal import read_records"),  # upward
    ("cxrgen.hub.info", "    from cxrgen.model.classifier import release_info"),  # lazy, upward
    ("cxrgen.publish.export", "from cxrgen.evaluation.metrics import label_map"),  # sideways
    ("cxrgen.hub.download", "from cxrgen.manifests.tokens import MAX_TOKENS"),  # sideways
    ("cxrgen.files", "from cxrgen.model.bundle import SCALE_FACTOR"),  # root importing upward
])
def test_a_planted_upward_or_sideways_import_is_caught(module, planted):
    sources = read_tree()
    if planted.startswith(" "):
        planted = "def _planted():\n" + planted + "\n"
    sources[module] += "\n" + planted + "\n"
    found = [line for line in violations(sources) if not line.startswith("import cycle")]  # it may close one too
    assert len(found) == 1 and found[0].startswith(module), found


def test_a_planted_cycle_is_caught():
    sources = read_tree()
    sources["cxrgen.errors"] += "\nfrom cxrgen.config import RunConfig\n"  # config imports errors
    assert any(line.startswith("import cycle: ") for line in violations(sources))


def test_every_module_belongs_to_a_layer_and_subpackages_are_empty():
    sources = read_tree()
    units = {u for layer in LAYERS for u in layer}
    for name in sources:
        assert unit_of(name) in units, name
    for unit in units - {"cxrgen", "cxrgen.cli"}:
        assert sources[unit].strip() == "", f"{unit}/__init__.py must stay empty (no re-exports, no shims)"


def test_modules_are_short_and_say_their_job():
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (at most {MAX_LINES})"
        if path.name == "__init__.py" and not text.strip():
            continue
        assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(PACKAGE.parent)} has no module docstring"


def test_torch_free_units_never_import_torch_at_module_level():
    sources = read_tree()
    for name, source in sources.items():
        if unit_of(name) not in TORCH_FREE:
            continue
        for node in ast.parse(source).body:  # module level only: a lazy import inside a function is allowed
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "torch" or n.startswith("torch.") for n in names), f"{name} imports torch"


def test_only_the_cli_imports_typer():
    for name, source in read_tree().items():
        if unit_of(name) == "cxrgen.cli":
            continue
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("typer", "click") for n in names), f"{name} imports {names}"


@pytest.mark.parametrize("argv", [["info"], ["info", "--json"], ["download", "--offline"]])
def test_cache_commands_never_import_torch(tmp_path, argv):
    """`cxrgen info` and `cxrgen download --offline` run (they report an empty cache) without importing torch."""
    code = ("import sys; from cxrgen.cli import app\n"
            "try:\n    app(sys.argv[1:], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code, *argv, "--cache-dir", str(tmp_path / "home")],
                          capture_output=True, text=True)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert "missing" in done.stdout or "missing" in done.stderr  # it really ran and looked at the empty cache


def test_no_test_file_imports_another():
    """Shared test code lives in tests/helpers.py and conftest.py files; a test module is never imported."""
    tests = Path(__file__).resolve().parent
    names = {p.stem for p in tests.rglob("test_*.py")}
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            clash = [t for t in targets if t.split(".")[-1] in names or t.split(".")[0] in names]
            assert not clash, f"{path.relative_to(tests)} (line {node.lineno}) imports the test module {clash[0]}"
