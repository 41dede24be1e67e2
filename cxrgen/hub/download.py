"""Stage the files a run needs in $CXRGEN_HOME: the bundle, the text encoder, the evaluator's weights.

Each component is a folder holding exactly the files listed for it and, once every file is verified,
a `.cxrgen-verified` record (source, requested and fetched revision, size, hashes and the tool that
fetched each file). Hub files come through huggingface_hub (cxrgen.hub.sources), or are taken from
the user's Hugging Face cache when a copy is already there; one process stages a component while the
others (ranks starting together) wait on a file lock and then use its result. A bundle the hub lacks
(or a hub that cannot be reached) is taken from its zip on NVIDIA's hosting, as MONAI does, and the
evaluator's weights from torchxrayvision's GitHub release, both over plain HTTPS.
"""
from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable

from cxrgen import __version__
from cxrgen.errors import CxrgenError, InputError, RunError, first_line
from cxrgen.files import write_json
from cxrgen.hub.components import (
    CHUNK,
    MARKER,
    Component,
    Unavailable,
    check,
    digests,
    is_staged,
    offline_error,
    offline_error_all,
    run_advice,
)
from cxrgen.hub.sources import (
    STAGING,
    Cut,
    Listing,
    RemoteFile,
    Source,
    WebSource,
    download_url,
    link_or_copy,
)

PART = ".part"
HF_CACHE = "the Hugging Face cache"  # the `via` of a file linked or copied from the user's HF_HUB_CACHE
# Loggers that print on their own: MONAI's download summaries (twice, with blank lines) and its URL helper.
_MONAI_LOGGERS = ("monai.bundle.scripts", "monai.bundle", "monai.apps", "monai.apps.utils")
Log = Callable[[str], None]


def missing_offline(components: list[Component], source: Source | None = None) -> InputError | None:
    """The error naming every component that is neither staged nor whole in the Hugging Face cache; None if none."""
    source = source or WebSource()
    missing = [(c, check(c)) for c in components if not is_staged(c) and _hf_cached(c, source) is None]
    return offline_error_all(missing) if missing else None


def record_files(component: Component, source: str, revision: str, via: str = "placed by hand") -> None:
    """Write the .cxrgen-verified record of files put in place by other means (e.g. a custom source)."""
    files = {}
    for rel in component.files:
        path = component.folder / rel
        files[rel] = {"size": path.stat().st_size, **digests(path), "mtime_ns": path.stat().st_mtime_ns, "via": via}
    _write_marker(component, source, revision, files)


def _write_marker(component: Component, source: str, revision: str, files: dict) -> None:
    write_json(component.folder / MARKER, {"kind": component.kind, "source": source, "requested": component.revision,
                                           "revision": revision, "cxrgen_version": __version__,
                                           "fetched_with": sorted({f.get("via", "") for f in files.values()} - {""}),
                                           "files": files})


# ------------------------------------------------------------------------------------------ staging


def stage(component: Component, source: Source | None = None, *, offline: bool = False, progress: bool = True,
          log: Log | None = None, rerun: bool = False) -> Path:
    """The component's folder, fetched and verified first unless it already is; one process at a time.

    Offline, only a whole copy in the Hugging Face cache can complete it. `rerun`: the caller is `cxrgen
    download` itself, so its advice says "run ... again".
    """
    from filelock import FileLock, Timeout

    if is_staged(component):
        return component.folder
    source = source or WebSource()
    if offline and _hf_cached(component, source) is None:
        raise offline_error(component)
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
        if offline:  # 2a. a whole copy in the Hugging Face cache (checked above)
            origin, revision, files = _from_hf_cache(component, source, rerun)
        else:
            try:
                # 2b. list the files (the first mirror that answers), then take each from the Hugging Face
                # cache or fetch it with huggingface_hub
                origin, revision, files = _from_repo(component, source, progress, log, rerun)
            except Unavailable as failure:
                # 3. no repo serves it: the zip on NVIDIA's hosting (bundles), as monai.bundle.download does,
                # or the file's own URL (the evaluator's GitHub release)
                if not (component.archive or component.url):
                    raise
                origin, revision, files = _from_url(component, source, failure, progress, log, rerun)
        # 4. the record comes last: without it the folder is not trusted
        _write_marker(component, origin, revision, files)
        shutil.rmtree(component.folder / STAGING, ignore_errors=True)
    finally:
        lock.release()
    return component.folder


def _from_repo(component: Component, source: Source, progress: bool, log: Log | None,
               rerun: bool) -> tuple[str, str, dict]:
    listing, repo = _list(component, source, rerun)
    by_path = {f.path: f for f in listing.files}
    if log and progress:
        log(f"cxrgen: downloading the {component.kind} {component.ref} from {repo} into {component.folder}")
    component.folder.mkdir(parents=True, exist_ok=True)
    files, reused = {}, 0
    for rel in component.files:
        remote = by_path[component.remote(rel)]
        dest = component.folder / rel
        part = dest.with_name(dest.name + PART)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file() and remote.size in (None, dest.stat().st_size):
            # in place from an attempt that stopped at a later file: checked like a fresh download, not fetched again
            os.replace(dest, part)
            via = source.tool
        elif (cached := source.cached(repo, remote.path, listing.revision)) is not None:
            link_or_copy(cached, part)
            via, reused = HF_CACHE, reused + 1
        else:
            _fetch(source, repo, listing.revision, remote, part, component, progress, rerun)
            via = source.tool
        files[rel] = {**verify(part, dest, remote, component, rerun), "via": via}
    if log and progress and reused:
        log(f"cxrgen: {reused} of {len(files)} file(s) of the {component.kind} were already in the Hugging Face "
            "cache: used from there, not downloaded")
    return repo, listing.revision, files


def _fetch(source: Source, repo: str, revision: str, remote: RemoteFile, part: Path, component: Component,
           progress: bool, rerun: bool) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        os.replace(source.fetch(repo, revision, remote, component.folder / STAGING, progress), part)
    except CxrgenError:
        raise
    except HfHubHTTPError as exc:  # the hub answered with an error status: the next source may serve the file
        reason = f"{remote.url}: {first_line(exc, with_type=True)}"
        raise Unavailable(f"cannot download the {component.kind} {component.ref} ({reason}); check the network "
                          f"and {run_advice(component, rerun)}", reason) from None
    except Exception as exc:  # noqa: BLE001 - the connection failed beyond huggingface_hub's own retries
        raise InputError(f"download of {remote.url} stopped ({first_line(exc, with_type=True)}) after "
                         f"huggingface_hub's own retries; the files already fetched are kept: "
                         f"{run_advice(component, rerun)} to fetch the rest") from None


def _list(component: Component, source: Source, rerun: bool) -> tuple[Listing, str]:
    errors = []
    for repo in (component.repo, *component.mirrors):
        try:
            listing = source.listing(repo, component.revision, [component.remote(f) for f in component.files])
        except CxrgenError:
            raise
        except Exception as exc:  # noqa: BLE001 - network, HTTP and hub errors: try the next mirror
            errors.append(f"{repo}: {first_line(exc, with_type=True)}")
            if isinstance(exc, ConnectionError):
                break  # the mirrors are on the same hub
            continue
        listed = {f.path: f for f in listing.files}
        missing = sorted(component.remote(f) for f in component.files if component.remote(f) not in listed)
        if missing:
            errors.append(f"{repo}@{listing.revision} lacks {', '.join(missing)}")
            continue
        # a published digest decides before any byte is fetched (the hub's copy of a release may differ)
        other = [f"{repo}/{component.remote(rel)} has sha256 {listed[component.remote(rel)].sha256}, the published "
                 f"file {want}" for rel, want in component.expected_sha256.items()
                 if listed[component.remote(rel)].sha256 not in (None, want)]
        if other:
            errors.append("; ".join(other))
            continue
        return listing, repo
    raise Unavailable(f"cannot download the {component.kind} {component.ref} ({'; '.join(errors)}); check the "
                      f"network and {run_advice(component, rerun)}, or run it on a connected machine and copy the "
                      "cache folder here", "; ".join(errors))


def _hf_cached(component: Component, source: Source) -> tuple[str, dict[str, Path]] | None:
    """(repo, {file: path}) when every file is in the Hugging Face cache at the requested revision, else None."""
    for repo in (component.repo, *component.mirrors):
        try:
            found = {rel: source.cached(repo, component.remote(rel), component.revision) for rel in component.files}
        except ValueError:  # not a valid repo id or revision (huggingface_hub's HFValidationError): not cached
            continue
        if all(found.values()):
            return repo, found
    return None


def _from_hf_cache(component: Component, source: Source, rerun: bool) -> tuple[str, str, dict]:
    repo, found = _hf_cached(component, source)
    # the cache's layout: .../snapshots/<commit>/<file>
    commit = next(iter(found.values())).parts[-1 - len(Path(component.remote(component.files[0])).parts)]
    files = {}
    for rel, cached in found.items():
        dest = component.folder / rel
        part = dest.with_name(dest.name + PART)
        part.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(cached, part)
        files[rel] = {**verify(part, dest, RemoteFile(component.remote(rel), str(cached)), component, rerun),
                      "via": HF_CACHE}
    return repo, commit, files


def _from_url(component: Component, source: Source, failure: Unavailable, progress: bool, log: Log | None,
              rerun: bool) -> tuple[str, str, dict]:
    """The component from plain HTTPS: the zip of its files (NVIDIA's hosting), or its one file's URL."""
    url = component.archive or component.url
    where = "NVIDIA's hosting" if component.archive else "its release URL"
    component.folder.mkdir(parents=True, exist_ok=True)
    dest = component.folder / (url.rsplit("/", 1)[-1] if component.archive else component.files[0])
    part = dest.with_name(dest.name + PART)
    try:
        download_url(source, url, part, progress=progress)
    except Cut as exc:
        raise InputError(f"{exc}; {run_advice(component, rerun)}: it resumes from there") from None
    except Exception as exc:  # noqa: BLE001 - HTTP error, network: both sources failed
        fix = "give --model /path/to/the/bundle/folder" if component.kind == "bundle" else \
            f"place the file at {dest} by hand (or pass --evaluator-weights FILE to `cxrgen evaluate`)"
        raise InputError(f"cannot download the {component.kind} {component.ref} from Hugging Face ({failure.reasons}) "
                         f"nor from {where} ({url}: {first_line(exc, with_type=True)}); check the network and "
                         f"{run_advice(component, rerun)}, or {fix}, or run that command on a machine with internet "
                         "and copy the cache folder here") from None
    if component.archive:
        files = _extract(component, part, url, rerun)
    else:
        files = {dest.name: {**verify(part, dest, RemoteFile(dest.name, url), component, rerun), "via": _HTTP}}
    if log and progress:  # said only now: where both sources fail, the one error line is all a user sees
        log(f"cxrgen: the hub does not serve the {component.kind} {component.ref} ({failure.reasons}); "
            f"took it from {url}")
    return url, component.revision, files


_HTTP = f"cxrgen {__version__} (plain HTTP)"


def _extract(component: Component, zip_path: Path, url: str, rerun: bool) -> dict:
    """Take the component's files out of the zip, each through .part and the same checks as a download."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            # Only these exact member names are read, and each is written to a path of our own making: no
            # other member (say `../x` or `/etc/x`) is ever extracted.
            members = {rel: f"{component.archive_root}/{rel}" for rel in component.files}
            missing = sorted(set(members.values()) - set(archive.namelist()))
            if missing:
                raise InputError(f"{url} lacks {', '.join(missing)}; it was removed: check the {component.kind} name "
                                 "and version, or give --model /path/to/the/bundle/folder")
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
                files[rel] = {**verify(part, dest, remote, component, rerun), "via": _HTTP}
    except zipfile.BadZipFile as exc:
        zip_path.unlink(missing_ok=True)
        raise InputError(f"the file from {url} is not a readable zip ({first_line(exc, with_type=True)}); it was "
                         f"removed: {run_advice(component, rerun)}") from None
    except CxrgenError:
        zip_path.unlink(missing_ok=True)  # the same bytes would fail again: fetch it anew next time
        raise
    zip_path.unlink()  # every file is out and verified
    return files


def verify(part: Path, dest: Path, remote: RemoteFile, component: Component, rerun: bool = False) -> dict:
    """Check part against the listed size and every known digest, then move it to dest; a bad part is removed."""
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        part.unlink()
        raise InputError(f"{dest}: downloaded {size:,} bytes but the source lists {remote.size:,}; it was removed: "
                         f"{run_advice(component, rerun)}")
    found = digests(part)
    published = component.expected_sha256.get(dest.name) or remote.sha256
    for algo, want in (("md5", component.expected_md5.get(dest.name)), ("sha256", published)):
        if want and found[algo] != want:
            part.unlink()
            raise InputError(f"{dest}: {algo} {found[algo]} but the published file has {want} (corrupt or changed "
                             f"download); it was removed: {run_advice(component, rerun)}")
    os.replace(part, dest)
    return {"size": size, **found, "mtime_ns": dest.stat().st_mtime_ns}


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
