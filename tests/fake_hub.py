"""A local stand-in for the hub and the weights URL: cxrgen.hub.download's Source over a folder, no network.

Layout: ROOT/<repo>/<revision>/<files> for repos, ROOT/urls/<file name> for plain URLs (the evaluator's
weights, the bundle's zip on NVIDIA's hosting). Every listing and
open is appended to ROOT/calls.log (one line each, O_APPEND), so tests in several processes can count them.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

from cxrgen.hub.sources import Listing, RemoteFile

COMMIT = "f" * 40


def commit_of(revision: str) -> str:
    """A 40-hex fake commit per revision (the hub resolves a branch to one)."""
    return hashlib.sha1(revision.encode()).hexdigest() if revision != "main" else COMMIT


class Cut(OSError):
    """The connection dropped (what a real network error looks like to the downloader)."""


class _CutAfter:
    def __init__(self, handle, limit: int):
        self.handle, self.left = handle, limit

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise Cut("connection reset by peer")
        data = self.handle.read(min(size if size > 0 else self.left, self.left))
        self.left -= len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


class FolderSource:
    """Lists and serves files from a folder; cut_after=N drops every download after N bytes."""

    def __init__(self, root: Path, cut_after: int | None = None, delay: float = 0.0, lfs_sha256: bool = True):
        self.root, self.cut_after, self.delay, self.lfs_sha256 = Path(root), cut_after, delay, lfs_sha256

    def add_repo(self, repo: str, revision: str, src: Path, extra: dict | None = None) -> Path:
        """Copy folder src in as repo@revision, plus extra {relative path: bytes} files (e.g. fp16 copies)."""
        base = self.root / repo / revision
        shutil.copytree(src, base, dirs_exist_ok=True)
        for rel, data in (extra or {}).items():
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).write_bytes(data)
        return base

    def add_url(self, url: str, src: Path) -> None:
        """Serve file src at url."""
        (self.root / "urls").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.root / "urls" / url.rsplit("/", 1)[-1])

    def calls(self, kind: str = "open") -> list[list[str]]:
        """Every logged call of this kind, as [kind, arg, ...]."""
        log = self.root / "calls.log"
        lines = log.read_text().splitlines() if log.is_file() else []
        return [line.split(" ") for line in lines if line.startswith(kind + " ")]

    def _log(self, *words) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "calls.log", "a") as handle:
            handle.write(" ".join(str(w) for w in words) + "\n")

    def listing(self, repo: str, revision: str, files) -> Listing:
        self._log("list", repo, revision)
        if "://" in repo:
            path = self.root / "urls" / repo.rsplit("/", 1)[-1]
            if not path.is_file():
                raise FileNotFoundError(f"404 Not Found: {repo}")
            return Listing(revision, [RemoteFile(files[0], f"fake://urls/{path.name}")])
        base = self.root / repo / revision
        if not base.is_dir():
            raise FileNotFoundError(f"404: {repo} has no revision {revision}")
        listed = []
        for rel in files:
            path = base / rel
            if path.is_file():
                big = self.lfs_sha256 and path.stat().st_size > 1000  # the hub gives sha256 of LFS files only
                sha = hashlib.sha256(path.read_bytes()).hexdigest() if big else None
                listed.append(RemoteFile(rel, f"fake://{repo}/{revision}/{rel}", path.stat().st_size, sha))
        return Listing(commit_of(revision), listed)

    def open(self, url: str, offset: int):
        self._log("open", url, offset)
        time.sleep(self.delay)
        # fake:// URLs come from listings; any other URL (the bundle's zip on NVIDIA's hosting) from add_url
        rel = url[len("fake://"):] if url.startswith("fake://") else f"urls/{url.rsplit('/', 1)[-1]}"
        handle = open(self.root / rel, "rb")
        handle.seek(offset)
        return (_CutAfter(handle, self.cut_after) if self.cut_after is not None else handle), offset
