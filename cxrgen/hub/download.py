"""Stage the files a run needs in $CXRGEN_HOME: the bundle, the text encoder, the evaluator's weights.

Each component is a folder holding exactly the files listed for it and, once every file is verified,
a `.cxrgen-verified` record (source, requested and fetched revision, size and hashes of each file).
Files arrive through `<name>.part` and are resumed from its size; one process downloads a component
while the others (ranks starting together) wait on a file lock and then use its result. A bundle the hub
lacks (or a hub that cannot be reached) is taken from its zip on NVIDIA's hosting, as MONAI does.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cxrgen import __version__
from cxrgen.config import split_ref
from cxrgen.errors import CxrgenError, InputError, RunError, first_line
from cxrgen.files import write_json
from cxrgen.hub.sources import (
    Listing,
    RemoteFile,
    Source,
    WebSource,
    content_total,
    hosting_url,
)
from cxrgen.pins import (
    BUNDLE_FILES,
    BUNDLE_VERSIONS,
    DEFAULT_MODEL,
    DEFAULT_TEXT_ENCODER,
    TEXT_ENCODER_FILES,
    TEXT_ENCODER_MIRROR,
    TEXT_ENCODER_REVISION,
)

MARKER = ".cxrgen-verified"
PART = ".part"
CHUNK = 1 << 20
# Loggers that print on their own: MONAI's download summaries (twice, with blank lines) and its URL helper.
_MONAI_LOGGERS = ("monai.bundle.scripts", "monai.bundle", "monai.apps", "monai.apps.utils")
Log = Callable[[str], None]


@dataclass(frozen=True)
class Component:
    """Something a run needs, staged as one folder of the cache."""

    kind: str  # "bundle", "text encoder" or "evaluator weights"
    ref: str  # what the user names: NAME@VERSION, REPO@REVISION or the weights' URL
    folder: Path
    repo: str  # hub repo id, or the URL of a single file
    revision: str
    files: tuple[str, ...]
    command: str  # the `cxrgen download` command that fetches it
    expected_md5: dict = field(default_factory=dict)  # published md5 by file name (the bundle's checkpoints)
    mirrors: tuple[str, ...] = ()  # other repos with the same files, tried in turn when the first fails
    archive: str = ""  # URL of a zip with the same files under one folder, tried when no repo serves them
    archive_root: str = ""  # that folder's name


class Unavailable(InputError):
    """A source lacks the component or cannot be reached (not a cut or a bad file): the next source may serve it."""

    def __init__(self, message: str, reasons: str):
        super().__init__(message)
        self.reasons = reasons


def _command(cache_dir: Path, *options: str) -> str:
    return " ".join(("cxrgen download", *options, "--cache-dir", str(cache_dir)))


def bundle_component(model: str, cache_dir: str | Path, expected_md5: dict | None = None) -> Component:
    """The bundle NAME[@VERSION], pinned to BUNDLE_VERSIONS when no version is given."""
    from cxrgen.pins import KNOWN_MD5

    cache_dir = Path(cache_dir).expanduser()
    name, version = split_ref(model)
    version = version or BUNDLE_VERSIONS.get(name, "main")
    option = () if model == DEFAULT_MODEL else ("--model", f"{name}@{version}")
    return Component("bundle", f"{name}@{version}", cache_dir / "bundles" / f"{name}@{version}", f"MONAI/{name}",
                     version, BUNDLE_FILES, _command(cache_dir, *option),
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
                     TEXT_ENCODER_FILES, _command(cache_dir, *option), mirrors=mirrors)


def evaluator_component(url: str, cache_dir: str | Path) -> Component:
    """torchxrayvision's release file at URL, kept where `cxrgen evaluate` has always looked for it."""
    cache_dir = Path(cache_dir).expanduser()
    name = url.rsplit("/", 1)[-1]
    return Component("evaluator weights", url, cache_dir / "torchxrayvision", url, "release", (name,),
                     _command(cache_dir, "--evaluator"))


def verifier_component(url: str, cache_dir: str | Path, release: str) -> Component:
    """The torchxrayvision release file `cxrgen generate --verify` judges with, in verifiers/<release>/.

    The evaluator's own release is its component (one file, one download); every other release has a folder
    of its own, since a component's verified record covers exactly its folder's files.
    """
    from cxrgen.pins import EVALUATOR_URL, VERIFIER_RELEASE

    if url == EVALUATOR_URL:
        return evaluator_component(url, cache_dir)
    cache_dir = Path(cache_dir).expanduser()
    option = ("--verifier",) if release == VERIFIER_RELEASE else ("--verifier-weights", release)
    return Component("verifier weights", url, cache_dir / "verifiers" / release, url, "release",
                     (url.rsplit("/", 1)[-1],), _command(cache_dir, *option))


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
            status = "verified" if _digests(path)["sha256"] == recorded.get("sha256") else "corrupt"
        else:
            status = "verified"
        states.append(FileState(path, stat.st_size, status))
    return states


def is_staged(component: Component) -> bool:
    """Every file present with its verified size (a quick check: one stat per file)."""
    return all(state.status == "verified" for state in check(component))


def offline_error(component: Component, states: list[FileState] | None = None) -> InputError:
    """The one line naming the first missing file and the command that fetches it."""
    states = check(component) if states is None else states
    bad = next((s for s in states if s.status != "verified"), None)
    what = f"{bad.path} is {bad.status}" if bad else f"{component.folder} is incomplete"
    return InputError(f"offline: the {component.kind} {component.ref} is not staged ({what}); "
                      f"run `{component.command}` "
                      "on a machine with internet and copy the cache folder here (or drop --offline / HF_HUB_OFFLINE)")


def record_files(component: Component, source: str, revision: str) -> None:
    """Write the .cxrgen-verified record of files put in place by other means (e.g. a custom source)."""
    files = {}
    for rel in component.files:
        path = component.folder / rel
        files[rel] = {"size": path.stat().st_size, **_digests(path), "mtime_ns": path.stat().st_mtime_ns}
    _write_marker(component, source, revision, files)


def _write_marker(component: Component, source: str, revision: str, files: dict) -> None:
    write_json(component.folder / MARKER, {"kind": component.kind, "source": source, "requested": component.revision,
                                           "revision": revision, "cxrgen_version": __version__, "files": files})


# ------------------------------------------------------------------------------------------ staging


def stage(component: Component, source: Source | None = None, *, offline: bool = False, progress: bool = True,
          log: Log | None = None) -> Path:
    """The component's folder, downloaded and verified first unless it already is; one process at a time."""
    from filelock import FileLock, Timeout

    if is_staged(component):
        return component.folder
    if offline:
        raise offline_error(component)
    source = source or WebSource()
    locks = component.folder.parent / ".locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{component.folder.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:  # another process (rank) is downloading it
            if log:
                log(f"cxrgen: waiting for another process downloading the {component.kind} {component.ref}")
            lock.acquire()
    except OSError as exc:  # a read-only cache, or a file where a folder should be
        raise RunError(f"cannot write to the cache {locks.parent}: {os.strerror(exc.errno) if exc.errno else exc}; "
                       "give a writable --cache-dir (or set $CXRGEN_HOME), or run "
                       f"`{component.command}` where the cache can be written") from None
    try:
        # 1. another process may have finished while this one waited: use its result
        if is_staged(component):
            return component.folder
        try:
            # 2. list the files (the first mirror that answers), then fetch each, resuming a .part file
            origin, revision, files = _from_repo(component, source, progress, log)
        except Unavailable as failure:
            if not component.archive:
                raise
            # 3. no repo serves it: the zip on NVIDIA's hosting (bundles), as monai.bundle.download does
            origin, revision, files = _from_archive(component, source, failure, progress, log)
        # 4. the record comes last: without it the folder is not trusted
        _write_marker(component, origin, revision, files)
    finally:
        lock.release()
    return component.folder


def _from_repo(component: Component, source: Source, progress: bool, log: Log | None) -> tuple[str, str, dict]:
    listing, repo = _list(component, source)
    if log and progress:
        log(f"cxrgen: downloading the {component.kind} {component.ref} from {repo} into {component.folder}")
    component.folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for remote in listing.files:
        try:
            files[remote.path] = fetch_file(source, remote, component.folder / remote.path, component, progress)
        except CxrgenError:
            raise  # a cut (resumable) or a file that fails its check: not a reason to switch sources
        except Exception as exc:  # noqa: BLE001 - the URL could not be opened (HTTP error, network)
            reason = f"{remote.url}: {first_line(exc, with_type=True)}"
            raise Unavailable(f"cannot download the {component.kind} {component.ref} ({reason}); check the network "
                              f"and run `{component.command}` again", reason) from None
    return repo, listing.revision, files


def _list(component: Component, source: Source) -> tuple[Listing, str]:
    errors = []
    for repo in (component.repo, *component.mirrors):
        try:
            listing = source.listing(repo, component.revision, component.files)
        except CxrgenError:
            raise
        except Exception as exc:  # noqa: BLE001 - network, HTTP and hub errors: try the next mirror
            errors.append(f"{repo}: {first_line(exc, with_type=True)}")
            if isinstance(exc, ConnectionError):
                break  # the mirrors are on the same hub
            continue
        missing = sorted(set(component.files) - {f.path for f in listing.files})
        if missing:
            errors.append(f"{repo}@{listing.revision} lacks {', '.join(missing)}")
            continue
        return listing, repo
    raise Unavailable(f"cannot download the {component.kind} {component.ref} ({'; '.join(errors)}); check the "
                      f"network and run `{component.command}` again, or run it on a connected machine and copy the "
                      "cache folder here", "; ".join(errors))


def _from_archive(component: Component, source: Source, failure: Unavailable, progress: bool,
                  log: Log | None) -> tuple[str, str, dict]:
    url = component.archive
    zip_path = component.folder / url.rsplit("/", 1)[-1]
    component.folder.mkdir(parents=True, exist_ok=True)
    try:
        fetch_file(source, RemoteFile(zip_path.name, url), zip_path, component, progress)
    except CxrgenError:
        raise  # cut: resumes from the .part file next time
    except Exception as exc:  # noqa: BLE001 - HTTP error, network: both sources failed
        raise InputError(f"cannot download the {component.kind} {component.ref} from Hugging Face ({failure.reasons}) "
                         f"nor from NVIDIA's hosting ({url}: {first_line(exc, with_type=True)}); check the network and run "
                         f"`{component.command}` again, or give --model /path/to/the/bundle/folder, or run that "
                         "command on a machine with internet and copy the cache folder here") from None
    try:
        files = _extract(component, zip_path, url)
    except zipfile.BadZipFile as exc:
        zip_path.unlink(missing_ok=True)
        raise InputError(f"{zip_path} from {url} is not a readable zip ({first_line(exc, with_type=True)}); it was removed: run "
                         f"`{component.command}` again") from None
    except CxrgenError:
        zip_path.unlink(missing_ok=True)  # the same bytes would fail again: fetch it anew next time
        raise
    zip_path.unlink()  # every file is out and verified
    if log and progress:  # said only now: where both sources fail, the one error line is all a user sees
        log(f"cxrgen: the hub does not serve the {component.kind} {component.ref} ({failure.reasons}); "
            f"took it from {url}")
    return url, component.revision, files


def _extract(component: Component, zip_path: Path, url: str) -> dict:
    """Take the component's files out of the zip, each through .part and the same checks as a download."""
    with zipfile.ZipFile(zip_path) as archive:
        # Only these exact member names are read, and each is written to a path of our own making: no
        # other member (say `../x` or `/etc/x`) is ever extracted.
        members = {rel: f"{component.archive_root}/{rel}" for rel in component.files}
        names = set(archive.namelist())
        missing = sorted(m for m in members.values() if m not in names)
        if missing:
            raise InputError(f"{url} lacks {', '.join(missing)}; it was removed: check the {component.kind} name and "
                             f"version, or give --model /path/to/the/bundle/folder")
        files = {}
        for rel, member in members.items():
            dest = component.folder / rel
            part = dest.with_name(dest.name + PART)
            part.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(part, "wb") as out:  # zipfile checks each member's CRC
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            remote = RemoteFile(rel, f"{url}#{member}", archive.getinfo(member).file_size)
            files[rel] = _verify(part, dest, remote, component)
    return files


def fetch_file(source: Source, remote: RemoteFile, dest: Path, component: Component, progress: bool = True) -> dict:
    """Download one file through dest.part (resumed from its size), verify it, move it into place."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + PART)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and not part.exists() and remote.size in (None, dest.stat().st_size):
        # in place from an attempt that stopped at a later file: checked like a fresh download, not fetched again
        os.replace(dest, part)
        return _verify(part, dest, remote, component)
    offset = part.stat().st_size if part.is_file() else 0
    if remote.size is not None and offset > remote.size:
        part.unlink()
        offset = 0
    if remote.size is None or offset < remote.size:
        stream, start = source.open(remote.url, offset)
        total = remote.size if remote.size is not None else content_total(stream, start)
        with stream, open(part, "r+b" if part.exists() else "wb") as handle, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=remote.path,
                     disable=not progress, leave=False) as bar:
            handle.seek(start)
            handle.truncate()  # a server that ignored the range sends everything again
            try:
                while chunk := stream.read(CHUNK):
                    handle.write(chunk)
                    bar.update(len(chunk))
                if total is not None and handle.tell() < total:
                    # http.client ends a body cut short of its Content-Length quietly, as if it were whole
                    raise ConnectionError(f"the server sent {handle.tell():,} of {total:,} bytes")
            except (OSError, http.client.HTTPException) as exc:
                handle.flush()
                os.fsync(handle.fileno())
                raise InputError(f"download of {remote.url} was cut at {handle.tell():,} bytes "
                                 f"({first_line(exc, with_type=True)}); run `{component.command}` again: it resumes from "
                                 "there") from None
            handle.flush()
            os.fsync(handle.fileno())
    return _verify(part, dest, remote, component)


def _verify(part: Path, dest: Path, remote: RemoteFile, component: Component) -> dict:
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        part.unlink()
        raise InputError(f"{dest}: downloaded {size:,} bytes but the source lists {remote.size:,}; it was removed: "
                         f"run `{component.command}` again")
    digests = _digests(part)
    for algo, want in (("md5", component.expected_md5.get(Path(remote.path).name)), ("sha256", remote.sha256)):
        if want and digests[algo] != want:
            part.unlink()
            raise InputError(f"{dest}: {algo} {digests[algo]} but the published file has {want} (corrupt or changed "
                             f"download); it was removed: run `{component.command}` again")
    os.replace(part, dest)
    return {"size": size, **digests, "mtime_ns": dest.stat().st_mtime_ns}


def _digests(path: Path) -> dict:
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


# ------------------------------------------------------------------------------------------ logs


def quiet_library_logs(verbose: bool = False) -> None:
    """Keep MONAI's, transformers' and huggingface_hub's own log lines off the terminal unless verbose."""
    if verbose:
        return
    for name in _MONAI_LOGGERS:
        # `disabled` survives MONAI's get_logger, which resets the level and adds a stdout handler at import
        logging.getLogger(name).disabled = True
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hub_logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
