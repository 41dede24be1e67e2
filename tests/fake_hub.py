"""A loopback Hugging Face hub for tests: the hub's documented HTTP endpoints over a folder, on 127.0.0.1.

`LoopbackHub` answers what huggingface_hub asks of the real hub, so cxrgen's downloads run through the real
huggingface_hub code (listing, HEAD metadata, redirects, Range, token rules) with HF_ENDPOINT pointed here:

- GET /api/models/{repo}/revision/{revision}: the repo's commit and siblings (rfilename, size, blobId, lfs)
- HEAD and GET /{repo}/resolve/{revision}/{file}: X-Repo-Commit, ETag (git blob id) or, for LFS files,
  X-Linked-Etag (sha256) and X-Linked-Size with a 302 to a second server playing the CDN, which serves the
  bytes with Range support; unknown repos, revisions and files get 404 with the hub's X-Error-Code
- GET /urls/{name}: plain files (the bundle's zip on NVIDIA's hosting, the evaluator's GitHub release)

Layout: ROOT/<repo>/<revision>/<files>, ROOT/urls/<file name>. Knobs: `cut` (path -> bytes sent of the
next answer before the connection closes; `cut_every`: of every answer), `ignore_range` (plain files: a 200 with everything),
`no_length` (plain files: no Content-Length, the body ends when the connection closes), `delay`.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

from cxrgen.hub.sources import WebSource

COMMIT = "f" * 40
LFS_ABOVE = 1000  # bytes: larger files are stored with LFS (so the listing gives their sha256)
_API = re.compile(r"/api/models/([^/]+/[^/]+)/revision/([^/?]+)")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


def commit_of(revision: str) -> str:
    """A 40-hex fake commit per revision (the hub resolves a branch or tag to one)."""
    return hashlib.sha1(revision.encode()).hexdigest() if revision != "main" else COMMIT


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: "LoopbackHub", role: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.role = hub, role
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class LoopbackHub:
    """The hub, its CDN and plain URLs over ROOT; every request is recorded in `seen` (method, path, headers)."""

    def __init__(self, root: Path, *, lfs_sha256: bool = True):
        self.root, self.lfs_sha256 = Path(root), lfs_sha256
        self.root.mkdir(parents=True, exist_ok=True)
        self.cut: dict[str, int] = {}
        self.cut_every: dict[str, int] = {}  # path -> bytes sent of every answer (a connection that always drops)
        self.ignore_range = self.no_length = False
        self.delay = 0.0
        self.seen: list[tuple[str, str, dict]] = []
        self.transfers: list[tuple[str, int]] = []  # (repo/revision/file or urls/name, first byte) of each body sent
        self._lock = threading.Lock()
        self.hub, self.cdn = _Server(self, "hub"), _Server(self, "cdn")

    @property
    def url(self) -> str:
        return self.hub.url

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def add_repo(self, repo: str, revision: str, src: Path, extra: dict | None = None) -> Path:
        """Copy folder src in as repo@revision, plus extra {relative path: bytes} files (e.g. fp16 copies)."""
        base = self.root / repo / revision
        shutil.copytree(src, base, dirs_exist_ok=True)
        for rel, data in (extra or {}).items():
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).write_bytes(data)
        return base

    def add_url(self, url: str, src: Path) -> None:
        """Serve file src at url (reached through `source()`, which maps url to this server)."""
        (self.root / "urls").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.root / "urls" / url.rsplit("/", 1)[-1])

    def plain_url(self, url: str) -> str:
        return f"{self.url}/urls/{url.rsplit('/', 1)[-1]}"

    def source(self) -> WebSource:
        """cxrgen's real source, with the hub here and every plain URL mapped to /urls/ here."""
        hub = self

        class Loopback(WebSource):
            def open(self, url, offset):
                return super().open(url if url.startswith(hub.url) else hub.plain_url(url), offset)

        return Loopback(self.url)

    def listings(self) -> list[tuple[str, str]]:
        """(repo, revision) of every listing asked for."""
        return [m.groups() for method, path, _ in self.seen if (m := _API.match(path.split("?")[0]))]

    def requests(self, prefix: str) -> list[dict]:
        """Headers of every request whose path starts with prefix."""
        return [headers for _, path, headers in self.seen if path.startswith(prefix)]

    def _record(self, method: str, path: str, headers: dict) -> None:
        with self._lock:
            self.seen.append((method, path, headers))

    def _repo_folder(self, repo: str, revision: str) -> tuple[Path, str] | None:
        """The folder of repo at a revision name or at the commit it resolves to."""
        base = self.root / repo
        if not base.is_dir() or repo.startswith("urls"):
            return None
        for folder in base.iterdir():
            if folder.is_dir() and revision in (folder.name, commit_of(folder.name)):
                return folder, commit_of(folder.name)
        return None


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_HEAD(self):  # noqa: N802 - http.server's name
        self._answer(head=True)

    def do_GET(self):  # noqa: N802
        self._answer(head=False)

    def log_message(self, *args):
        pass

    # ---------------------------------------------------------------- routing

    def _answer(self, head: bool) -> None:
        hub, path = self.server.hub, urllib.parse.unquote(self.path.split("?")[0])
        hub._record(self.command, path, {k.lower(): v for k, v in self.headers.items()})
        if self.server.role == "cdn":
            return self._cdn(path, head)
        if path.startswith("/urls/"):
            return self._bytes((hub.root / path.lstrip("/")), f"urls/{path[6:]}", head, plain=True)
        if (match := _API.fullmatch(path)) and not head:
            return self._listing(*match.groups())
        if match := _RESOLVE.fullmatch(path):
            return self._resolve(*match.groups(), head=head)
        self._error(404, "RepoNotFound", "Repository not found")

    def _listing(self, repo: str, revision: str) -> None:
        hub = self.server.hub
        if not (hub.root / repo).is_dir():
            return self._error(404, "RepoNotFound", "Repository not found")
        found = hub._repo_folder(repo, revision)
        if found is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        folder, commit = found
        siblings = []
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = file.read_bytes()
            entry = {"rfilename": file.relative_to(folder).as_posix(), "size": len(data), "blobId": git_blob_id(data)}
            if hub.lfs_sha256 and len(data) > LFS_ABOVE:
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(entry)
        self._json({"id": repo, "modelId": repo, "sha": commit, "private": False, "siblings": siblings})

    def _resolve(self, repo: str, revision: str, rel: str, head: bool) -> None:
        hub = self.server.hub
        found = hub._repo_folder(repo, revision)
        if found is None:
            return self._error(404, "RevisionNotFound" if (hub.root / repo).is_dir() else "RepoNotFound", "not found")
        folder, commit = found
        file = folder / rel
        if not file.is_file():
            return self._error(404, "EntryNotFound", f"{rel} does not exist", commit=commit)
        data = file.read_bytes()
        lfs = len(data) > LFS_ABOVE
        if lfs:  # the hub sends LFS files from its CDN: a 302 carrying the file's metadata
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"{hub.cdn.url}/blob/{repo}/{folder.name}/{rel}?sig=x")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{git_blob_id(data)}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._bytes(file, f"{repo}/{folder.name}/{rel}", head, extra={"X-Repo-Commit": commit,
                                                                      "ETag": f'"{git_blob_id(data)}"'})

    def _cdn(self, path: str, head: bool) -> None:
        rel = path[len("/blob/"):]
        self._bytes(self.server.hub.root / rel, rel, head)

    # ---------------------------------------------------------------- answers

    def _bytes(self, file: Path, name: str, head: bool, extra: dict | None = None, plain: bool = False) -> None:
        hub = self.server.hub
        if not file.is_file():
            return self._error(404, "EntryNotFound", "not found")
        data = file.read_bytes()
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if plain and hub.ignore_range:
            wanted = None
        start = int(wanted.group(1)) if wanted else 0
        if wanted and start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if wanted else 200)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if not (plain and hub.no_length):
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if head:
            return
        time.sleep(hub.delay)
        with hub._lock:
            hub.transfers.append((name, start))
            limit = hub.cut.pop(name, hub.cut_every.get(name, len(body)))
        self.wfile.write(body[:limit])  # HTTP/1.0: the connection closes after each answer

    def _json(self, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, error_code: str, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(code)
        self.send_header("X-Error-Code", error_code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
