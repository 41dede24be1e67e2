"""`cxrgen info`: what the cache holds for a run, where, at which versions, and whether each file verifies."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cxrgen.errors import CxrgenError, InputError, RunError
from cxrgen.extras import extra_problem, require_extra
from cxrgen.files import refuse_url
from cxrgen.hub.components import (
    Component,
    FileState,
    bundle_component,
    check,
    evaluator_component,
    offline_error_all,
    read_marker,
    text_encoder_component,
    verifier_component,
)
from cxrgen.hub.download import missing_offline, stage
from cxrgen.hub.sources import Source
from cxrgen.pins import (
    DEFAULT_MODEL,
    DEFAULT_TEXT_ENCODER,
    EVALUATOR_URL,
    VERIFIER_RELEASE,
    VERIFIER_URL,
)

_DENSENET_PREFIX = "densenet121-res224-"


@dataclass
class ComponentReport:
    """One component: its files' states and where it came from (None where it was never staged)."""

    component: Component
    files: list[FileState]
    source: str | None = None
    revision: str | None = None  # the commit fetched, where the source has commits
    fetched_with: list[str] = field(default_factory=list)  # what transferred the files (huggingface_hub 2.4.0, ...)

    @property
    def status(self) -> str:
        """complete, missing (no file at all), corrupt (a file fails its check) or incomplete."""
        states = {f.status for f in self.files}
        if states == {"verified"}:
            return "complete"
        if states == {"missing"}:
            return "missing"
        return "corrupt" if "corrupt" in states else "incomplete"

    def to_dict(self) -> dict:
        """JSON-ready form."""
        c = self.component
        return {"kind": c.kind, "ref": c.ref, "folder": str(c.folder), "status": self.status, "source": self.source,
                "revision": self.revision, "fetched_with": self.fetched_with, "command": c.command,
                "files": [{"path": str(f.path), "size": f.size, "status": f.status} for f in self.files]}


@dataclass
class CacheReport:
    """Every component a run needs (and the evaluator's weights, where asked), plus other cached copies."""

    cache_dir: Path
    components: list[ComponentReport]  # required: `complete` and the exit code depend on these
    optional: list[ComponentReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # components not in the cache (folders used in place, ...)
    others: list[str] = field(default_factory=list)  # other versions in the cache, not asked about
    extra: str | None = None  # --evaluator / --verifier: why the evaluate extra cannot be imported (None: it can)

    @property
    def complete(self) -> bool:
        """Every component asked about is there and verifies (with --evaluator: and the evaluate extra imports)."""
        return all(c.status == "complete" for c in self.components) and self.extra is None

    def to_dict(self) -> dict:
        """JSON-ready form (`cxrgen info --json`)."""
        return {"cache_dir": str(self.cache_dir), "complete": self.complete, "evaluate_extra_problem": self.extra,
                "components": [c.to_dict() for c in self.components],
                "optional": [c.to_dict() for c in self.optional], "notes": self.notes, "others": self.others}

    def problem(self) -> InputError | None:
        """The error naming every component with a missing or corrupt file and one command that fetches them all."""
        bad = [(r.component, r.files) for r in self.components if r.status != "complete"]
        if not bad:
            return None if self.extra is None else InputError(self.extra)
        return offline_error_all(bad)

    def lines(self) -> list[str]:
        """The human-readable report."""
        out = [f"cache: {self.cache_dir}"]
        for report in self.components + self.optional:
            c = report.component
            where = f" (from {report.source} at {report.revision}" if report.source else ""
            where += f", fetched with {' and '.join(report.fetched_with)})" if where and report.fetched_with else \
                ")" if where else ""
            out.append(f"{c.kind} {c.ref}: {report.status}{where}")
            out.append(f"  folder: {c.folder}")
            for state in report.files:
                size = f"{state.size:,} B" if state.size is not None else "-"
                out.append(f"  {state.status:<10}  {size:>16}  {state.path.relative_to(c.folder)}")
            if report.status != "complete":
                out.append(f"  fetch with: {c.command}")
        if self.extra is not None:
            out.append(f"evaluate extra: missing: {self.extra}")
        out.extend(f"note: {note}" for note in self.notes)
        if self.others:
            out.append(f"also in the cache: {', '.join(self.others)}")
        return out


def download(cache_dir: str | Path, model: str = DEFAULT_MODEL, text_encoder: str = DEFAULT_TEXT_ENCODER,
             evaluator: bool = False, *, verifier: str | None = None, source: Source | None = None,
             offline: bool = False, progress: bool = True, log=None) -> CacheReport:
    """Stage what a run needs (and the evaluator's or a verifier's weights if asked), then report the cache;
    offline: report only. verifier: a torchxrayvision release name ("" = the pinned default), or None."""
    _refuse_urls(cache_dir, model, text_encoder)
    if evaluator:
        require_extra()  # says which install command adds torchxrayvision
    if verifier is not None:
        require_extra("--verify")  # the weights are of no use without it
    if not offline:
        failures = []
        for report in cache_report(cache_dir, model, text_encoder, evaluator, verifier).components:
            try:  # every component is tried: one failure must not hide the state of the next
                stage(report.component, source, progress=progress, log=log, rerun=True)
            except CxrgenError as exc:
                failures.append(exc)
        if len(failures) == 1:
            raise failures[0]
        if failures:
            kind = RunError if all(isinstance(f, RunError) for f in failures) else InputError
            raise kind(f"{len(failures)} components could not be staged: " + " | ".join(str(f) for f in failures))
    return cache_report(cache_dir, model, text_encoder, evaluator, verifier)


def verifier_release(cache_dir: str | Path, release: str = "") -> Component:
    """The component of a verifier release ("" = the pinned default; others read torchxrayvision's table)."""
    release = release or VERIFIER_RELEASE
    if release == VERIFIER_RELEASE:
        return verifier_component(VERIFIER_URL, cache_dir, release)
    from cxrgen.extras import import_quietly

    table = import_quietly("torchxrayvision").models.model_urls
    name = next((n for n in (release, _DENSENET_PREFIX + release) if n in table and n.startswith(_DENSENET_PREFIX)),
                None)
    if name is None:
        names = sorted(n[len(_DENSENET_PREFIX):] for n in table if n.startswith(_DENSENET_PREFIX))
        raise InputError(f"--verifier-weights {release}: no torchxrayvision DenseNet release of that name; use one "
                         f"of {', '.join(names)} (files need no staging: pass them to generate as they are)")
    return verifier_component(table[name]["weights_url"], cache_dir, name)


def cache_report(cache_dir: str | Path, model: str = DEFAULT_MODEL, text_encoder: str = DEFAULT_TEXT_ENCODER,
                 evaluator: bool = False, verifier: str | None = None) -> CacheReport:
    """Check the cache for the bundle and text encoder a run with these options needs (and the evaluator's or a
    verifier's weights, where asked)."""
    _refuse_urls(cache_dir, model, text_encoder)
    cache_dir = Path(cache_dir).expanduser().resolve()
    components, notes = _components(cache_dir, model, text_encoder)
    if evaluator or (cache_dir / "torchxrayvision").is_dir():
        components.append(evaluator_component(EVALUATOR_URL, cache_dir))
    asked_verifier = verifier_release(cache_dir, verifier) if verifier is not None else None
    default_verifier = verifier_component(VERIFIER_URL, cache_dir, VERIFIER_RELEASE)
    if asked_verifier is not None and asked_verifier not in components:
        components.append(asked_verifier)
    elif asked_verifier is None and default_verifier.folder.is_dir():
        components.append(default_verifier)
    reports = []
    for component in components:
        marker = read_marker(component) or {}
        reports.append(ComponentReport(component, check(component, deep=True), marker.get("source"),
                                       marker.get("revision"), list(marker.get("fetched_with") or [])))
    # weights found in the cache but not asked about are shown, not required
    wanted = {"evaluator weights": evaluator, "verifier weights": asked_verifier is not None}
    required = [r for r in reports if wanted.get(r.component.kind, True) or r.component == asked_verifier]
    optional = [r for r in reports if r not in required]
    # `cxrgen evaluate` and `--verify` need the extra as much as the weights: exit 0 must mean they can run
    extra = extra_problem() if evaluator else extra_problem("--verify") if verifier is not None else None
    return CacheReport(cache_dir, required, optional, notes, _others(cache_dir, components), extra)


def offline_problem(cache_dir: str | Path, model: str = DEFAULT_MODEL, text_encoder: str = DEFAULT_TEXT_ENCODER,
                    source: Source | None = None) -> InputError | None:
    """Offline, the one error naming everything a run lacks (the bundle and the text encoder together), or None.

    A component counts as there when it is staged or whole in the Hugging Face cache (staging takes it from there).
    """
    cache = Path(cache_dir).expanduser().resolve()
    # a folder is used in place; a path that is no folder is refused by the run itself, naming it (as
    # cxrgen.model.bundle.resolve_model and cxrgen.model.text_encoder.load_text_encoder tell paths from names)
    model_path = "/" in model or "\\" in model or model.startswith((".", "~"))
    text_path = Path(text_encoder).is_absolute() or text_encoder.startswith((".", "~"))
    components = [make(value, cache) for value, make, path in ((model, bundle_component, model_path),
                                                              (text_encoder, text_encoder_component, text_path))
                  if not path and not Path(value).expanduser().is_dir()]
    return missing_offline(components, source)


def _components(cache_dir: Path, model: str, text_encoder: str) -> tuple[list[Component], list[str]]:
    """The cached components a run with these options needs; a --model or --text-encoder folder is used in place."""
    components, notes = [], []
    for option, value, make in (("--model", model, bundle_component), ("--text-encoder", text_encoder,
                                                                         text_encoder_component)):
        if Path(value).expanduser().is_dir():
            notes.append(f"{option} {value} is a folder, used in place (not cached)")
        else:
            components.append(make(value, cache_dir))
    return components, notes


def _others(cache_dir: Path, components: list[Component]) -> list[str]:
    asked = {c.folder for c in components}
    found = []
    for kind in ("bundles", "text-encoders"):
        folder = cache_dir / kind
        if folder.is_dir():
            found += [f"{kind}/{p.name}" for p in sorted(folder.iterdir())
                      if p.is_dir() and not p.name.startswith(".") and p not in asked]
    return found


def _refuse_urls(cache_dir, model: str, text_encoder: str) -> None:
    for what, value in (("--cache-dir", cache_dir), ("--model", model), ("--text-encoder", text_encoder)):
        refuse_url(value, what)
