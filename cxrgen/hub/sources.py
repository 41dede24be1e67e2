"""Where staged files come from: Hugging Face repos and plain URLs over HTTPS (WebSource), or a fake in tests.

A source lists a repo's files (sizes, hashes, the commit a revision resolves to) and opens one URL from a
byte offset; cxrgen.hub.download does the rest (the .part files, the checks, the record).
"""
from __future__ import annotations

import io
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
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
    """One file of a listing: where it goes (path in the component), where it comes from, what to expect."""

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
    """Where files come from: the web (WebSource) or, in tests, a local folder."""

    def listing(self, repo: str, revision: str, files: Sequence[str]) -> Listing: ...

    def open(self, url: str, offset: int) -> tuple[BinaryIO, int]: ...


class _SameOriginAuth(urllib.request.HTTPRedirectHandler):
    """Follow redirects keeping Range (the stdlib copies ordinary headers) and the token only on the same origin.

    The hub answers a file's resolve URL with a 302 to a signed CDN URL: the token must not follow it there
    (it would leak, and signed storage URLs refuse a second credential), so it is an unredirected header.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        token = req.unredirected_hdrs.get("Authorization")
        if new is not None and token and _origin(req.full_url) == _origin(new.full_url):
            new.add_unredirected_header("Authorization", token)
        return new


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class WebSource:
    """Hugging Face repos (listed with huggingface_hub, fetched over HTTPS with ranges) and plain URLs."""

    def listing(self, repo: str, revision: str, files: Sequence[str]) -> Listing:
        """Sizes and LFS sha256 of `files` in repo at revision, and the commit it resolves to."""
        if "://" in repo:  # a single file at a URL: its size comes with the download
            return Listing(revision, [RemoteFile(files[0], repo)])
        from huggingface_hub import HfApi, constants, hf_hub_url

        problem = hub_unreachable(constants.ENDPOINT)  # seconds, instead of the client's minutes of retries
        if problem:
            raise ConnectionError(f"the hub {constants.ENDPOINT} is unreachable ({problem})")
        info = HfApi().repo_info(repo, revision=revision, files_metadata=True)
        wanted = set(files)
        # pinned to the commit the revision resolved to, so every file comes from the same snapshot
        return Listing(info.sha, [RemoteFile(s.rfilename, hf_hub_url(repo, s.rfilename, revision=info.sha), s.size,
                                             s.lfs.sha256 if s.lfs else None)
                                  for s in info.siblings or [] if s.rfilename in wanted])

    def open(self, url: str, offset: int) -> tuple[BinaryIO, int]:
        """A response streaming url from offset; the offset actually served (0 if the server ignored the range)."""
        if urllib.parse.urlsplit(url).scheme not in ("https", "http", "file"):
            raise InputError(f"{url}: only https, http and file URLs can be downloaded")
        request = urllib.request.Request(url, headers={"User-Agent": f"cxrgen/{__version__}"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        token = _hub_token(url)
        if token:
            request.add_unredirected_header("Authorization", f"Bearer {token}")
        opener = urllib.request.build_opener(_SameOriginAuth)
        try:
            response = opener.open(request, timeout=60)
        except urllib.error.HTTPError as exc:
            total = _CONTENT_RANGE_TOTAL.search(exc.headers.get("Content-Range", "") if exc.headers else "")
            if exc.code == 416 and offset and total and int(total.group(1)) == offset:
                exc.close()  # the .part file is already whole (stopped before its check): nothing left to read
                return io.BytesIO(), offset
            raise
        if getattr(response, "status", None) != 206:
            return response, 0
        served = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if served is None or int(served.group(1)) != offset:
            response.close()
            raise OSError(f"{url}: asked for bytes from {offset:,}, the server sent "
                          f"{response.headers.get('Content-Range')!r}")
        return response, offset


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


def _hub_token(url: str) -> str | None:
    """The Hugging Face token (HF_TOKEN or the cached login) for a URL on the hub, as huggingface_hub sends it."""
    from huggingface_hub import constants, get_token

    if not url.startswith(constants.ENDPOINT + "/"):
        return None  # never to the evaluator's GitHub release or NVIDIA's hosting
    # the same rule as huggingface_hub's own requests (utils/_headers.get_token_to_send with token=None)
    return None if constants.HF_HUB_DISABLE_IMPLICIT_TOKEN else get_token()


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
