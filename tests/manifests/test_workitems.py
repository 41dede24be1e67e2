"""The plan: safe unique image ids, the documented seed rule, and folders of bounded size."""
from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from cxrgen.config import RunConfig
from cxrgen.errors import InputError
from cxrgen.manifests.reader import Row
from cxrgen.manifests.workitems import (
    FILES_PER_FOLDER,
    derive_seed,
    load_plan,
    make_plan,
)

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def plan(rows, *, seed=0, num_images=1, guidance_scale=7.0, negative_prompt="", image_format="png",
         file_names="index"):
    return make_plan(tuple(rows), seed=seed, num_images=num_images, guidance_scale=guidance_scale,
                     negative_prompt=negative_prompt, image_format=image_format, file_names=file_names)


def expected_seed(base: int, row_key: str, k: int) -> int:
    """The rule of docs/manifests.md, written out independently of cxrgen."""
    digest = hashlib.sha256(f"cxrgen-seed:{base}:{row_key}:{k}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def rows_with_ids(ids, **kwargs):
    return [Row(number=i + 1, prompt=f"prompt {i}", row_id=row_id, **kwargs) for i, row_id in enumerate(ids)]


# --------------------------------------------------------------------------- image ids and file names

HOSTILE_IDS = [
    "a/b", "a\\b", "../../etc/passwd", "..", ".", "...", ".hidden", "-rf", "a b", "  padded  ", "tab\there",
    "new\nline", "ünïcödé", "日本語", "😀", "x" * 300, "y" * 64, "CON", "nul", "a:b", "a*b?c", "<>|\"'",
    "Scan", "scan", "SCAN", "a_b", "a b_", "a%2Fb", "\x00nul", "row0000001", "id",
]


@pytest.mark.parametrize("file_names", ["id", "index"])
def test_hostile_ids_give_unique_safe_file_names(tmp_path, file_names):
    items = plan(rows_with_ids(HOSTILE_IDS), num_images=2, file_names=file_names)
    assert len(items) == 2 * len(HOSTILE_IDS)
    image_ids = [i.image_id for i in items]
    assert len(set(image_ids)) == len(image_ids)
    # unique even on case-insensitive file systems (macOS, Windows)
    assert len({i.lower() for i in image_ids}) == len(image_ids)
    for item in items:
        parts = Path(item.file_name).parts
        assert parts[0] == "images" and len(parts) == 3, item.file_name
        assert re.fullmatch(r"\d{5}", parts[1]), item.file_name
        name = parts[2]
        assert name == (f"{item.image_id}.png" if file_names == "id" else f"{item.index:08d}.png")
        assert SAFE_NAME.fullmatch(item.image_id), item.image_id
        assert len(name.encode("utf-8")) <= 120, name  # far below every file system's 255-byte limit
    # every file can really be created where the plan says, and none lands outside images/
    for item in items:
        target = (tmp_path / item.file_name).resolve()
        assert target.is_relative_to((tmp_path / "images").resolve())
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
    assert sum(1 for p in (tmp_path / "images").rglob("*") if p.is_file()) == len(items)


def test_hostile_ids_keep_their_raw_value_in_the_plan():
    items = plan(rows_with_ids(HOSTILE_IDS))
    assert [i.row_id for i in items] == HOSTILE_IDS


def test_index_file_names_hold_no_manifest_text():
    """The default layout names files by plan index: an id such as "test-3" never reaches a path, where
    datasets' imagefolder would read it as a split name."""
    items = plan(rows_with_ids(["test-3", "val.x", "train"]), num_images=2)
    assert [i.file_name for i in items] == [f"images/00000/{k:08d}.png" for k in range(6)]
    assert [i.image_id for i in items][:2] == ["test-3_0000", "test-3_0001"]  # ids still carry the row id


def test_case_only_differences_stay_apart():
    items = plan(rows_with_ids(["Scan", "scan", "SCAN"]))
    ids = [i.image_id for i in items]
    assert len({i.lower() for i in ids}) == 3
    # a plain lower-case safe id is kept readable as it is
    assert ids[1] == "scan_0000"


def test_safe_ids_stay_readable():
    items = plan(rows_with_ids(["p10_s5001", "study-2.1"]), num_images=2)
    assert [i.image_id for i in items] == ["p10_s5001_0000", "p10_s5001_0001", "study-2.1_0000", "study-2.1_0001"]


def test_rows_without_ids_are_named_by_row_number():
    items = plan([Row(1, "a"), Row(2, "b", num_images=2)])
    assert [i.image_id for i in items] == ["row0000001_0000", "row0000002_0000", "row0000002_0001"]


def test_long_ids_are_shortened_but_stay_distinct():
    prefix = "z" * 200
    items = plan(rows_with_ids([prefix + "1", prefix + "2"]))
    assert items[0].image_id != items[1].image_id
    assert all(len(i.image_id) < 100 for i in items)


def test_a_sanitised_id_cannot_collide_silently():
    # "a b" becomes "a_b-<hash>"; a second row whose id IS that text would share the file name
    clash = "a_b-" + hashlib.sha256("a b".encode()).hexdigest()[:8]
    with pytest.raises(InputError) as info:
        plan(rows_with_ids(["a b", "other", clash]))
    message = str(info.value)
    assert "rows 1 and 3, column id" in message


def test_image_id_does_not_depend_on_batching_or_other_rows():
    base = plan(rows_with_ids(["a", "b", "c"]), num_images=2)
    changed = plan(rows_with_ids(["c", "x", "a"]), num_images=5)
    mine = {(i.row_id, i.sample_index): i.image_id for i in changed}
    for item in base:
        if item.row_id in ("a", "c"):
            assert mine[(item.row_id, item.sample_index)] == item.image_id


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("base, key, k", [
    (0, "row=1", 0), (0, "row=1", 1), (0, "row=2", 0), (1, "row=1", 0), (12345, "id=p10/s7", 3),
    (2**63 - 1, "id=ünïcödé", 99_999), (7, "id=", 0), (0, "id=row=1", 0),
])
def test_derive_seed_matches_documented_rule(base, key, k):
    value = derive_seed(base, key, k)
    assert value == expected_seed(base, key, k)
    assert 0 <= value < 2**63


def test_derive_seed_values_pinned():
    # Pinned so that a change of the rule (which would silently change every image) fails loudly.
    assert derive_seed(0, "row=1", 0) == 5837095372824802782
    assert len({derive_seed(0, "row=1", k) for k in range(1000)}) == 1000


def test_plan_seeds_follow_the_rule_for_ids_and_row_numbers():
    rows = [Row(1, "a", row_id="p1"), Row(2, "b", row_id="p2", num_images=3)]
    items = plan(rows, seed=42, num_images=2)
    assert [(i.row_id, i.sample_index, i.seed) for i in items] == [
        ("p1", 0, expected_seed(42, "id=p1", 0)), ("p1", 1, expected_seed(42, "id=p1", 1)),
        ("p2", 0, expected_seed(42, "id=p2", 0)), ("p2", 1, expected_seed(42, "id=p2", 1)),
        ("p2", 2, expected_seed(42, "id=p2", 2)),
    ]
    items = plan([Row(1, "a"), Row(2, "b")], seed=3)
    assert [i.seed for i in items] == [expected_seed(3, "row=1", 0), expected_seed(3, "row=2", 0)]


def test_row_seed_column_gives_seed_plus_k():
    items = plan([Row(1, "a", seed=1000, num_images=3), Row(2, "b", seed=0, num_images=2), Row(3, "c")], seed=9)
    assert [i.seed for i in items] == [1000, 1001, 1002, 0, 1, expected_seed(9, "row=3", 0)]


def test_row_seed_does_not_depend_on_base_seed():
    a = plan([Row(1, "a", seed=5, num_images=2)], seed=0)
    b = plan([Row(1, "a", seed=5, num_images=2)], seed=777)
    assert [i.seed for i in a] == [i.seed for i in b] == [5, 6]


def test_seeds_do_not_depend_on_order_or_other_rows():
    ids = [f"study{n}" for n in range(20)]
    base = {(i.row_id, i.sample_index): i.seed for i in plan(rows_with_ids(ids), seed=11, num_images=3)}
    shuffled_ids = ids[:]
    random.Random(0).shuffle(shuffled_ids)
    # other order, other prompts, other rows added, other per-row counts
    rows = [Row(n + 1, f"other prompt {n}", row_id=row_id, num_images=3 if n % 2 else 5)
            for n, row_id in enumerate(["new0"] + shuffled_ids + ["new1"])]
    for item in plan(rows, seed=11, num_images=1):
        if (item.row_id, item.sample_index) in base:
            assert item.seed == base[(item.row_id, item.sample_index)]


def test_seeds_without_ids_depend_only_on_row_number():
    a = plan([Row(1, "a"), Row(2, "b", num_images=4), Row(3, "c")], seed=1, num_images=2)
    b = plan([Row(1, "zzz", num_images=0), Row(2, "b"), Row(3, "other", guidance_scale=1.0)], seed=1, num_images=3)
    seeds_a = {(i.row, i.sample_index): i.seed for i in a}
    for item in b:
        if (item.row, item.sample_index) in seeds_a:
            assert item.seed == seeds_a[(item.row, item.sample_index)]


def test_base_seed_changes_every_derived_seed():
    rows = rows_with_ids(["a", "b", "c"])
    one = [i.seed for i in plan(rows, seed=0)]
    two = [i.seed for i in plan(rows, seed=1)]
    assert all(x != y for x, y in zip(one, two))


def _write_manifest(path: Path) -> Path:
    lines = ["id,prompt,num_images"] + [f"s{n},sentence {n % 3},{1 + n % 4}" for n in range(30)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plan_does_not_depend_on_speed_settings(tmp_path):
    manifest = _write_manifest(tmp_path / "m.csv")

    def items_for(**speed):
        config = RunConfig(manifest=str(manifest), out=str(tmp_path / "out"), **speed)
        return load_plan(config)[1]

    reference = items_for()
    for speed in ({"batch_size": 1}, {"batch_size": 7}, {"batch_size": 64, "decode_batch_size": 3},
                  {"workers": 3}, {"device": "cpu", "dtype": "bfloat16"}, {"channels_last": True}):
        assert items_for(**speed) == reference, speed
    # and nothing was written by planning
    assert not (tmp_path / "out").exists()


def test_runs_with_other_batch_sizes_record_the_same_ids_seeds_and_files(tmp_path, bundle_dir, text_encoder_dir):
    import pyarrow.parquet as pq

    from cxrgen.runs.generate import generate

    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,num_images\nb/1,Effusion,2\na,Normal,1\nc,Edema,\n")
    tables = []
    for batch_size in (1, 3):
        config = RunConfig(manifest=str(manifest), out=str(tmp_path / f"out{batch_size}"), model=str(bundle_dir),
                           text_encoder=str(text_encoder_dir), steps=1, batch_size=batch_size, seed=8, quiet=True,
                           image_format="png")
        generate(config, log=lambda message: None)
        tables.append(pq.read_table(tmp_path / f"out{batch_size}" / "metadata.parquet")
                      .select(["image_id", "file_name", "row_id", "sample_index", "seed"]).to_pylist())
    assert tables[0] == tables[1]
    assert [r["seed"] for r in tables[0]] == [expected_seed(8, "id=b/1", 0), expected_seed(8, "id=b/1", 1),
                                              expected_seed(8, "id=a", 0), expected_seed(8, "id=c", 0)]


# --------------------------------------------------------------------------- overrides and defaults


def test_defaults_and_overrides_per_row():
    rows = [Row(1, "a"), Row(2, "b", num_images=0), Row(3, "c", guidance_scale=0.0, negative_prompt="noise"),
            Row(4, "", num_images=2)]
    items = plan(rows, num_images=1, guidance_scale=4.5, negative_prompt="blurry")
    assert [(i.row, i.sample_index, i.guidance_scale, i.negative_prompt, i.prompt) for i in items] == [
        (1, 0, 4.5, "blurry", "a"), (3, 0, 0.0, "noise", "c"), (4, 0, 4.5, "blurry", ""), (4, 1, 4.5, "blurry", "")]
    assert [i.index for i in items] == list(range(len(items)))


def test_num_images_zero_everywhere_gives_an_empty_plan():
    assert plan([Row(1, "a"), Row(2, "b")], num_images=0) == []


# --------------------------------------------------------------------------- folders


def test_files_spread_over_folders_of_at_most_files_per_folder():
    assert FILES_PER_FOLDER <= 10_000
    items = plan([Row(1, "a", num_images=1500), Row(2, "b", num_images=1), Row(3, "c", num_images=1000)])
    folders = Counter(str(Path(i.file_name).parent) for i in items)
    assert max(folders.values()) <= FILES_PER_FOLDER
    assert sum(folders.values()) == 2501
    assert sorted(folders) == ["images/00000", "images/00001", "images/00002"]
    # folder names sort in plan order
    assert [str(Path(i.file_name).parent) for i in items] == sorted(str(Path(i.file_name).parent) for i in items)


def test_file_suffix_follows_image_format():
    assert plan([Row(1, "a")], image_format="jpg")[0].file_name.endswith(".jpg")
    assert plan([Row(1, "a")], image_format="png")[0].file_name.endswith(".png")


def test_manifest_and_plan_stages_do_not_import_torch():
    """The plan stage is pure Python: planning a million images must not wait on importing torch."""
    import subprocess
    import sys

    code = "import sys, cxrgen.manifests.reader, cxrgen.manifests.workitems; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
