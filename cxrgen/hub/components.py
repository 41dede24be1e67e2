"""What each cached component is (bundle, text encoder, evaluator weights) and whether the cache holds it verified.

Network-free and torch-free: `cxrgen info` and the offline checks read only these; cxrgen.hub.download stages.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from cxrgen.config import split_ref
from cxrgen.errors import InputError
from cxrgen.hub.sources import hosting_url
from cxrgen.pins import (
    BUNDLE_FILES,
    BUNDLE_VERSIONS,
    DEFAULT_MODEL,
    DEFAULT_TEXT_ENCODER,
    EVALUATOR_REPO,
    EVALUATOR_REPO_FILE,
    KNOWN_SHA256,
    TEXT_ENCODER_FILES,
    TEXT_ENCODER_MIRROR,
    TEXT_ENCODER_REVISION,
)

MARKER = ".cxrgen-verified"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Component:
    """Something a run needs, staged as one folder of the cache."""

    kind: str  # "bundle", "text encoder" or "evaluator weights"
    ref: str  # what the user names: NAME@VERSION, REPO@REVISION or the weights' release name
    folder: Path
    repo: str  # hub repo id
    revision: str
    files: tuple[str, ...]  # paths in the folder
    command: str  # the `cxrgen download` command that fetches it
    options: tuple[str, ...] = ()  # that command's options naming this component
    cache_dir: Path = Path()
    expected_md5: dict = field(default_factory=dict)  # published md5 by file name (the bundle's checkpoints)
    expected_sha256: dict = field(default_factory=dict)  # published sha256 by file name (the evaluator's release)
    mirrors: tuple[str, ...] = ()  # other repos with the same files, tried in turn when the first fails
    remote_names: dict = field(default_factory=dict)  # path in the folder -> path in the repo, where they differ
    archive: str = ""  # URL of a zip with the same files under one folder, tried when no repo serves them
    archive_root: str = ""  # that folder's name
    url: str = ""  # URL of the one file, tried when no repo serves it (the evaluator's GitHub release)

    def remote(self, rel: str) -> str:
        """The path of a folder file in the repo."""
        return self.remote_names.get(rel, rel)


class Unavailable(InputError):
    """A source lacks the component or cannot be reached (not a cut or a bad file): the next source may serve it."""

    def __init__(self, message: str, reasons: str):
        super().__init__(message)
        self.reasons = reasons


def download_command(cache_dir: Path, *options: str) -> str:
    """The `cxrgen download` command with these options."""
    return " ".join(("cxrgen download", *options, "--cache-dir", str(cache_dir)))


def run_advice(component: Component, rerun: bool) -> str:
    """'run `cmd` again' to whoever ran `cxrgen download`; 'run `cmd`' to someone who only started a run."""
    return f"run `{component.command}`" + (" again" if rerun else "")


def bundle_component(model: str, cache_dir: str | Path, expected_md5: dict | None = None) -> Component:
    """The bundle NAME[@VERSION], pinned to BUNDLE_VERSIONS when no version is given."""
    from cxrgen.pins import KNOWN_MD5

    cache_dir = Path(cache_dir).expanduser()
    name, version = split_ref(model)
    version = version or BUNDLE_VERSIONS.get(name, "main")
    option = () if model == DEFAULT_MODEL else ("--model", f"{name}@{version}")
    return Component("bundle", f"{name}@{version}", cache_dir / "bundles" / f"{name}@{version}", f"MONAI/{name}",
                     version, BUNDLE_FILES, download_command(cache_dir, *option), option, cache_dir,
                     KNOWN_MD5.get(name, {}) if expected_md5 is None else expected_md5,
                     archive=hosting_url(name, version), archive_root=name)


def text_encoder_component(text_encoder: str, cache_dir: str | Path) -> Component:
    """The text encoder REPO[@REVISION] (tokenizer and text_encoder subfolders only)."""
    cache_dir = Path(cache_dir).expanduser()
    repo, revision = split_ref(text_encoder)
    mirrors = (TEXT_ENCODER_MIRROR,) if repo == DEFAULT_TEXT_ENCODER and revision is None else ()
    revision = revision or TEXT_ENCODER_REVISION
    option = () if text_encoder == DEFAULT_TEXT_ENCODER else ("--text-encoder", f"{repo}@{revision}")
    return Component("text encoder", f"{repo}@{revision}",
                     cache_dir / "text-encoders" / f"{repo.replace('/', '--')}@{revision}", repo, revision,
                     TEXT_ENCODER_FILES, download_command(cache_dir, *option), option, cache_dir, mirrors=mirrors)


def evaluator_component(url: str, cache_dir: str | Path) -> Component:
    """torchxrayvision's release file, kept where `cxrgen evaluate` has always looked for it.

    torchxrayvision publishes it on the hub too (EVALUATOR_REPO): that copy is used when its sha256 is the
    release's, else the file comes from url (the GitHub release), checked against the same digest.
    """
    cache_dir = Path(cache_dir).expanduser()
    name = url.rsplit("/", 1)[-1]
    sha256 = {name: KNOWN_SHA256[name]} if name in KNOWN_SHA256 else {}
    return Component("evaluator weights", name, cache_dir / "torchxrayvision", EVALUATOR_REPO, "main", (name,),
                     download_command(cache_dir, "--evaluator"), ("--evaluator",), cache_dir, expected_sha256=sha256,
                     remote_names={name: EVALUATOR_REPO_FILE}, url=url)


def verifier_component(url: str, cache_dir: str | Path, release: str) -> Component:
    """The torchxrayvision release file `cxrgen generate --verify` judges with, in verifiers/<release>/.

    The evaluator's own release is its component (one file, one download); every other release has a folder
    of its own, since a component's verified record covers exactly its folder's files. Like the evaluator's,
    the file is taken from torchxrayvision's hub repo of the release when it has one, else from url.
    """
    from cxrgen.pins import EVALUATOR_URL, VERIFIER_RELEASE

    if url == EVALUATOR_URL:
        return evaluator_component(url, cache_dir)
    cache_dir = Path(cache_dir).expanduser()
    name = url.rsplit("/", 1)[-1]
    option = ("--verifier",) if release == VERIFIER_RELEASE else ("--verifier-weights", release)
    sha256 = {name: KNOWN_SHA256[name]} if name in KNOWN_SHA256 else {}
    return Component("verifier weights", release, cache_dir / "verifiers" / release, f"torchxrayvision/{release}",
                     "main", (name,), download_command(cache_dir, *option), option, cache_dir, expected_sha256=sha256,
                     remote_names={name: EVALUATOR_REPO_FILE}, url=url)


# ------------------------------------------------------------------------------------------ checking


@dataclass(frozen=True)
class FileState:
    """One file of a component: where it is, its size, and verified / missing / corrupt / unverified."""

    path: Path
    size: int | None
    status: str


def read_marker(component: Component) -> dict | None:
    """The component's .cxrgen-verified record, or None."""
    try:
        data = json.loads((component.folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def check(component: Component, deep: bool = False) -> list[FileState]:
    """State of each file; deep re-hashes files changed (size or mtime) since they were verified."""
    marker = read_marker(component) or {"files": {}}
    states = []
    for rel in component.files:
        path = component.folder / rel
        recorded = marker["files"].get(rel)
        if not path.is_file():
            states.append(FileState(path, None, "missing"))
            continue
        stat = path.stat()
        if recorded is None:
            status = "unverified"
        elif stat.st_size != recorded.get("size"):
            status = "corrupt"
        elif deep and stat.st_mtime_ns != recorded.get("mtime_ns"):
            status = "verified" if digests(path)["sha256"] == recorded.get("sha256") else "corrupt"
        else:
            status = "verified"
        states.append(FileState(path, stat.st_size, status))
    return states


def is_staged(component: Component) -> bool:
    """Every file present with its verified size (a quick check: one stat per file)."""
    return all(state.status == "verified" for state in check(component))


def offline_error(component: Component, states: list[FileState] | None = None) -> InputError:
    """The one line naming the first missing file and the command that fetches it."""
    return offline_error_all([(component, check(component) if states is None else states)])


def offline_error_all(missing: list[tuple[Component, list[FileState]]]) -> InputError:
    """One line naming every component that is not staged (each with its first bad file) and one command for all."""
    parts = []
    for component, states in missing:
        bad = next((s for s in states if s.status != "verified"), None)
        what = f"{bad.path} is {bad.status}" if bad else f"{component.folder} is incomplete"
        parts.append(f"the {component.kind} {component.ref} ({what})")
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    first = missing[0][0]
    command = download_command(first.cache_dir, *(o for c, _ in missing for o in c.options))
    return InputError(f"offline: {listed} {'is' if len(parts) == 1 else 'are'} not staged; run `{command}` on a "
                      "machine with internet and copy the cache folder here (or drop --offline / HF_HUB_OFFLINE)")


def digests(path: Path) -> dict:
    """md5 and sha256 of a file, read once."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}
