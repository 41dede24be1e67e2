"""Who may write which share of a run under an object-store prefix: numbered claims made by conditional creates,
kept alive by heartbeats, so that a killed writer's claim lapses by itself (there is no flock to die with it).

Under PREFIX/.cxrgen/claims/:
  NNNNNNNNN.w<W>-r<R>.<scope>.json  the claim (host, pid, session): created only if absent (If-None-Match: *),
                                    so each number is handed out once and all claims stand in one order
  NNNNNNNNN.state                   {"state": "running" | "done" | "released"}, rewritten every timeout/4 s by
                                    its holder: its LastModified (the store's clock) is the heartbeat

A claim is live while it is running or done and its last heartbeat is younger than the timeout (on the same
host: while its process exists, so a resume right after a kill need not wait); a claim without a state yet
is live for one timeout after its creation (its holder is still deciding). To claim a share, a writer
1. refuses at once when a live claim overlaps its share (nothing is written);
2. creates the next free number;
3. lists again: a live claim with a LOWER number that overlaps wins, so it marks its own released and
   refuses (of two racing writers, both decide the same way and exactly one goes on); else it runs.
A holder that finds a live claim with a HIGHER number over its share (taken over after its heartbeat lapsed:
a frozen or cut-off machine) stops before it commits another record.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from cxrgen.errors import InputError
from cxrgen.files import STATE_DIR, resume_command
from cxrgen.storage.base import Claim, shares_overlap

CLAIMS_DIR = f"{STATE_DIR}/claims"
_HOST = socket.gethostname()


@dataclass
class _Entry:
    number: int
    share: tuple[int, int]
    scope: str
    name: str  # the claim object's name
    created: float  # its LastModified
    heartbeat: float | None  # the state object's LastModified
    state: dict | None = None
    holder: dict | None = None


def _scope_tag(scope: str) -> str:
    return "all" if scope == "all" else "s" + scope.replace("/", "of")


def _scope_of(tag: str) -> str:
    return "all" if tag == "all" else tag[1:].replace("of", "/")


class ClaimBook:
    """The claims of one run prefix; `store` is its storage.objects.ObjectStore (requests, retries, listings)."""

    def __init__(self, store, timeout_s: float):
        self.store, self.timeout, self.folder = store, timeout_s, CLAIMS_DIR

    # ------------------------------------------------------------------ reading the book

    def scan(self) -> list[_Entry]:
        """Every claim with its heartbeat; states and holders are fetched for the ones that may be live."""
        listing = self.store.details(self.folder)
        beats = {name.rsplit("/", 1)[-1].split(".")[0]: info["mtime"] for name, info in listing.items()
                 if name.endswith(".state")}
        entries = []
        for name, info in listing.items():
            parts = name.rsplit("/", 1)[-1].split(".")
            if len(parts) != 4 or parts[3] != "json" or not parts[0].isdigit():
                continue
            try:
                world, rank = parts[1].split("-")
                share = (int(rank[1:]), int(world[1:]))
            except ValueError:
                continue
            entries.append(_Entry(int(parts[0]), share, _scope_of(parts[2]), name, info["mtime"], beats.get(parts[0])))
        return sorted(entries, key=lambda e: e.number)

    def live(self, entry: _Entry, now: float | None = None) -> bool:
        """Whether a claim still holds (see the module docstring)."""
        now = time.time() if now is None else now
        last = entry.heartbeat if entry.heartbeat is not None else entry.created
        if now - last >= self.timeout:
            return False
        if entry.heartbeat is not None and self._state(entry).get("state") == "released":
            return False
        holder = self._holder(entry)
        if holder.get("host") == _HOST and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            return False  # its process is gone: no need to wait for the heartbeat to lapse
        return True

    def _state(self, entry: _Entry) -> dict:
        if entry.state is None:
            entry.state = _json(self.store.read_bytes(f"{self.folder}/{entry.number:09d}.state"))
        return entry.state

    def _holder(self, entry: _Entry) -> dict:
        if entry.holder is None:
            entry.holder = _json(self.store.read_bytes(entry.name))
        return entry.holder

    def describe(self, entry: _Entry) -> str:
        """"pid N on HOST, last seen S s ago" for messages."""
        holder = self._holder(entry)
        last = entry.heartbeat if entry.heartbeat is not None else entry.created
        return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, last seen {max(0, time.time() - last):.0f} s ago"

    # ------------------------------------------------------------------ claiming

    def refuse_if_taken(self, share: tuple[int, int] | None) -> None:
        """Refuse when a live claim overlaps share (None: only a plain run's claim, which overlaps everything)."""
        for entry in self.scan():
            if (share is None and entry.share[1] == 1) or (share is not None and shares_overlap(share, entry.share)):
                if self.live(entry):
                    raise self._refusal(entry, share)

    def acquire(self, share: tuple[int, int], scope: str) -> "HeldClaim":
        """Claim share or raise InputError naming the live holder (see the module docstring)."""
        entries = self.scan()
        for entry in entries:
            if shares_overlap(share, entry.share) and self.live(entry):
                raise self._refusal(entry, share)
        number = max((e.number for e in entries), default=0) + 1
        # the token makes every claim's bytes unique: a create that finds equal bytes took the number itself
        holder = {"host": _HOST, "pid": os.getpid(), "session": self.store.session, "token": secrets.token_hex(8),
                  "rank": share[0], "world_size": share[1], "scope": scope}
        name = None
        for _ in range(1000):
            candidate = f"{self.folder}/{number:09d}.w{share[1]}-r{share[0]}.{_scope_tag(scope)}.json"
            if self.store.create_bytes(candidate, json.dumps(holder).encode()):
                name = candidate
                break
            number += 1  # another writer took this number: the next one is ours to try
        if name is None:
            raise InputError(f"could not claim a share of {self.store.url}: a thousand claims raced with this "
                             "one; try again")
        held = HeldClaim(self, number, share, scope)
        for entry in self.scan():
            if entry.number < number and shares_overlap(share, entry.share) and self.live(entry):
                held.write_state("released")
                raise self._refusal(entry, share)
        held.start()
        return held

    def running(self, scope: str, exclude: int) -> set[int]:
        """Ranks of the launch `scope` that are live and still working (not done)."""
        return {e.share[0] for e in self.scan() if e.scope == scope and e.share[0] != exclude and e.share[1] > 1
                and self.live(e) and self._state(e).get("state", "running") == "running"}

    def _refusal(self, entry: _Entry, share: tuple[int, int] | None) -> InputError:
        url, who = self.store.url, self.describe(entry)
        lapse = (f"a killed writer's claim lapses {self.timeout:.0f} s after its last heartbeat, at once on the "
                 "same host")
        if share is not None and entry.share == share and share[1] > 1:
            return InputError(f"rank {share[0]} is already running in {url} ({who}): a second launch into the same "
                              "prefix, or two processes with the same RANK/SLURM_PROCID; stop the duplicate, or "
                              f"resume after the first launch ends ({lapse})")
        if entry.share[1] > 1 and share is not None and share[1] > 1:
            return InputError(f"a launch of {entry.share[1]} ranks is still writing {url} ({who}), and this process "
                              f"is rank {share[0]} of {share[1]}; their shares overlap, so wait for that launch to "
                              f"end, then resume with any number of ranks ({lapse})")
        return InputError(f"another cxrgen process ({who}) is writing {url}; wait for it to finish or stop it, then "
                          f"run `{resume_command(url)}` ({lapse})")


class HeldClaim(Claim):
    """A claim this process holds: a heartbeat thread keeps it alive and watches for a take-over."""

    def __init__(self, book: ClaimBook, number: int, share: tuple[int, int], scope: str):
        self.book, self.number, self.share, self.scope = book, number, share, scope
        self.state = "running"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write_state(self, state: str) -> None:
        self.state = state
        body = {"state": state, "host": _HOST, "pid": os.getpid()}
        self.book.store.write_bytes(f"{self.book.folder}/{self.number:09d}.state", json.dumps(body).encode())

    def start(self) -> None:
        self.write_state("running")
        self._thread = threading.Thread(target=self._beat, name="cxrgen-claim", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        period = max(0.5, self.book.timeout / 4)
        while not self._stop.wait(period) and self.book.store.lost is None:
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried next period; record writes report errors
                continue

    def beat(self) -> None:
        """One heartbeat, then a look for a take-over: a live later claim over this share stops this writer."""
        self.write_state(self.state)
        for entry in self.book.scan():
            if entry.number > self.number and shares_overlap(self.share, entry.share) and \
                    entry.heartbeat is not None and self.book.live(entry):
                self.book.store.lost = (
                    f"another process ({self.book.describe(entry)}) took over this writer's share of "
                    f"{self.book.store.url} after its heartbeat lapsed (none for {self.book.timeout:.0f} s); what "
                    f"was committed is kept: run `{resume_command(self.book.store.url)}` once only one writer is left")
                return

    def mark_share_done(self) -> None:
        self.write_state("done")

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self.write_state("released")
        except Exception:  # noqa: BLE001 - the claim lapses by itself once its heartbeat stops
            pass


def _json(data: bytes | None) -> dict:
    try:
        value = json.loads(data.decode("utf-8")) if data else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
