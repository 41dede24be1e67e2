"""Hardening of the data path: label names and types, the prompt cache, the text encoder's loading and
identity, exact pixel conversion, and the fsyncs that make the output crash-safe."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cxrgen.config import RunConfig
from cxrgen.errors import InputError
from cxrgen.files import atomic_write
from cxrgen.manifests.reader import read_manifest
from cxrgen.model import demo
from cxrgen.model import text_encoder as cxrgen_text
from cxrgen.model.sampling import to_uint8
from cxrgen.model.text_encoder import TextEncoder, load_text_encoder
from cxrgen.runs.generate import generate
from cxrgen.runs.journal import METADATA_SCHEMA, Journal, metadata_table, write_metadata


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ item 5: unique label column names

def _metadata_of(tmp_path: Path, label_columns: dict) -> Path:
    """write_metadata for one image whose manifest row carries these label columns."""
    labels = pa.table({name: pa.array(values) for name, values in label_columns.items()})
    return write_metadata(tmp_path, metadata_table([{"image_id": "row0000001_0000", "worker": "w0",
                                                     "dtype": "float32"}], labels, [1]))


def _read_both_ways(path: Path) -> tuple[pd.DataFrame, pa.Table]:
    """The file as pandas and pyarrow read it, each column also fetched alone (the call that fails on a clash)."""
    frame = pd.read_parquet(path)
    table = pq.read_table(path)
    assert len(set(table.column_names)) == len(table.column_names), table.column_names
    for name in table.column_names:
        assert pq.read_table(path, columns=[name]).column(0).to_pylist() == table.column(name).to_pylist()
    return frame, table


@pytest.mark.parametrize("columns, expected", [
    # a label named like a cxrgen column steps past every name already taken, including other labels' own
    ({"worker": ["lw"], "label_worker": ["ll"]}, {"label_label_worker": "lw", "label_worker": "ll"}),
    ({"label_worker": ["ll"], "worker": ["lw"]}, {"label_worker": "ll", "label_label_worker": "lw"}),
    ({"worker": ["lw"], "label_worker": ["ll"], "label_label_worker": ["lll"]},
     {"label_label_label_worker": "lw", "label_worker": "ll", "label_label_worker": "lll"}),
    ({"dtype": ["ld"], "label_dtype": ["lld"], "finding": ["f"]},
     {"label_label_dtype": "ld", "label_dtype": "lld", "finding": "f"}),
])
def test_label_column_names_are_unique_and_readable(tmp_path, columns, expected):
    frame, table = _read_both_ways(_metadata_of(tmp_path, columns))
    own = len(METADATA_SCHEMA)
    assert table.column_names[:own] == METADATA_SCHEMA.names
    assert table.column_names[own:] == list(expected)  # manifest order, one column per label
    for name, value in expected.items():
        assert table.column(name).to_pylist() == [value], name
        assert frame[name].tolist() == [value], name
    assert frame["worker"].tolist() == ["w0"] and frame["dtype"].tolist() == ["float32"]  # cxrgen's own


def test_clashing_labels_survive_a_real_run(tmp_path, bundle_dir, text_encoder_dir, one_torch_thread):
    text = "prompt,worker,label_worker,dtype,seed,study_id\nSmall left effusion,wk,lwk,float16,7,00123\n"
    out = tmp_path / "out"
    generate(RunConfig(manifest=str(write_text(tmp_path / "m.csv", text)), out=str(out), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), cache_dir=str(tmp_path / "cache"), steps=1,
                       num_images=1, image_format="png", quiet=True), log=lambda message: None)
    frame, table = _read_both_ways(out / "metadata.parquet")
    row = frame.iloc[0]
    assert row["label_label_worker"] == "wk" and row["label_worker"] == "lwk" and row["label_dtype"] == "float16"
    assert row["worker"] != "wk" and row["dtype"] == "float32"  # cxrgen's own columns are untouched
    assert row["seed"] == 7 and "label_seed" not in frame.columns  # seed is an override, not a label
    assert row["study_id"] == "00123" and pa.types.is_string(table.schema.field("study_id").type)


# ------------------------------------------------------------------ item 8: label typing keeps the text

@pytest.mark.parametrize("text_cells, number_cells, number_type, numbers", [
    # each text column beside its twin without the leading zero or sign, which must stay a number
    (["00123", "00456"], ["123", "456"], pa.int64(), [123, 456]),                 # study ids
    (["007", "8"], ["7", "8"], pa.int64(), [7, 8]),           # one leading zero makes the column text
    (["-007", "5"], ["-7", "5"], pa.int64(), [-7, 5]),
    (["00", "1"], ["0", "1"], pa.int64(), [0, 1]),             # 0 alone is a number
    (["+5", "6"], ["5", "6"], pa.int64(), [5, 6]),             # an explicit sign is part of the text
    (["007", ""], ["0", ""], pa.int64(), [0, None]),
    (["007.5", "1.5"], ["7.5", "1.5"], pa.float64(), [7.5, 1.5]),
    (["-00.5", "0"], ["-0.5", "0"], pa.float64(), [-0.5, 0.0]),
    (["+1.5", "2"], ["1.5", "2"], pa.float64(), [1.5, 2.0]),
    (["+inf", "2"], ["inf", "2"], pa.float64(), [float("inf"), 2.0]),
    (["01e3", ".5"], ["1e+03", ".5"], pa.float64(), [1000.0, 0.5]),      # exponent signs are fine
    (["00.25", "2."], ["0.25", "2."], pa.float64(), [0.25, 2.0]),
])
def test_csv_labels_typed_without_losing_characters(tmp_path, text_cells, number_cells, number_type, numbers):
    text = "prompt,as_text,as_number\n" + "".join(f"Effusion,{a},{b}\n" for a, b in zip(text_cells, number_cells))
    labels = read_manifest(write_text(tmp_path / "m.csv", text)).labels
    assert labels.schema.field("as_text").type == pa.string()
    assert labels.column("as_text").to_pylist() == [cell or None for cell in text_cells]
    assert labels.schema.field("as_number").type == number_type
    assert labels.column("as_number").to_pylist() == numbers


# ------------------------------------------------------------------ item 9: bounded LRU prompt cache

@pytest.fixture
def encoder(text_encoder_dir, one_torch_thread) -> TextEncoder:
    return load_text_encoder(str(text_encoder_dir))


def test_prompt_cache_is_a_small_bounded_lru(encoder, text_encoder_dir):
    limit = cxrgen_text.CACHE_LIMIT
    assert limit <= 256  # ~315 kB per prompt at the real width: ~80 MB per worker at most
    prompts = [f"finding number {i}" for i in range(limit + 20)]
    first = {}
    for prompt in prompts[:limit]:
        first[prompt] = encoder.encode([prompt], torch.device("cpu"))[0]
    assert len(encoder._cache) == limit
    encoder.encode([prompts[0]], torch.device("cpu"))  # recently used again: now the newest
    for prompt in prompts[limit:]:
        encoder.encode([prompt], torch.device("cpu"))
        assert len(encoder._cache) <= limit
    kept = list(encoder._cache)
    assert len(kept) == limit
    assert prompts[0] in kept  # kept: used recently
    assert prompts[1] not in kept and prompts[20] not in kept  # the oldest went first
    assert prompts[21] in kept
    # an evicted prompt is recomputed to the same bits, and matches a fresh encoder's
    again = encoder.encode([prompts[1]], torch.device("cpu"))[0]
    assert torch.equal(again, first[prompts[1]])
    fresh = load_text_encoder(str(text_encoder_dir)).encode([prompts[1], prompts[0]], torch.device("cpu"))
    assert torch.equal(fresh[0], first[prompts[1]]) and torch.equal(fresh[1], first[prompts[0]])


def test_batch_with_more_prompts_than_the_cache_holds(text_encoder_dir, encoder):
    small = TextEncoder(encoder.tokenizer, encoder.model, encoder.source, cache_limit=2)
    prompts = ["a", "b", "c", "a", "d", "e"]
    batch = small.encode(prompts, torch.device("cpu"))
    assert batch.shape[0] == len(prompts) and len(small._cache) == 2
    for row, prompt in zip(batch, prompts):
        assert torch.equal(row, encoder.encode([prompt], torch.device("cpu"))[0]), prompt


# ------------------------------------------------------------------ item 14: fast failure without network

HUB_REPO = "cxrgen-tests/tiny-clip"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROBE_SCRIPT = textwrap.dedent("""
    import json, socket, sys, time, traceback
    from transformers import CLIPTextModel, CLIPTokenizer  # imported before the clock starts
    from cxrgen.errors import InputError
    from cxrgen.model.text_encoder import load_text_encoder

    attempts = []
    real_connect = socket.socket.connect
    def connect(self, address):
        # huggingface_hub fetches its agent registry once per process (3 s timeout, no retries) whenever
        # it builds request headers, even for cache-only loads: not a download, so not counted
        if not any(frame.filename.endswith("_detect_agent.py") for frame in traceback.extract_stack()):
            attempts.append(list(address)[:2])
        return real_connect(self, address)
    socket.socket.connect = connect

    result = {}
    for name, repo in (("cached", sys.argv[1]), ("missing", sys.argv[2])):
        attempts.clear()
        start = time.monotonic()
        try:
            text = load_text_encoder(repo)
            result[name] = {"loaded": True, "fingerprint": text.fingerprint}
        except InputError as exc:
            result[name] = {"loaded": False, "message": str(exc)}
        result[name].update(seconds=time.monotonic() - start, attempts=list(attempts))
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="module")
def hub_without_network(tmp_path_factory) -> dict:
    """Load a cached hub repo and an uncached one in a fresh process: hub unreachable, HF_HUB_OFFLINE unset."""
    home = tmp_path_factory.mktemp("hf_home")
    repo_dir = home / "hub" / f"models--{HUB_REPO.replace('/', '--')}"
    demo.build_text_encoder(repo_dir / "snapshots" / COMMIT, seed=2)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    # port 9 (discard) on this machine: nothing listens, so the hub is unreachable without any real network
    env.update(HF_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9", NO_PROXY="*", no_proxy="*")
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(proxy, None)
    try:
        done = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, HUB_REPO, "cxrgen-tests/not-cached"], env=env,
                              capture_output=True, text=True, timeout=90)  # a hang bound only
    except subprocess.TimeoutExpired:
        pytest.fail("loading a hub repo without network did not finish within 90 s (hub retries?)")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_uncached_hub_repo_without_network_fails_within_seconds(hub_without_network):
    result = hub_without_network["missing"]
    assert not result["loaded"]
    assert result["seconds"] < 10, result
    message = result["message"]
    assert "\n" not in message
    assert "cxrgen-tests/not-cached" in message and "unreachable" in message and "http://127.0.0.1:9" in message
    assert "--text-encoder /path/to/local/copy" in message
    assert result["attempts"] == [["127.0.0.1", 9]]  # one probe, no retries


def test_cached_hub_repo_loads_without_touching_the_network(hub_without_network):
    result = hub_without_network["cached"]
    assert result["loaded"], result
    assert result["attempts"] == []
    assert result["fingerprint"] == f"revision:{COMMIT}"


def test_hf_hub_offline_fails_at_once_with_the_fix(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as conftest and HF_HUB_OFFLINE=1 do
    probes = []
    monkeypatch.setattr("socket.create_connection", lambda *args, **kwargs: probes.append(args))
    start = time.monotonic()
    with pytest.raises(InputError) as info:
        load_text_encoder("cxrgen-tests/not-cached-anywhere")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "cxrgen-tests/not-cached-anywhere" in message and "HF_HUB_OFFLINE" in message
    assert "--text-encoder /path/to/local/copy" in message and "\n" not in message
    assert probes == []  # offline means offline: not even the probe


def test_hub_probe_gives_up_after_its_timeout(monkeypatch):
    """A stalled connection (or name lookup, which ignores socket timeouts) costs the timeout, not minutes."""
    release = threading.Event()

    def stalled(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr("socket.create_connection", stalled)
    monkeypatch.setattr("urllib.request.getproxies", lambda: {})
    start = time.monotonic()
    try:
        problem = cxrgen_text.hub_unreachable("https://hub.example", timeout=0.5)
    finally:
        release.set()
    assert time.monotonic() - start < 5
    assert problem is not None and "hub.example:443" in problem and "no answer" in problem


# ------------------------------------------------------------------ item 7: text encoder fingerprint

def test_text_encoder_fingerprint_names_the_weights_loaded(tmp_path, text_encoder_dir, one_torch_thread):
    other = demo.build_text_encoder(tmp_path / "other", seed=1)
    first = load_text_encoder(str(text_encoder_dir))
    same = load_text_encoder(str(text_encoder_dir))
    different = load_text_encoder(str(other))
    weights = hashlib.sha256((text_encoder_dir / "text_encoder" / "model.safetensors").read_bytes()).hexdigest()
    assert cxrgen_text.text_encoder_fingerprint(first) == first.fingerprint == f"sha256:{weights}"
    assert cxrgen_text.text_encoder_fingerprint(same) == cxrgen_text.text_encoder_fingerprint(first)
    assert cxrgen_text.text_encoder_fingerprint(different) != cxrgen_text.text_encoder_fingerprint(first)
    assert cxrgen_text.text_encoder_fingerprint(different).startswith("sha256:")


# ------------------------------------------------------------------ item 22: truncation to uint8

def test_to_uint8_truncates_like_the_reference():
    values = [-0.5, 0.0, 0.7 / 255, 1.6 / 255, 100.8 / 255, 200.3 / 255, 254.99 / 255, 1.0, 1.5, 7.0]
    expected = [0, 0, 0, 1, 100, 200, 254, 255, 255, 255]  # floor(clip(v, 0, 1) * 255)
    image = torch.zeros((1, 2, 1, len(values)), dtype=torch.float32)
    image[0, 0, 0] = torch.tensor(values)
    image[0, 1] = 0.5  # only channel 0 counts
    pixels = to_uint8(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 1, len(values))
    assert pixels[0, 0].tolist() == expected


# ------------------------------------------------------------------ item 23: fsync of journal and files

@pytest.fixture
def fsyncs(monkeypatch) -> list:
    """Every os.fsync and os.replace call in order, as ("fsync", kind, inode) or ("replace", dst)."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        calls.append(("fsync", "dir" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        calls.append(("replace", str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_journal_append_fsyncs_once_per_batch(tmp_path, fsyncs):
    journal = Journal(tmp_path, "w0")
    try:
        fsyncs.clear()
        journal.append([])
        assert fsyncs == []
        journal.append([{"image_id": "a"}, {"image_id": "b"}])
        assert fsyncs == [("fsync", "file", journal.path.stat().st_ino)]
        journal.append([{"image_id": "c"}])
        assert len(fsyncs) == 2
    finally:
        journal.close()


def test_atomic_write_fsyncs_the_file_before_the_rename_then_the_folder(tmp_path, fsyncs):
    path = tmp_path / "sub" / "image.png"
    atomic_write(path, b"pixels")
    assert path.read_bytes() == b"pixels"
    assert fsyncs == [("fsync", "file", path.stat().st_ino), ("replace", str(path)),
                      ("fsync", "dir", path.parent.stat().st_ino)]


def test_a_text_encoder_folder_without_tokenizer_files_is_refused(text_encoder_dir, tmp_path):
    """transformers silently builds an empty tokenizer there: every prompt would be unknown tokens."""
    import shutil

    from cxrgen.errors import InputError
    from cxrgen.model.text_encoder import load_text_encoder

    shutil.copytree(text_encoder_dir / "text_encoder", tmp_path / "clip" / "text_encoder")
    (tmp_path / "clip" / "tokenizer").mkdir()
    with pytest.raises(InputError, match="tokenizer files .* are missing"):
        load_text_encoder(str(tmp_path / "clip"))


# ------------------------------------------------------------------ issue 19, item 1: nested label columns, card first

def _nested_manifest(tmp_path: Path) -> Path:
    table = pa.table({"prompt": ["Small left effusion", "Clear lungs", "Small left effusion"],
                      "tags": pa.array([["pa", "upright"], [], ["pa", "upright"]], pa.list_(pa.string())),
                      "study": pa.array([{"site": "A", "n": 1}, None, {"site": "B", "n": 2}]),
                      "Edema": [1, 0, 1]})
    path = tmp_path / "nested.parquet"
    pq.write_table(table, path)
    return path


def _status(out: Path):
    from typer.testing import CliRunner

    from cxrgen.cli import app

    return CliRunner().invoke(app, ["status", str(out)])


def test_list_and_struct_label_columns_are_carried_and_counted_in_the_card(tmp_path, bundle_dir, text_encoder_dir,
                                                                           one_torch_thread):
    out = tmp_path / "out"
    result = generate(RunConfig(manifest=str(_nested_manifest(tmp_path)), out=str(out), model=str(bundle_dir),
                                text_encoder=str(text_encoder_dir), cache_dir=str(tmp_path / "cache"), steps=1,
                                image_format="png", quiet=True), log=lambda message: None)
    assert result.complete
    table = pq.read_table(out / "metadata.parquet")
    assert table.schema.field("tags").type == pa.list_(pa.string())
    assert table.column("tags").to_pylist() == [["pa", "upright"], [], ["pa", "upright"]]
    assert table.column("study").to_pylist()[2] == {"site": "B", "n": 2}
    card = (out / "README.md").read_text(encoding="utf-8")
    labels = card.split("## Labels", 1)[1].split("\n## ", 1)[0]
    assert '- `tags`: \\["pa", "upright"\\]: 2, \\[\\]: 1' in labels
    assert "- `study`: " in labels and "blank: 1" in labels and "- `Edema`: 1: 2, 0: 1" in labels
    assert _status(out).exit_code == 0


def test_a_failure_while_the_card_is_written_leaves_a_run_that_is_not_complete(tmp_path, bundle_dir,
                                                                               text_encoder_dir, one_torch_thread,
                                                                               monkeypatch):
    import cxrgen.runs.state

    config = RunConfig(manifest=str(_nested_manifest(tmp_path)), out=str(tmp_path / "out"), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), cache_dir=str(tmp_path / "cache"), steps=1,
                       image_format="png", quiet=True)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cxrgen.runs.state, "card_text", broken)
    with pytest.raises(OSError):
        generate(config, log=lambda message: None)
    out = Path(config.out)
    # metadata.parquet is committed first (an object store's merge is decided by that commit), the card second:
    # a run counts as complete only with both
    assert not (out / "README.md").exists()
    status = _status(out)
    assert status.exit_code == 1 and "cxrgen resume" in status.output
    monkeypatch.undo()
    assert generate(config, log=lambda message: None).complete  # the resume merges and writes both
    assert (out / "README.md").is_file() and _status(out).exit_code == 0
    # a finished folder whose card is gone is not complete either; a resume writes the card again
    (out / "README.md").unlink()
    assert _status(out).exit_code == 1
    assert generate(config, log=lambda message: None).complete and (out / "README.md").is_file()


# ------------------------------------------------------------------ issue 19, item 8: the card escapes manifest text

def test_the_card_shows_hostile_labels_and_column_names_as_text(tmp_path, bundle_dir, text_encoder_dir,
                                                                one_torch_thread):
    manifest = tmp_path / "m.csv"
    manifest.write_text('prompt,<img src=x onerror=alert(1)>,note,negative_prompt\n'
                        '"Small effusion",1,"line\n## injected","a | b <b>bold</b>"\n', encoding="utf-8")
    out = tmp_path / "out"
    assert generate(RunConfig(manifest=str(manifest), out=str(out), model=str(bundle_dir),
                              text_encoder=str(text_encoder_dir), cache_dir=str(tmp_path / "cache"), steps=1,
                              image_format="png", quiet=True), log=lambda message: None).complete
    from markdown_it import MarkdownIt

    card = (out / "README.md").read_text(encoding="utf-8")
    html = MarkdownIt("commonmark").render(card)  # as a viewer renders it, raw HTML allowed
    assert "<img" not in html and "<b>" not in html and "injected</h2>" not in html
    assert "line ## injected: 1" in html  # the value, on its label line, as text
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    settings = [line for line in card.splitlines() if line.startswith("| negative prompt")]
    assert settings == ["| negative prompt (default) | (empty) |"]  # the row's own negative prompt is per image
