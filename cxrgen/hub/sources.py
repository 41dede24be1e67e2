"""Where staged files come from: Hugging Face repos through huggingface_hub, and plain URLs for what no hub serves.

A source lists a repo's files (sizes, LFS sha256, the commit a revision resolves to), fetches one listed file
with huggingface_hub's own transfer (its retries that resume a cut, its Xet backend, its token and redirect rules,
HF_ENDPOINT), finds a file already in the user's Hugging Face cache, and opens a plain URL from a byte offset:
the one hand-written transfer left, for NVIDIA's hosting zip of a bundle and the evaluator's GitHub release.
"""
from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, Sequence

from cxrgen import __version__
from cxrgen.errors import InputError

# NVIDIA's hosting of the MONAI model zoo, MONAI's own fallback when a bundle is not on Hugging Face
# (monai.bundle.scripts._get_monaihosting_bundle_url).
HUB_PROBE_SECONDS = 3.0  # offline, the hub client retries for minutes; one short probe fails in seconds
MONAI_HOSTING = "https://api.ngc.nvidia.com/v2/models/nvidia/monaihosting"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-\d+/(\d+|\*)")  # of a 206: first byte sent, file size
_CONTENT_RANGE_TOTAL = re.compile(r"bytes\s+\*/(\d+)")  # of a 416: the file size


def hosting_url(name: str, version: str) -> str:
    """The zip of bundle NAME at VERSION on NVIDIA's hosting; it holds one folder, NAME."""
    return f"{MONAI_HOSTING}/{name.lower()}/versions/{version}/files/{name}_v{version}.zip"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a listing: its path in the repo (or name at a URL), where it comes from, what to expect."""

    path: str
    url: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Listing:
    """The files of one component at one resolved revision (a commit hash, where the source has one)."""

    revision: str
    files: list[RemoteFile]


class Source(Protocol):
    """Where files come from (WebSource; tests point it at servers on 127.0.0.1)."""

    tool: str  # what transfers hub files, recorded with each file ("huggingface_hub 2.4.0")

    def listing(self, repo: str, revision: str, files: Sequence[str]) -> Listing: ...

    def fetch(self, repo: str, revision: str, remote: RemoteFile, local_dir: Path, progress: bool) -> Path: ...

    def cached(self, repo: str, path: str, revision: str) -> Path | None: ...

    def open(self, url: str, offset: int) -> tuple[BinaryIO, int]: ...


class WebSource:
    """The Hugging Face hub at `endpoint` (default: huggingface_hub's, i.e. $HF_ENDPOINT) and plain URLs."""

    def __init__(self, endpoint: str | None = None):
        self._endpoint = endpoint.rstrip("/") if endpoint else None

    @property
    def endpoint(self) -> str:
        from huggingface_hub import constants

        return self._endpoint or constants.ENDPOINT

    @property
    def tool(self) -> str:
        import huggingface_hub

        return f"huggingface_hub {huggingface_hub.__version__}"

    def listing(self, repo: str, revision: str, files: Sequence[str]) -> Listing:
        """Sizes and LFS sha256 of `files` in repo at revision, and the commit it resolves to."""
        from huggingface_hub import HfApi, constants, hf_hub_url

        if constants.HF_HUB_OFFLINE:  # huggingface_hub would refuse too; and no probe may touch the network
            raise ConnectionError("HF_HUB_OFFLINE is set, so the hub is not asked")
        problem = hub_unreachable(self.endpoint)  # seconds, instead of the client's minutes of retries
        if problem:
            raise ConnectionError(f"the hub {self.endpoint} is unreachable ({problem})")
        info = HfApi(endpoint=self.endpoint, library_name="cxrgen", library_version=__version__).model_info(
            repo, revision=revision, files_metadata=True)
        wanted = set(files)
        # pinned to the commit the revision resolved to, so every file comes from the same snapshot
        return Listing(info.sha, [RemoteFile(s.rfilename, hf_hub_url(repo, s.rfilename, revision=info.sha,
                                                                     endpoint=self.endpoint),
                                             s.size, s.lfs.sha256 if s.lfs else None)
                                  for s in info.siblings or [] if s.rfilename in wanted])

    def fetch(self, repo: str, revision: str, remote: RemoteFile, local_dir: Path, progress: bool) -> Path:
        """Download one listed file with huggingface_hub into local_dir (its local-dir layout, lock and metadata).

        A cut transfer is retried and resumed by huggingface_hub itself; a file it finished there before a stop
        is returned at once next time, not fetched again. The caller moves and verifies the file.
        """
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils.tqdm import silent_tqdm

        return Path(hf_hub_download(repo, remote.path, revision=revision, local_dir=local_dir, endpoint=self.endpoint,
                                    library_name="cxrgen", library_version=__version__,
                                    tqdm_class=None if progress else silent_tqdm))

    def cached(self, repo: str, path: str, revision: str) -> Path | None:
        """The file in the user's Hugging Face cache (HF_HUB_CACHE) at revision (a commit, branch or tag), or None."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, path, revision=revision)
        return Path(found) if isinstance(found, str) and os.path.isfile(found) else None

    def open(self, url: str, offset: int) -> tuple[BinaryIO, int]:
        """A response streaming url from offset; the offset actually served (0 if the server ignored the range)."""
        if urllib.parse.urlsplit(url).scheme not in ("https", "http", "file"):
            raise InputError(f"{url}: only https, http and file URLs can be downloaded")
        request = urllib.request.Request(url, headers={"User-Agent": f"cxrgen/{__version__}"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")  # an ordinary header: redirects keep it
        try:
            response = urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as exc:
            total = _CONTENT_RANGE_TOTAL.search(exc.headers.get("Content-Range", "") if exc.headers else "")
            if exc.code == 416 and offset and total and int(total.group(1)) == offset:
                exc.close()  # the .part file is already whole (stopped before its check): nothing left to read
                return _Empty(), offset
            raise
        if getattr(response, "status", None) != 206:
            return response, 0
        served = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if served is None or int(served.group(1)) != offset:
            response.close()
            raise OSError(f"{url}: asked for bytes from {offset:,}, the server sent "
                          f"{response.headers.get('Content-Range')!r}")
        return response, offset


CHUNK = 1 << 20
STAGING = ".hub"  # huggingface_hub's local-dir folder inside a component's folder, removed once it is staged


def link_or_copy(src: Path, dest: Path) -> None:
    """dest as a hard link to src (no extra space, src is never written in place), else a copy."""
    dest.unlink(missing_ok=True)
    try:
        os.link(src.resolve(), dest)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dest)


class _Empty:
    """The body of a download with nothing left to send."""

    headers = None

    def read(self, size: int = -1) -> bytes:
        return b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class Cut(Exception):
    """A plain download stopped early; its .part file keeps the bytes that arrived, and the next try resumes."""


def download_url(source: Source, url: str, part: Path, size: int | None = None, progress: bool = True) -> None:
    """Fetch url into part, resuming from part's size; raises Cut when the connection stops short.

    A server that ignores the range (a 200 with the whole file) is written from the first byte again, never
    appended; a body longer than the size the server announced is refused and the part removed.
    """
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    if size is not None and offset == size:
        return
    stream, start = source.open(url, offset)
    total = size if size is not None else content_total(stream, start)
    with stream, open(part, "r+b" if part.exists() else "wb") as handle, \
            tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
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
            raise Cut(f"download of {url} was cut at {handle.tell():,} bytes ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        handle.flush()
        os.fsync(handle.fileno())
        written = handle.tell()
    if total is not None and written != total:
        part.unlink()
        raise OSError(f"{url}: {written:,} bytes arrived for a file of {total:,}; the partial file was removed")


def content_total(stream, start: int) -> int | None:
    """The whole file's size as the response states it (Content-Range, else start + Content-Length), or None."""
    headers = getattr(stream, "headers", None)
    if headers is None:
        return None
    served = _CONTENT_RANGE.match(headers.get("Content-Range", "") or "")
    if served and served.group(2).isdigit():
        return int(served.group(2))
    length = headers.get("Content-Length")
    return start + int(length) if length and str(length).isdigit() else None


def hub_unreachable(endpoint: str, timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why a TCP connection to the hub (or the proxy that reaches it) fails within timeout, or None."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        # Behind a proxy the hub itself is not directly reachable; the proxy is what must answer.
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or "", proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port}: {exc.strerror or exc or type(exc).__name__}")

    # A thread, because name resolution ignores the socket timeout and can stall for tens of seconds.
    probe = threading.Thread(target=connect, name="cxrgen-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout + 0.5)
    if not outcome:
        return f"{host}:{port}: no answer within {timeout:g} s"
    return outcome[0]
