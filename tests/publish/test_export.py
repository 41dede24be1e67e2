"""Issue 10: the dataset card, loading with `datasets`, and `cxrgen export` (WebDataset shards, imagefolder copies,
--accepted-only). A real tiny run, a real `cxrgen evaluate` of it (random-weight evaluator), real readers."""
from __future__ import annotations

import math
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_eval as te
import webdataset as wds
from helpers import assert_input_error, bucket_objects, upload_run
from helpers import make_small_run as make_run
from typer.testing import CliRunner

from cxrgen.cli import app
from cxrgen.publish.export import sample_key

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])




def load(*args, **kwargs):
    datasets.disable_progress_bars()
    return datasets.load_dataset(*args, cache_dir=str(kwargs.pop("cache")), **kwargs)


def plain(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


@pytest.fixture(scope="module")
def run(tmp_path_factory, bundle_dir, text_encoder_dir, one_torch_thread) -> Path:
    """A finished run (ids test-3, val.x, dev_eval: split names to datasets), then everything cxrgen adds later:
    a real evaluation and a real preview."""
    root = tmp_path_factory.mktemp("export")
    out = make_run(root, bundle_dir, text_encoder_dir)
    weights = te.save_release(root / "weights" / te.RELEASE_FILE)
    result = invoke("evaluate", out, "--evaluator-weights", weights, "--max-pairs", "0", "--cache-dir", root / "c",
                    "--quiet")
    assert result.exit_code == 0, result.output
    assert any((out / "quality").glob("*.png"))  # plots that must never become examples
    assert invoke("preview", out).exit_code == 0
    assert any((out / "preview").rglob("*.png")) and any((out / "preview").rglob("*.jpg"))  # sheets, thumbnails
    return out


@pytest.fixture(scope="module")
def meta(run) -> pd.DataFrame:
    return pd.read_parquet(run / "metadata.parquet")


def with_accepted(run: Path, accepted: list[bool]) -> None:
    """Set the evaluation's accept flags to a known pattern (the real evaluation made the file)."""
    path = run / "quality" / "scores.parquet"
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("accepted"), "accepted", pa.array(accepted, pa.bool_()))
    pq.write_table(table, path)


# ------------------------------------------------------------------------------------------- card and datasets


def test_card_counts_labels_settings_and_terms(run, meta):
    card = (run / "README.md").read_text(encoding="utf-8")
    front = card.split("---\n")[1]
    assert "- split: train" in front and "- metadata.parquet" in front and "- images/**/*.jpg" in front
    assert f"- images: {len(meta)} (JPG" in card
    assert f"- distinct prompts: {meta['prompt'].nunique()}, from {meta['manifest_row'].nunique()} manifest" in card
    for column in ("Edema", "view"):
        values = pq.read_table(run / "metadata.parquet").column(column).to_pylist()
        counts = Counter("blank" if v in (None, "") else str(v) for v in values)
        line = next(line for line in card.splitlines() if line.startswith(f"- `{column}`: "))
        found = dict(part.rsplit(": ", 1) for part in line.split(": ", 1)[1].split(", "))
        assert {k: int(v) for k, v in found.items()} == dict(counts), line
    assert "| steps | 1 |" in card and "| scheduler | ddim |" in card
    assert "MIMIC-CXR" in card and "data use agreement" in card and "not for clinical use" in card
    assert "arXiv.2211.02701" in card  # MONAI's own citation
    assert "intended use (the bundle's words): tests only" in card  # read from the bundle's configs/metadata.json


def test_load_dataset_gives_one_split_of_every_image_with_its_labels(run, meta, tmp_path):
    dataset = load(str(run), cache=tmp_path / "hf")
    assert list(dataset) == ["train"]  # quality/, preview/ and ids like test-3 or val.x made no split
    train = dataset["train"].cast_column("image", datasets.Image(decode=False))
    assert train.num_rows == len(meta) == 5
    assert train["image_id"] == list(meta["image_id"])
    for column in ("prompt", "seed", "Edema", "view"):
        assert [plain(v) for v in train[column]] == [plain(v) for v in meta[column]], column
    for example, name in zip(train["image"], meta["file_name"]):
        assert Path(example["path"]).read_bytes() == (run / name).read_bytes()


def test_imagefolder_data_dir_gives_one_split_of_every_image(run, meta, tmp_path):
    """The issue's call: it reads splits from path names and ignores the card, so no path may hold one."""
    dataset = load("imagefolder", data_dir=str(run), cache=tmp_path / "hf")
    assert list(dataset) == ["train"]
    train = dataset["train"].cast_column("image", datasets.Image(decode=False))
    assert train["image_id"] == list(meta["image_id"]) and len(meta) == 5
    for column in ("prompt", "seed", "Edema", "view"):
        assert [plain(v) for v in train[column]] == [plain(v) for v in meta[column]], column
    for example, name in zip(train["image"], meta["file_name"]):
        assert Path(example["path"]).read_bytes() == (run / name).read_bytes()


def test_an_evaluation_folder_would_make_a_stray_split(run, tmp_path):
    """Why `cxrgen evaluate` writes quality/: the same folder with its old name loses every image to a test split."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "quality").rename(copy / "evaluation")
    dataset = load("imagefolder", data_dir=str(copy), cache=tmp_path / "hf")
    assert "train" not in dataset or dataset["train"].num_rows != 5


def test_resume_writes_a_missing_card(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("quality", "preview"))
    before = (copy / "README.md").read_text(encoding="utf-8")
    (copy / "README.md").unlink()  # a kill between metadata.parquet and the card, or a run merged by older cxrgen
    result = invoke("resume", copy, "--quiet")  # nothing left to make: it only checks and finalizes
    assert result.exit_code == 0, result.output
    assert (copy / "README.md").read_text(encoding="utf-8") == before


# ------------------------------------------------------------------------------------------------ webdataset


def test_webdataset_shards_round_trip(run, meta, tmp_path):
    result = invoke("export", run, "--format", "webdataset", "--to", tmp_path / "shards", "--shard-size", "12KB")
    assert result.exit_code == 0, result.output
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert [s.name for s in shards] == [f"train-{i:06d}.tar" for i in range(len(shards))] and len(shards) >= 2
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted([s.name for s in shards] + ["README.md"])
    assert all(s.stat().st_size <= 12_000 for s in shards)
    names = [n for s in shards for n in tarfile.open(s).getnames()]
    keys = [n.rsplit(".", 1)[0] for n in names[::2]]
    assert keys == [sample_key(i) for i in meta["image_id"]] and all("." not in k for k in keys)
    assert names[1::2] == [f"{k}.json" for k in keys] and names[::2] == [f"{k}.jpg" for k in keys]
    # the webdataset package, in plan order
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == keys
    for sample, (_, row) in zip(samples, meta.iterrows()):
        assert sample["json"] == {k: plain(v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    raw = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert [s["jpg"] for s in raw] == [(run / f).read_bytes() for f in meta["file_name"]]
    # and datasets' webdataset loader
    loaded = load("webdataset", data_files={"train": [str(s) for s in shards]}, split="train", cache=tmp_path / "hf")
    assert loaded.num_rows == len(meta)
    assert [r["image_id"] for r in loaded["json"]] == list(meta["image_id"])
    assert [plain(r["Edema"]) for r in loaded["json"]] == [plain(v) for v in meta["Edema"]]
    # the same run always exports to the same bytes
    assert invoke("export", run, "--to", tmp_path / "again", "--shard-size", "12KB").exit_code == 0
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in sorted((tmp_path / "again").glob("*.tar"))]


def test_the_cards_webdataset_examples_read_every_shard_whatever_their_count(run, meta, tmp_path):
    """The shards' own card names the real shards; OUT's card (written before any export) reads any count."""
    assert invoke("export", run, "--to", tmp_path / "shards", "--shard-size", "12KB").exit_code == 0
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert len(shards) >= 3  # more than one, and not the ten the old example assumed
    card = (tmp_path / "shards" / "README.md").read_text(encoding="utf-8")
    pattern = re.search(r'wds\.WebDataset\("SHARDS/([^"]+)"\)', card).group(1)
    assert pattern == f"train-{{000000..{len(shards) - 1:06d}}}.tar"
    samples = list(wds.WebDataset(str(tmp_path / "shards" / pattern), shardshuffle=False))  # braces expanded
    assert [s["__key__"] for s in samples] == [sample_key(i) for i in meta["image_id"]]
    assert "- train-*.tar" in card.split("---")[1]  # the front matter's split: the shards, not metadata.parquet
    loaded = load(str(tmp_path / "shards"), split="train", cache=tmp_path / "hf")  # what the card tells datasets
    assert loaded.num_rows == len(meta)
    # OUT's card: a glob, so every shard is read
    out_card = (run / "README.md").read_text(encoding="utf-8")
    assert "000009" not in out_card
    expression = re.search(r"wds\.WebDataset\((sorted\(glob\.glob\([^)]*\)\))\)", out_card).group(1)
    import glob

    files = eval(expression.replace("SHARDS", str(tmp_path / "shards")), {"glob": glob})  # noqa: S307 - the card's code
    assert len(list(wds.WebDataset(files, shardshuffle=False))) == len(meta)
    # one shard: no brace range
    assert invoke("export", run, "--to", tmp_path / "one").exit_code == 0
    assert 'wds.WebDataset("SHARDS/train-000000.tar")' in (tmp_path / "one" / "README.md").read_text(encoding="utf-8")


def test_a_run_in_a_bucket_exports_to_a_bucket_and_to_a_folder_as_a_local_run_does(run, s3, tmp_path):
    url = upload_run(run, s3)  # the same layout as the folder: what `generate -o s3://...` writes
    bucket = url.split("/")[2]
    local = tmp_path / "local"
    assert invoke("export", run, "--to", local, "--shard-size", "12KB").exit_code == 0
    # WebDataset shards straight into the bucket, byte for byte the local export's, nothing else beside them
    result = invoke("export", url, "--to", f"s3://{bucket}/shards", "--shard-size", "12KB")
    assert result.exit_code == 0, result.output
    shards = bucket_objects(s3, f"s3://{bucket}/shards")
    # the same shards and card; the card names the run it came from (the folder, or the bucket)
    card = shards.pop("README.md").decode("utf-8")
    assert card == (local / "README.md").read_text(encoding="utf-8").replace(str(run), url)
    assert shards == {p.name: p.read_bytes() for p in local.iterdir() if p.name != "README.md"} and len(shards) >= 2
    # also from a local run into a bucket, and with --accepted-only (scores read from the bucket)
    assert invoke("export", run, "--to", f"s3://{bucket}/from-folder", "--shard-size", "12KB").exit_code == 0
    from_folder = bucket_objects(s3, f"s3://{bucket}/from-folder")
    assert from_folder.pop("README.md").decode("utf-8") == (local / "README.md").read_text(encoding="utf-8")
    assert from_folder == shards
    assert invoke("export", run, "--accepted-only", "--to", tmp_path / "kept").exit_code == 0
    assert invoke("export", url, "--accepted-only", "--to", f"s3://{bucket}/kept").exit_code == 0
    kept = bucket_objects(s3, f"s3://{bucket}/kept")
    assert kept.pop("README.md").decode("utf-8") == \
        (tmp_path / "kept" / "README.md").read_text(encoding="utf-8").replace(str(run), url)
    assert kept == {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir() if p.name != "README.md"}
    # an imagefolder copy of the bucket's run into a local folder: the local copy's files
    assert invoke("export", url, "--format", "imagefolder", "--to", tmp_path / "copy").exit_code == 0
    assert invoke("export", run, "--format", "imagefolder", "--to", tmp_path / "linked").exit_code == 0
    for path in (tmp_path / "linked").rglob("*"):
        if path.is_file() and path.name != "README.md":  # the card names where it was exported from
            assert (tmp_path / "copy" / path.relative_to(tmp_path / "linked")).read_bytes() == path.read_bytes()
    # refusals: one line, nothing written
    before = bucket_objects(s3, f"s3://{bucket}/shards")
    for args, words in ((["--to", f"s3://{bucket}/shards"], "already holds objects"),
                        (["--format", "imagefolder", "--to", f"s3://{bucket}/folder"], "--format webdataset"),
                        (["--to", f"{url}/inside"], "inside the run")):
        refused = invoke("export", url, *args)
        assert_input_error(refused, words)
    assert bucket_objects(s3, f"s3://{bucket}/shards") == before
    assert not bucket_objects(s3, f"s3://{bucket}/folder") and not bucket_objects(s3, f"{url}/inside")


# ------------------------------------------------------------------------------------------------ accepted only


def test_accepted_only_without_an_evaluation_is_refused(bundle_dir, text_encoder_dir, tmp_path, run):
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("quality"))
    for fmt in ("webdataset", "imagefolder"):
        result = invoke("export", bare, "--format", fmt, "--accepted-only", "--to", tmp_path / fmt)
        assert result.exit_code == 2
        assert result.stderr.strip().count("\n") == 0 and f"run `cxrgen evaluate {bare}` first" in result.stderr
        assert not (tmp_path / fmt).exists()


def test_accepted_only_exports_the_accepted_images(run, meta, tmp_path):
    run = shutil.copytree(run, tmp_path / "run")  # a private copy: the shared run's scores stay as evaluated
    accepted = [True, False, True, False, True]
    with_accepted(run, accepted)
    kept = [i for i, a in zip(meta["image_id"], accepted) if a]
    # webdataset
    assert invoke("export", run, "--accepted-only", "--to", tmp_path / "wds").exit_code == 0
    samples = list(wds.WebDataset(str(tmp_path / "wds" / "train-000000.tar"), shardshuffle=False).decode())
    assert [s["json"]["image_id"] for s in samples] == kept
    # imagefolder: filtered metadata, hard-linked images, its own card, loadable
    dest = tmp_path / "folder"
    result = invoke("export", run, "--format", "imagefolder", "--accepted-only", "--to", dest)
    assert result.exit_code == 0, result.output
    table = pq.read_table(dest / "metadata.parquet")
    assert table.equals(pq.read_table(run / "metadata.parquet").filter(pa.array(accepted)))
    table = table.to_pandas()
    for name in table["file_name"]:
        assert (dest / name).stat().st_ino == (run / name).stat().st_ino  # a hard link, not a copy
    assert sorted(p.relative_to(dest).as_posix() for p in (dest / "images").rglob("*") if p.is_file()) == \
        sorted(table["file_name"])
    card = (dest / "README.md").read_text(encoding="utf-8")
    assert f"- images: {len(kept)} (JPG" in card and f"the {len(kept)} of {len(meta)} images" in card
    loaded = load(str(dest), split="train", cache=tmp_path / "hf")
    assert loaded["image_id"] == kept


def test_verified_only_exports_the_images_verify_confirmed(run, bundle_dir, text_encoder_dir, verifier_file,
                                                           tmp_path):
    # a run made without --verify verifies nothing: the option is refused, nothing is written
    result = invoke("export", run, "--verified-only", "--to", tmp_path / "none")
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0
    assert "generate with --verify" in result.stderr and not (tmp_path / "none").exists()
    # rows labelled Edema 1 are verified (every first try passes --min-score 0); the others are not verified
    out = make_run(tmp_path / "verified", bundle_dir, text_encoder_dir, "jpg", "--verify", "--min-score", "0",
                   "--verifier-weights", verifier_file)
    table = pq.read_table(out / "metadata.parquet").to_pandas()
    confirmed = table["verified"].eq(True)
    assert confirmed.sum() == 3 and table["verified"][~confirmed].isna().all()
    kept = table["image_id"][confirmed].tolist()
    assert invoke("export", out, "--verified-only", "--to", tmp_path / "wds").exit_code == 0
    samples = list(wds.WebDataset(str(tmp_path / "wds" / "train-000000.tar"), shardshuffle=False).decode())
    assert [s["json"]["image_id"] for s in samples] == kept and all(s["json"]["verified"] for s in samples)
    dest = tmp_path / "folder"
    assert invoke("export", out, "--format", "imagefolder", "--verified-only", "--to", dest).exit_code == 0
    assert pq.read_table(dest / "metadata.parquet").column("image_id").to_pylist() == kept
    assert f"the {len(kept)} of {len(table)} images `cxrgen generate --verify` verified" in \
        (dest / "README.md").read_text(encoding="utf-8")


def test_imagefolder_export_of_everything_and_refusals(run, meta, tmp_path):
    dest = tmp_path / "all"
    dest.mkdir()  # an empty folder is fine
    assert invoke("export", run, "--format", "imagefolder", "--to", dest).exit_code == 0
    assert pq.read_table(dest / "metadata.parquet").equals(pq.read_table(run / "metadata.parquet"))
    for target, words in ((dest, "not an empty folder"), (run / "sub", "inside the run folder")):
        result = invoke("export", run, "--to", target)
        assert result.exit_code == 2 and words in result.stderr
    result = invoke("export", run, "--to", tmp_path / "x", "--shard-size", "big")
    assert result.exit_code == 2 and re.search(r"--shard-size 'big' is not a size", result.stderr)
    assert not (tmp_path / "x").exists() and not (run / "sub").exists()


# ------------------------------------------------------------------------------------------------ hostile tables


def with_row_zero(run: Path, tmp_path: Path, column: str, value: str) -> Path:
    """A copy of the run whose metadata.parquet has `value` in `column` of its first row."""
    copy = Path(shutil.copytree(run, tmp_path / "hostile", ignore=shutil.ignore_patterns("quality", "preview")))
    table = pq.read_table(copy / "metadata.parquet")
    values = table.column(column).to_pylist()
    table = table.set_column(table.schema.get_field_index(column), column, pa.array([value, *values[1:]]))
    pq.write_table(table, copy / "metadata.parquet")
    return copy


@pytest.mark.parametrize("fmt", ["webdataset", "imagefolder"])
@pytest.mark.parametrize("name", ["../secret.jpg", "images/../../secret.jpg", "ABSOLUTE"])
def test_a_file_name_outside_the_run_is_refused_and_nothing_read_or_written(run, tmp_path, fmt, name):
    """metadata.parquet may come from anywhere: a file_name leaving OUT must neither be packed into a shard
    (the secret would travel with it) nor decide where a hard link is made."""
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"not for export")
    name = str(secret) if name == "ABSOLUTE" else name
    copy = with_row_zero(run, tmp_path, "file_name", name)
    result = invoke("export", copy, "--format", fmt, "--to", tmp_path / "to")
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0, result.output
    assert name in result.stderr and "relative to OUT" in result.stderr
    assert not (tmp_path / "to").exists() and secret.read_bytes() == b"not for export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile", "secret.jpg"]  # no staging folder left


@pytest.mark.parametrize("image_id", ["/tmp/evil_0000", "../../evil_0000", "a\\b_0000", "a/b_0000"])
def test_sample_keys_never_hold_a_path(image_id):
    """A tar member named from a hostile image_id must not land outside the folder a shard is unpacked in."""
    key = sample_key(image_id)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", key), key
    assert key != sample_key(image_id.replace("/", "_").replace("\\", "_"))  # still one key per id
    assert sample_key("row0000001_0000") == "row0000001_0000"  # cxrgen's own ids are kept as they are


def test_long_image_ids_give_keys_a_tar_member_name_can_hold(tmp_path):
    """Ids from tables made elsewhere may exceed USTAR's 100-byte names: keys are cut, hashed, still distinct."""
    own = "x" * 64 + "-0123abcd_0000"  # the longest id cxrgen makes itself: kept
    ids = [own, "a" * 200 + "_0000", "a" * 200 + "_0001", "b" * 95]
    keys = [sample_key(i) for i in ids]
    assert keys[0] == own and len(set(keys)) == 4 and all(len(f"{k}.json") <= 100 for k in keys), keys
    with tarfile.open(tmp_path / "t.tar", "w", format=tarfile.USTAR_FORMAT) as tar:  # the format shards use
        for key in keys:
            tar.addfile(tarfile.TarInfo(f"{key}.json"))


# ------------------------------------------------------------------------------------------------ issue 19

def _with_columns(run: Path, tmp_path: Path, **columns) -> Path:
    """A copy of the run whose metadata.parquet has these columns replaced or added."""
    copy = Path(shutil.copytree(run, tmp_path / "copy", ignore=shutil.ignore_patterns("quality", "preview")))
    table = pq.read_table(copy / "metadata.parquet")
    for name, values in columns.items():
        array = values if isinstance(values, pa.Array) else pa.array(values)
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), name, array)
        else:
            table = table.append_column(name, array)
    pq.write_table(table, copy / "metadata.parquet")
    return copy


def _strict_json(data: bytes):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return __import__("json").loads(data.decode("utf-8"), parse_constant=refuse)


def test_webdataset_json_is_strict_json_for_inf_and_nan_labels(run, meta, tmp_path):
    # item 13: the README documents inf as a valid float label; json.dumps would write Infinity
    inf = float("inf")
    copy = _with_columns(run, tmp_path, score=[inf, -inf, float("nan"), 1.5, None],
                         series=pa.array([[1.0, inf], [], None, [float("nan")], [2.0]], pa.list_(pa.float64())))
    assert invoke("export", copy, "--to", tmp_path / "shards").exit_code == 0
    rows = {}
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                row = _strict_json(tar.extractfile(member).read())
                rows[row["image_id"]] = row
    ids = meta["image_id"].tolist()
    assert [rows[i]["score"] for i in ids] == ["inf", "-inf", None, 1.5, None]
    assert [rows[i]["series"] for i in ids] == [[1.0, "inf"], [], None, [None], [2.0]]


def test_ids_that_differ_only_in_letter_case_are_refused_before_anything_is_written(run, meta, tmp_path):
    ids = meta["image_id"].tolist()
    copy = _with_columns(run, tmp_path, image_id=["Case_0000", "case_0000", *ids[2:]])
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("export", copy, "--format", "webdataset", "--to", tmp_path / "shards")
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0, result.output
    assert "'Case_0000'" in result.stderr and "'case_0000'" in result.stderr and "letter case" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no shard, no --to, no staging folder
    # the imagefolder format names files by file_name, not by id: it exports them
    assert invoke("export", copy, "--format", "imagefolder", "--to", tmp_path / "folder").exit_code == 0
