"""Crash safety (issue 3): kill a run anywhere, resume it, and get exactly the uninterrupted run's dataset.

Kill and signal tests run the real CLI in a child process (forked from a multiprocessing fork server that
imported torch once, so a child costs a model load, not an interpreter start). The child wraps one function
(a cxrgen function, or os.replace) to SIGKILL itself at a chosen instant, so the library needs no test hooks.
Everything else runs in-process through typer's CliRunner or the library. Results are checked through the
files, the journal, metadata.parquet and cxrgen.runs.state, never by scraping output beyond the one error line.
"""
from __future__ import annotations

import collections
import errno
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import PLANNED
from helpers import RESUME_MANIFEST as MANIFEST
from PIL import Image
from typer.testing import CliRunner

import cxrgen.files
import cxrgen.runs.generate
import cxrgen.runs.journal
import cxrgen.storage.local
import cxrgen.storage.locks
from cxrgen.cli import app
from cxrgen.errors import InputError, RunError
from cxrgen.files import STATE_DIR, TMP_MARK
from cxrgen.runs.journal import RECORDS_DIR
from cxrgen.storage.locks import FolderLock
from cxrgen.runs.state import inspect_run

JOURNAL = f"{RECORDS_DIR}/part-main.jsonl"
runner = CliRunner()


# ---------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def args(manifest, bundle_dir, text_encoder_dir):
    """`cxrgen generate` arguments for an output folder (extra options may be appended)."""
    def make(out: Path, *extra: str, quiet: bool = True) -> list[str]:
        return ["generate", str(manifest), "--out", str(out), "--model", str(bundle_dir),
                "--text-encoder", str(text_encoder_dir), "--steps", "2", "--num-images", "2",
                "--batch-size", "2", "--device", "cpu", *(["--quiet"] if quiet else []), *extra]
    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, args) -> Path:
    """An uninterrupted run: what every interrupted-then-resumed run must end as."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = runner.invoke(app, args(out))
    assert result.exit_code == 0, result.output
    return out


def cli(*argv: str):
    return runner.invoke(app, [str(a) for a in argv])


def journal_lines(out: Path) -> list[str]:
    """Raw lines of every journal part file (a torn last line has no newline)."""
    lines = []
    for part in sorted((out / RECORDS_DIR).glob("part-*.jsonl")):
        lines += part.read_text(encoding="utf-8").splitlines(keepends=True)
    return lines


def recorded_ids(out: Path, field: str = "image_id") -> list[str]:
    """`field` (image_id) of every complete, valid journal line, duplicates kept."""
    ids = []
    for line in journal_lines(out):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n"):
            ids.append(record[field])
    return ids


def image_files(out: Path) -> set[str]:
    """Every file under images/, temporary ones included, relative to OUT."""
    images = out / "images"
    return {str(p.relative_to(out)) for p in images.rglob("*") if p.is_file()} if images.is_dir() else set()


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if TMP_MARK in p.name]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.int16)


def assert_same_dataset(out: Path, reference: Path, *, records_once: bool = True) -> None:
    """Every planned image exactly once, decodable, matching the uninterrupted run; no temp files left."""
    table = pq.read_table(out / "metadata.parquet")
    expected = pq.read_table(reference / "metadata.parquet")
    assert table.num_rows == PLANNED
    names = table.column("file_name").to_pylist()
    # metadata rows and files match one to one, nothing temporary is left anywhere
    assert len(set(names)) == PLANNED and image_files(out) == set(names)
    assert temp_files(out) == []
    # each image recorded once (an image is only re-recorded after its file was lost)
    counts = collections.Counter(recorded_ids(out))
    assert set(counts) == set(table.column("image_id").to_pylist())
    if records_once:
        assert set(counts.values()) == {1}, counts
    # same rows in the same order as the uninterrupted run, apart from when each image was made
    assert table.drop(["created_at"]).equals(expected.drop(["created_at"]))
    for name in names:
        diff = np.abs(pixels(out / name) - pixels(reference / name)).max()
        assert diff <= 1, f"{name}: pixels differ by {diff} gray levels"
    status = inspect_run(out)
    assert status.complete and not (status.missing_files or status.orphaned_files or status.temp_files)


# ---------------------------------------------------------------- child processes with one fault each

_COUNTS: collections.Counter = collections.Counter()
_COUNT_LOCK = threading.Lock()


def _count(key: str) -> int:
    """How many times `key` was hit in this process, this hit included (writer threads share it)."""
    with _COUNT_LOCK:
        _COUNTS[key] += 1
        return _COUNTS[key]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # SIGKILL is delivered before this returns


def _kill_on_replace(name_test):
    """SIGKILL when a temporary file matching name_test is about to be renamed into place."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if TMP_MARK in Path(src).name and name_test(Path(dst).name):
            _die()
        return real(src, dst, *a, **k)
    os.replace = replace


def _kill_on_image(n: int, after: bool):
    """SIGKILL at the n-th image write: before anything is written, or just after its rename."""
    import cxrgen.storage.local as loop  # a local store's image writes
    real = loop.atomic_write

    def atomic_write(path, data, **options):  # options: e.g. sync_folder (the loop syncs the folder once a batch)
        hit = _count("image") == n
        if hit and not after:
            _die()
        real(path, data, **options)
        if hit and after:
            _die()
    loop.atomic_write = atomic_write


def _kill_on_journal(n: int, torn: bool):
    """SIGKILL right after the n-th journal append is durable, or half-way through writing it."""
    from cxrgen.runs.journal import Journal
    real = Journal.append

    def append(self, records):
        if records and _count("append") == n:
            if torn:
                # every record but the last in full, then half of the last one
                text = "".join(json.dumps(r) + "\n" for r in records).encode()
                last = len(json.dumps(records[-1])) + 1
                with open(self.path, "ab") as handle:
                    handle.write(text[:len(text) - last // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
            else:
                real(self, records)
            _die()
        real(self, records)
    Journal.append = append


def _kill_on_metadata():
    import cxrgen.runs.state as state
    state.merge_metadata = lambda *a, **k: _die()


def _pause_at_batch(n: int):
    """Block the n-th batch until a signal arrives (so the test signals a run that is surely mid-way)."""
    from cxrgen.model.engine import Engine
    real = Engine.run_batch

    def run_batch(self, items, on_step=None):
        if _count("batch") >= n:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                on_step()  # raises once SIGINT/SIGTERM arrived
                time.sleep(0.02)
        return real(self, items, on_step=on_step)
    Engine.run_batch = run_batch


FAULTS = {
    "during_run_json": lambda: _kill_on_replace(lambda name: name == "run.json"),
    "before_first_image": lambda: _kill_on_image(1, after=False),
    "image_not_renamed": lambda: _kill_on_replace(lambda name: name.endswith(".jpg")),
    "mid_batch": lambda: _kill_on_image(3, after=True),
    "between_batches": lambda: _kill_on_journal(1, torn=False),
    "torn_journal": lambda: _kill_on_journal(2, torn=True),
    "final_merge": _kill_on_metadata,
    "metadata_not_renamed": lambda: _kill_on_replace(lambda name: name == "metadata.parquet"),
    "pause_at_batch_3": lambda: _pause_at_batch(3),
}


def _child(argv: list[str], fault: str, log: str) -> None:
    """Entry point of a child process: apply one fault, then run the real CLI (exits with its code)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import torch

    torch.set_num_threads(1)  # as in the test process (see _one_thread)
    FAULTS[fault]()
    app(args=argv, prog_name="cxrgen")


@pytest.fixture(scope="module")
def spawn():
    """Start `cxrgen` children from a fork server that has imported the heavy modules once."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs a POSIX fork server (and SIGKILL)")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["cxrgen.cli", "cxrgen.runs.generate", "cxrgen.runs.state", "torch", "monai.networks.nets",
                                "transformers.models.clip.modeling_clip", "PIL.Image", "pyarrow.parquet"])
    children = []

    def start(argv: list[str], fault: str, log: Path):
        child = ctx.Process(target=_child, args=(argv, fault, str(log)), daemon=True)
        child.start()
        children.append(child)
        return child
    yield start
    for child in children:
        if child.is_alive():
            child.kill()
        child.join(10)


def run_child(spawn, argv, fault, tmp_path, timeout=240):
    child = spawn(argv, fault, tmp_path / "child.log")
    child.join(timeout)
    assert child.exitcode is not None, "child did not finish"
    return child


def wait_for(condition, child, timeout=120.0):
    """Poll until condition() holds while the child is still running."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.is_alive(), f"child ended early with exit code {child.exitcode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------- SIGKILL at chosen instants


def _left_behind(out: Path) -> dict:
    """What a killed run left: the facts each kill point is checked against before resuming."""
    return {
        "run_json": (out / "run.json").is_file(),
        "records": recorded_ids(out),
        "torn_line": bool(journal_lines(out)) and not journal_lines(out)[-1].endswith("\n"),
        "images": sorted(n for n in image_files(out) if TMP_MARK not in n),
        "temp": sorted(p.name for p in temp_files(out)),
        "metadata": (out / "metadata.parquet").is_file(),
    }


KILL_POINTS = {
    # fault: check of what the killed run left behind
    "during_run_json": lambda s: not s["run_json"] and s["temp"] and not s["images"],
    "before_first_image": lambda s: s["run_json"] and not s["records"] and not s["images"],
    "image_not_renamed": lambda s: not s["records"] and any(".jpg" + TMP_MARK in t for t in s["temp"]),
    "mid_batch": lambda s: len(s["records"]) in (0, 2) and len(s["images"]) > len(s["records"]),
    "between_batches": lambda s: len(s["records"]) == 2 and not s["metadata"],
    "torn_journal": lambda s: len(s["records"]) == 3 and s["torn_line"],
    "final_merge": lambda s: len(s["records"]) == PLANNED and len(s["images"]) == PLANNED and not s["metadata"],
    "metadata_not_renamed": lambda s: len(s["records"]) == PLANNED and not s["metadata"]
                                       and any(t.startswith(".metadata.parquet") for t in s["temp"]),
}


@pytest.mark.parametrize("fault", list(KILL_POINTS))
def test_sigkill_then_resume_gives_the_uninterrupted_dataset(fault, spawn, args, reference, tmp_path):
    out = tmp_path / "out"
    child = run_child(spawn, args(out), fault, tmp_path)
    assert child.exitcode == -signal.SIGKILL, (tmp_path / "child.log").read_text()
    left = _left_behind(out)
    assert KILL_POINTS[fault](left), left
    # the dead process's lock is stale: it names the dead pid and must not block anything
    assert (out / STATE_DIR / "lock").read_text().split()[0] == str(child.pid)
    if fault == "during_run_json":
        # no run.json yet: resume cannot know the settings and says to rerun the same generate command
        refused = cli("resume", out)
        assert refused.exit_code == 2 and "cxrgen generate" in refused.output
        assert cli("status", out).exit_code == 2
        result = runner.invoke(app, args(out))
    else:
        status = cli("status", out)
        assert status.exit_code == 1 and f"cxrgen resume {out}" in status.output
        result = cli("resume", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert_same_dataset(out, reference)


def test_a_killed_resume_is_resumed_too(spawn, args, reference, tmp_path):
    out = tmp_path / "out"
    assert run_child(spawn, args(out), "mid_batch", tmp_path).exitcode == -signal.SIGKILL
    assert run_child(spawn, ["resume", str(out), "--quiet"], "between_batches", tmp_path).exitcode == -signal.SIGKILL
    assert cli("resume", out, "--quiet").exit_code == 0
    assert_same_dataset(out, reference)


# ---------------------------------------------------------------- SIGTERM / SIGINT


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_finish_what_is_decoded_and_resume(signum, code, spawn, args, reference, tmp_path):
    out = tmp_path / "out"
    child = spawn(args(out), "pause_at_batch_3", tmp_path / "child.log")
    wait_for(lambda: len(recorded_ids(out)) >= 2, child)  # batch 1 is journaled just before batch 3 starts
    os.kill(child.pid, signum)
    child.join(120)
    assert child.exitcode == code
    error = (tmp_path / "child.log").read_text().strip().splitlines()[-1]
    assert error.startswith(f"cxrgen: error: stopped by {signal.Signals(signum).name}")
    assert f"cxrgen resume {out}" in error
    # batches 1 and 2 were decoded: both are written and journaled, nothing is half-done
    status = inspect_run(out)
    assert (status.done, status.orphaned_files, status.temp_files) == (4, [], [])
    assert sorted(recorded_ids(out, "file_name")) == sorted(image_files(out))
    assert cli("resume", out, "--quiet").exit_code == 0
    assert_same_dataset(out, reference)


# ---------------------------------------------------------------- one writer per folder


def _must_not_load(*_a, **_k):
    raise AssertionError("models were loaded before the folder lock was checked")


def test_second_writer_refused_at_once_and_stale_lock_does_not_block(spawn, args, reference, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "out"
    holder = spawn(args(out), "pause_at_batch_3", tmp_path / "child.log")
    wait_for(lambda: len(recorded_ids(out)) >= 2, holder)
    with monkeypatch.context() as patch:
        patch.setattr(cxrgen.runs.generate, "load_models", _must_not_load)  # "at once": before any model loads
        for argv in (args(out), ["resume", str(out)]):
            refused = runner.invoke(app, argv)
            assert refused.exit_code == 2, refused.output
            assert f"another cxrgen process (pid {holder.pid}) is writing {out}" in refused.output
    assert holder.is_alive()
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(60)
    # the lock file still names the dead holder, but the OS dropped its lock
    assert (out / STATE_DIR / "lock").read_text().split()[0] == str(holder.pid)
    assert cli("resume", out, "--quiet").exit_code == 0
    assert_same_dataset(out, reference)


def test_lock_refuses_a_second_holder_and_tolerates_file_systems_without_locks(tmp_path, monkeypatch):
    state = tmp_path / "out" / STATE_DIR
    with FolderLock(state):  # flock belongs to an open file, so even this process is a "second writer"
        with pytest.raises(InputError, match=rf"another cxrgen process \(pid {os.getpid()}\) is writing"):
            FolderLock(state).acquire()
        with pytest.raises(InputError):
            FolderLock(state).check_free()
    FolderLock(state).check_free()  # released on exit

    def no_locks(*_a):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(cxrgen.storage.locks.fcntl, "flock", no_locks)  # e.g. Lustre without -o flock
    with FolderLock(state), FolderLock(state):
        pass  # runs unprotected instead of blaming a process that does not exist


# ---------------------------------------------------------------- full disk and I/O errors


class _FailingFile:
    """A real file whose n-th write stores a third of its bytes and then fails with `err`, like a full disk."""

    def __init__(self, handle, fail_on: int, err: int):
        self._handle, self._fail_on, self._err, self._writes = handle, fail_on, err, 0

    def write(self, data) -> int:
        self._writes += 1
        if self._writes < self._fail_on:
            return self._handle.write(data)
        if self._writes == self._fail_on:
            self._handle.write(bytes(memoryview(data)[:len(data) // 3]))  # mid-record, not on a line end
            self._handle.flush()
        raise OSError(self._err, os.strerror(self._err))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


FAILING_IMAGE, FAILING_ID = "images/00000/00000002.jpg", "row0000002_0000"  # first image of batch 2
IO_FAULTS = {
    # where: (which file fails, on which write call)
    "image": (lambda name: name.startswith(".00000002.jpg" + TMP_MARK), 1),
    "journal": (lambda name: name == "part-main.jsonl", 2),  # batch 2's records
}


@pytest.mark.parametrize("where, err, via", [("image", errno.ENOSPC, "cli"), ("image", errno.EIO, "library"),
                                             ("journal", errno.ENOSPC, "library"), ("journal", errno.EIO, "cli")])
def test_full_disk_or_io_error_ends_cleanly_then_resume_completes(where, err, via, args, manifest, bundle_dir,
                                                                  text_encoder_dir, reference, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "out"
    failing, fail_on = IO_FAULTS[where]
    path = out / (FAILING_IMAGE if where == "image" else JOURNAL)
    real_open = open

    def fake_open(file, mode="r", *a, **k):
        handle = real_open(file, mode, *a, **k)
        return _FailingFile(handle, fail_on, err) if failing(Path(file).name) else handle
    with monkeypatch.context() as patch:
        patch.setattr(cxrgen.storage.local, "open", fake_open, raising=False)  # the journal's part files
        patch.setattr(cxrgen.files, "open", fake_open, raising=False)  # images' temporary files
        if via == "cli":
            result = runner.invoke(app, args(out))
            assert result.exit_code == 1
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("cxrgen: error: ")
            message = lines[0]
        else:
            with pytest.raises(RunError) as caught:
                cxrgen.runs.generate.generate(_config(manifest, out, bundle_dir, text_encoder_dir))
            message = str(caught.value)
    assert "\n" not in message and str(path) in message and f"cxrgen resume {out}" in message
    assert ("no space left" in message) == (err == errno.ENOSPC)
    # no partial image, no temporary file, no torn line, and no record of an image that is not in place
    assert temp_files(out) == []
    assert all(line.endswith("\n") for line in journal_lines(out))
    ids = recorded_ids(out)
    assert len(ids) == len(set(ids)) and 2 <= len(ids) < PLANNED
    if where == "image":
        assert FAILING_IMAGE not in image_files(out) and FAILING_ID not in ids
    status = inspect_run(out)
    assert status.done == len(ids) and status.missing_files == []  # every record's file is in place
    assert cli("resume", out, "--quiet").exit_code == 0
    assert_same_dataset(out, reference)


def _config(manifest, out, bundle_dir, text_encoder_dir, **changes):
    """The library's RunConfig for what args() passes on the command line."""
    from cxrgen.config import RunConfig, default_cache_dir

    settings = dict(manifest=str(manifest.resolve()), out=str(out.resolve()), model=str(bundle_dir),
                    text_encoder=str(text_encoder_dir), steps=2, num_images=2, batch_size=2, device="cpu",
                    quiet=True, cache_dir=default_cache_dir())
    return RunConfig(**{**settings, **changes})


# ---------------------------------------------------------------- changed manifest or settings


@pytest.fixture
def finished(reference, tmp_path) -> Path:
    """A private copy of the finished reference run (a space in its path: printed commands must quote it)."""
    out = tmp_path / "finished run"
    shutil.copytree(reference, out)
    return out


@pytest.mark.parametrize("option, value, change", [
    ("--guidance-scale", "5", "guidance_scale: 7.0 -> 5.0"), ("--seed", "1", "seed: 0 -> 1"),
    ("--steps", "3", "steps: 2 -> 3"), ("--image-format", "png", 'image_format: "jpg" -> "png"'),
])
def test_generate_with_a_pixel_changing_setting_is_refused(option, value, change, finished, args, monkeypatch):
    before = (image_files(finished), journal_lines(finished))
    monkeypatch.setattr(cxrgen.runs.generate, "load_models", _must_not_load)
    refused = runner.invoke(app, args(finished, option, value))
    assert refused.exit_code == 2
    assert change in refused.output and "choose a new --out" in refused.output
    assert (image_files(finished), journal_lines(finished)) == before


def test_changed_manifest_is_refused_by_generate_and_resume(args, bundle_dir, text_encoder_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(MANIFEST)
    out = tmp_path / "out"
    assert runner.invoke(app, args(out)[:1] + [str(manifest)] + args(out)[2:]).exit_code == 0
    manifest.write_text(MANIFEST.replace("big heart", "huge heart"))
    for argv in (args(out)[:1] + [str(manifest)] + args(out)[2:], ["resume", str(out)]):
        refused = runner.invoke(app, argv)
        assert refused.exit_code == 2 and "manifest_sha256" in refused.output, refused.output


def test_generate_again_with_the_same_settings_resumes_and_says_so(finished, args, reference):
    lines = journal_lines(finished)
    (finished / JOURNAL).write_text("".join(lines[:4]))  # as if killed after batch 2
    for line in lines[4:]:
        (finished / json.loads(line)["file_name"]).unlink()
    (finished / "metadata.parquet").unlink()
    # the batch size does not change pixels, so it may differ
    result = runner.invoke(app, args(finished, "--batch-size", "3", quiet=False))
    assert result.exit_code == 0, result.output
    assert f"resuming the run in {finished}: 4 of {PLANNED} image(s) already done" in result.output
    assert_same_dataset(finished, reference)


def test_a_run_of_an_earlier_cxrgen_keeps_its_id_file_names(args, reference, tmp_path):
    """run.json without file_names (earlier cxrgen builds named files after the image id): resume and generate keep that
    layout, so the images already made are found and the rest land beside them."""
    out = tmp_path / "old"
    assert cli(*args(out, "--file-names", "id")).exit_code == 0
    saved = json.loads((out / "run.json").read_text())
    del saved["config"]["file_names"], saved["settings"]["file_names"]
    (out / "run.json").write_text(json.dumps(saved))
    names = pq.read_table(out / "metadata.parquet").column("file_name").to_pylist()
    assert names[2] == "images/00000/row0000002_0000.jpg"
    (out / names[2]).unlink()
    assert cli("resume", out, "--quiet").exit_code == 0
    assert pq.read_table(out / "metadata.parquet").column("file_name").to_pylist() == names
    (out / names[3]).unlink()
    assert cli(*args(out)).exit_code == 0  # generate's default (index) yields to the folder's layout
    assert image_files(out) == set(names)
    new = pq.read_table(reference / "metadata.parquet")
    for old_name, new_name in zip(names, new.column("file_name").to_pylist()):  # same pixels, other names
        assert (out / old_name).read_bytes() == (reference / new_name).read_bytes()


def test_resume_refuses_pixel_changing_overrides(finished):
    with pytest.raises(InputError, match="resume cannot change steps"):
        cxrgen.runs.generate.resume(finished, steps=3)
    assert cli("resume", finished, "--guidance-scale", "3").exit_code == 2  # not an option of resume


# ---------------------------------------------------------------- cxrgen status


def test_status_exit_codes_and_problems_found(finished, reference, tmp_path):
    assert cli("status", finished).exit_code == 0
    assert cli("status", tmp_path / "nothing-here").exit_code == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    assert cli("status", tmp_path / "other").exit_code == 2
    # damage the finished run: a lost file, an unreadable file, a file whose record was never written
    lines = journal_lines(finished)
    lost, damaged, unrecorded = (json.loads(lines[i])["file_name"] for i in (0, 1, 5))
    (finished / lost).unlink()
    data = (finished / damaged).read_bytes()
    (finished / damaged).write_bytes(data[:len(data) // 2])
    (finished / JOURNAL).write_text("".join(lines[:5]))
    (finished / "images" / "00000" / f".x.jpg{TMP_MARK}999").write_bytes(b"partial")
    report = inspect_run(finished)
    assert (report.planned, report.done, report.remaining) == (PLANNED, 3, 3)
    assert report.missing_files == sorted([lost, damaged]) and report.orphaned_files == [unrecorded]
    assert report.temp_files == [f"images/00000/.x.jpg{TMP_MARK}999"] and not report.complete
    status = cli("status", finished)
    command = f"cxrgen resume {shlex.quote(str(finished))}"
    assert status.exit_code == 1 and f"resume with: {command}" in status.output.splitlines()
    assert runner.invoke(app, shlex.split(command)[1:] + ["--quiet"]).exit_code == 0  # the printed command works
    assert cli("status", finished).exit_code == 0
    assert_same_dataset(finished, reference, records_once=False)  # the lost and damaged files were re-recorded
