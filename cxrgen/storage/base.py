"""The one interface a run is read and written through, in a local folder or under an object-store prefix.

Names are relative, "/"-separated (`images/00000/00000042.jpg`, `run.json`). Both implementations keep the same
promises with their own means (docs/storage.md: "The commit protocol for object stores", "The local protocol"):
- an image or a table appears whole or not at all (write_bytes, commit);
- a batch's record exists only after its images (RecordWriter.write is called after their write_bytes);
- run.json and metadata.parquet are created once (create_json, commit; a resume that adds an array split to
  run.json, or merges again after remaking images, replaces them on purpose);
- who may write which share of the plan is decided by claims that a killed holder cannot keep for ever.

A share is (rank, world_size): the images whose plan index modulo world_size is rank; a plain run is (0, 1).
"""
from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator

from cxrgen.files import STATE_DIR

RUN_JSON = "run.json"
METADATA = "metadata.parquet"
RECORDS_DIR = f"{STATE_DIR}/records"
WHOLE = (0, 1)  # the share of a plain run: every image


def shares_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two shares (rank, world_size) hold a common plan index: r1 = r2 modulo gcd(w1, w2)."""
    step = math.gcd(a[1], b[1])
    return a[0] % step == b[0] % step


class RecordWriter(ABC):
    """Where one writer commits its batches' records (JSON lines, one per finished image)."""

    path: Path | None = None  # the local part file, for a local store

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Commit one batch's lines durably, or raise RunError leaving no partial record behind."""

    def close(self) -> None:
        """Let go of the writer; committed records stay."""


class RecordPart(ABC):
    """Committed records to read: a local part file, or a group of record objects of one writer."""

    name: str = ""
    writer: str = ""  # whose records: one writer's records are in the order it wrote them, whatever their clocks say

    @abstractmethod
    def read(self) -> bytes:
        """The JSON lines (a torn last line of a killed local writer has no newline)."""

    def chunks(self) -> Iterator[bytes]:
        """The lines in pieces that each end at a newline (bounded memory for a big part); a torn end is dropped."""
        data = self.read()
        yield data[:data.rfind(b"\n") + 1]


class Claim:
    """The right to write a share, held until release (a dead holder's claim lapses by itself)."""

    unsupported = False  # a local file system without locks: nothing keeps a second writer out (warned once)

    def release(self) -> None:
        """Give the claim up."""

    def mark_share_done(self) -> None:
        """Say that this holder only waits now, so waiting holders never wait for one another."""

    def clear_holder(self) -> None:
        """Forget a previous holder's name once the claim is shared (local folders)."""

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Store(ABC):
    """A run's root: a local folder (storage.local) or an object-store prefix (storage.objects)."""

    url: str  # what messages name: the folder's path or the URL
    local: Path | None = None  # the folder of a local store; None for an object store
    write_threads: int = 2  # image writer threads of a batch loop (an object store hides network latency)

    def __str__(self) -> str:
        return self.url

    def where(self, name: str) -> str:
        """The full path or URL of a name, for messages."""
        return f"{self.url.rstrip('/')}/{name}" if name else self.url

    # ------------------------------------------------------------------ whole files or objects

    @abstractmethod
    def exists(self) -> bool:
        """Whether the root exists at all (a folder; any object under the prefix)."""

    @abstractmethod
    def entries(self) -> list[str]:
        """Names directly under the root (files and folders), to tell a run from something else."""

    @abstractmethod
    def read_bytes(self, name: str) -> bytes | None:
        """The whole content, or None when absent."""

    @abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file or object: readers see the old content or the new, never a part."""

    def write_batch_file(self, name: str, data: bytes) -> None:
        """write_bytes for one image of a batch: whole or absent, but durable only after settle() (local folders
        then sync each folder once per batch instead of once per image)."""
        self.write_bytes(name, data)

    def settle(self, names: list[str]) -> None:
        """Make the batch files written under these names durable before they are recorded."""

    @abstractmethod
    def create_json(self, name: str, data: dict) -> bool:
        """Write pretty JSON only if the name is free (the caller holds init_lock); False when it was taken."""

    @abstractmethod
    def commit(self, name: str, source: Path) -> bool:
        """Publish a finished local file under name, once: False when another process committed it first."""

    @abstractmethod
    def sizes(self, names: list[str]) -> list[int | None]:
        """The byte size of each name (None: absent), looked up as cheaply as the store allows."""

    @abstractmethod
    def list_names(self, prefix: str) -> set[str]:
        """Every finished file under prefix/ (temporary files left out), relative to the root."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove a file or object if it exists."""

    @abstractmethod
    def open_input(self, name: str):
        """A binary, seekable file object to read (pyarrow, PIL)."""

    def read_many(self, names: Iterable[str]) -> Iterator[bytes | None]:
        """read_bytes of each name, in order (an object store fetches ahead on threads)."""
        for name in names:
            yield self.read_bytes(name)

    def temp_files(self) -> list[str]:
        """Leftovers of interrupted writes (local folders only: an object PUT leaves none)."""
        return []

    def remove_temp_files(self) -> None:
        """Delete temp_files(); called only once every planned image is in place."""

    def check_writable(self) -> None:
        """Refuse (InputError, nothing written) a root this process cannot write; a folder is checked when written."""

    # ------------------------------------------------------------------ the run's commit protocol

    @abstractmethod
    def record_writer(self, writer: str, share: tuple[int, int], folder: str = RECORDS_DIR) -> RecordWriter:
        """Where the writer named `writer` (unique among concurrent writers) commits its batches.

        folder: another journal of the run kept the same way (--verify's attempts journal)."""

    @abstractmethod
    def record_parts(self, share: tuple[int, int] | None = None, folder: str = RECORDS_DIR) -> list[RecordPart]:
        """Committed records, oldest first within each writer; a share lets a store skip what cannot hold it."""

    @abstractmethod
    def check_free(self, shared: bool) -> None:
        """Refuse at once (InputError) when a live writer would clash; keeps nothing and writes nothing."""

    @abstractmethod
    def claim_share(self, rank: int, world_size: int, scope: str) -> Claim:
        """Claim a launcher rank's share (InputError when a live writer holds an overlapping one)."""

    @abstractmethod
    def claim_folder(self, shared: bool) -> Claim:
        """Claim the whole run (a plain run), or join it as one rank of a launch (shared)."""

    def init_lock(self):
        """Held while run.json is read and written (a local folder serialises; an object store creates once)."""
        return contextlib.nullcontext()

    def merge_lock(self):
        """Held while metadata.parquet is merged (a local folder serialises; an object store commits once)."""
        return contextlib.nullcontext()

    @abstractmethod
    def running_ranks(self, scope: str, exclude: int) -> set[int]:
        """Ranks of the launch `scope` whose holders are alive and still working on their share."""

    @abstractmethod
    def log_merge(self, line: str) -> None:
        """Keep an audit line per merge, so "merged exactly once" can be checked."""
