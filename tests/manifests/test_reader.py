"""Manifest input: formats, spreadsheet CSV, prompts, pass-through labels, per-row overrides, bad input."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrgen.config import RunConfig
from cxrgen.errors import InputError
from cxrgen.manifests.reader import (
    MAX_GUIDANCE,
    MAX_NUM_IMAGES,
    MAX_SEED,
    Row,
    read_manifest,
)
from cxrgen.runs.generate import generate

# --------------------------------------------------------------------------- helpers


def write_text(path: Path, text: str, *, bom: bool = False, crlf: bool = False) -> Path:
    """Write exactly these characters (no newline translation), optionally as a spreadsheet would."""
    if crlf:
        text = text.replace("\r\n", "\n").replace("\n", "\r\n")
    data = text.encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def bad(path: Path, **kwargs) -> str:
    """The InputError message of reading this manifest (the test fails if it reads fine)."""
    with pytest.raises(InputError) as info:
        read_manifest(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


def tiny_run(tmp_path: Path, manifest: Path, bundle_dir: Path, text_encoder_dir: Path, **overrides) -> Path:
    """A real generate() call with the tiny networks and one step; returns the output folder."""
    out = tmp_path / "out"
    config = RunConfig(manifest=str(manifest), out=str(out), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), cache_dir=str(tmp_path / "cache"), steps=1,
                       quiet=True, **overrides)
    generate(config, log=lambda message: None)
    return out


# --------------------------------------------------------------------------- formats

TABLE = {"prompt": ["Small left pleural effusion", "No acute cardiopulmonary process"],
         "finding": ["effusion", "normal"]}


def _write_format(path: Path, fmt: str) -> Path:
    if fmt == "parquet":
        return write_parquet(path, TABLE)
    sep = "\t" if fmt == "tsv" else ","
    lines = [sep.join(TABLE)] + [sep.join(values) for values in zip(*TABLE.values())]
    return write_text(path, "\n".join(lines) + "\n")


@pytest.mark.parametrize("suffix, fmt", [(".csv", "csv"), (".CSV", "csv"), (".tsv", "tsv"), (".tab", "tsv"),
                                         (".parquet", "parquet"), (".pq", "parquet")])
def test_format_chosen_by_suffix(tmp_path, suffix, fmt):
    manifest = read_manifest(_write_format(tmp_path / f"m{suffix}", fmt))
    assert [r.prompt for r in manifest.rows] == TABLE["prompt"]
    assert [r.number for r in manifest.rows] == [1, 2]
    assert manifest.labels.column_names == ["finding"]
    assert manifest.labels.column("finding").to_pylist() == TABLE["finding"]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_manifest_format_overrides_suffix(tmp_path, fmt):
    # a file whose suffix says nothing (or the wrong thing) is read as --manifest-format says
    for name in ("manifest.txt", "manifest", f"manifest.{'csv' if fmt != 'csv' else 'tsv'}"):
        path = _write_format(tmp_path / name, fmt)
        manifest = read_manifest(path, manifest_format=fmt)
        assert [r.prompt for r in manifest.rows] == TABLE["prompt"], name


def test_tsv_contents_in_csv_file_read_as_tsv_only_when_asked(tmp_path):
    path = _write_format(tmp_path / "m.csv", "tsv")
    # as CSV the whole header is one column named "prompt\tfinding": no prompt column
    message = bad(path)
    assert "no column 'prompt'" in message and "--prompt-column" in message
    assert [r.prompt for r in read_manifest(path, manifest_format="tsv").rows] == TABLE["prompt"]


def test_sha256_and_absolute_path(tmp_path):
    path = _write_format(tmp_path / "m.csv", "csv")
    manifest = read_manifest(path)
    assert manifest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert Path(manifest.path).is_absolute() and Path(manifest.path) == path.resolve()


# --------------------------------------------------------------------------- spreadsheet CSV


SPREADSHEET = (
    'id,prompt,view\n'
    'a1,"Cardiomegaly, with small bilateral effusions",PA\n'
    'a2,"Tube tip ""approximately"" 3 cm above the carina",AP\n'
    'a3,"Line one of the report.\nLine two, after a newline.",PA\n'
    'a4,Plain sentence,LAT\n'
)
EXPECTED_PROMPTS = [
    "Cardiomegaly, with small bilateral effusions",
    'Tube tip "approximately" 3 cm above the carina',
    "Line one of the report.\nLine two, after a newline.",
    "Plain sentence",
]


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("crlf", [False, True])
def test_spreadsheet_csv(tmp_path, bom, crlf):
    path = write_text(tmp_path / "excel.csv", SPREADSHEET, bom=bom, crlf=crlf)
    manifest = read_manifest(path)
    prompts = [r.prompt for r in manifest.rows]
    if crlf:  # a newline inside quotes is kept as the spreadsheet wrote it
        prompts = [p.replace("\r\n", "\n") for p in prompts]
    assert prompts == EXPECTED_PROMPTS
    assert [r.row_id for r in manifest.rows] == ["a1", "a2", "a3", "a4"]  # not "\ufeffid"
    assert [r.number for r in manifest.rows] == [1, 2, 3, 4]  # data rows, not file lines
    assert manifest.labels.column_names == ["view"]  # the BOM is not part of any column name
    assert manifest.labels.column("view").to_pylist() == ["PA", "AP", "PA", "LAT"]
    assert not any("\r" in v for v in manifest.labels.column("view").to_pylist())


def test_error_row_number_counts_data_rows_not_lines(tmp_path):
    # row 1 spans three physical lines; the bad value is on data row 2 (file line 5)
    text = 'prompt,num_images\n"one\ntwo\nthree",1\nsecond,lots\n'
    message = bad(write_text(tmp_path / "m.csv", text, bom=True, crlf=True))
    assert "row 2, column num_images" in message and "'lots'" in message


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_na_like_prompts_stay_text(tmp_path, fmt):
    words = ["NA", "N/A", "None", "null", "NULL", "NaN", "nan", "#N/A", "n/a", "-nan", "<NA>", "0", "False"]
    sep = "\t" if fmt == "tsv" else ","
    text = f"prompt{sep}label\n" + "".join(f"{w}{sep}{w}\n" for w in words)
    manifest = read_manifest(write_text(tmp_path / f"m.{fmt}", text))
    assert [r.prompt for r in manifest.rows] == words
    # the same words in a label column are not turned into nulls either: only an empty cell is null
    assert manifest.labels.column("label").to_pylist() == words


def test_prompt_column_option(tmp_path):
    text = "report_sentence,prompt,label\nPneumothorax on the right,ignored text,1\nNormal chest,other,0\n"
    path = write_text(tmp_path / "m.csv", text)
    manifest = read_manifest(path, prompt_column="report_sentence")
    assert [r.prompt for r in manifest.rows] == ["Pneumothorax on the right", "Normal chest"]
    # the column named "prompt" is then just a label and passes through
    assert manifest.labels.column_names == ["prompt", "label"]
    message = bad(path, prompt_column="sentence")
    assert "'sentence'" in message and "report_sentence" in message and "--prompt-column" in message


def test_prompt_column_option_parquet_non_string_values(tmp_path):
    path = write_parquet(tmp_path / "m.parquet", {"text": pa.array([12, 7]), "y": [1, 2]})
    assert [r.prompt for r in read_manifest(path, prompt_column="text").rows] == ["12", "7"]


# --------------------------------------------------------------------------- pass-through labels

LABEL_CSV = (
    "prompt,label_int,label_float,label_bool,label_str,mixed\n"
    "Effusion,1,0.25,True,left,7\n"
    "Normal,,,,,x\n"
    "Edema,-3,1e3,False,NA,\n"
)


def test_labels_keep_types_csv(tmp_path):
    labels = read_manifest(write_text(tmp_path / "m.csv", LABEL_CSV)).labels
    types = {f.name: f.type for f in labels.schema}
    assert pa.types.is_integer(types["label_int"])
    assert pa.types.is_floating(types["label_float"])
    assert pa.types.is_boolean(types["label_bool"])
    assert pa.types.is_string(types["label_str"]) or pa.types.is_large_string(types["label_str"])
    assert labels.column("label_int").to_pylist() == [1, None, -3]
    assert labels.column("label_float").to_pylist() == [0.25, None, 1000.0]
    assert labels.column("label_bool").to_pylist() == [True, None, False]
    assert labels.column("label_str").to_pylist() == ["left", None, "NA"]
    assert labels.column("mixed").to_pylist() == ["7", "x", None]


def test_label_values_beyond_int64_stay_exact_text(tmp_path):
    huge = "9" * 30
    labels = read_manifest(write_text(tmp_path / "m.csv", f"prompt,big,nums\na,{huge},1_000\nb,1,2\n")).labels
    assert labels.column("big").to_pylist() == [huge, "1"]
    assert labels.column("nums").to_pylist() == ["1_000", "2"]  # not Python's int("1_000")


def test_labels_keep_types_parquet(tmp_path):
    columns = {
        "prompt": ["a", "b", "c"],
        "i64": pa.array([1, None, 2**40], pa.int64()),
        "i8": pa.array([1, 2, None], pa.int8()),
        "f32": pa.array([0.5, None, -1.5], pa.float32()),
        "flag": pa.array([None, True, False], pa.bool_()),
        "text": pa.array(["x", None, "None"], pa.string()),
        "day": pa.array([0, 1, None], pa.int32()).cast(pa.date32()),
    }
    labels = read_manifest(write_parquet(tmp_path / "m.parquet", columns)).labels
    assert labels.column_names == ["i64", "i8", "f32", "flag", "text", "day"]
    for name in labels.column_names:
        assert labels.schema.field(name).type == columns[name].type, name
        assert labels.column(name).to_pylist() == columns[name].to_pylist(), name


def test_parquet_written_by_pandas_with_filtered_index(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a", "b", "c", "d"], "y": [1, 2, 3, 4]})
    frame[frame.y % 2 == 0].to_parquet(tmp_path / "m.parquet")  # non-range index -> __index_level_0__
    manifest = read_manifest(tmp_path / "m.parquet")
    assert [r.prompt for r in manifest.rows] == ["b", "d"]
    assert manifest.labels.column_names == ["y"]


def test_labels_reach_metadata_with_their_types(tmp_path, bundle_dir, text_encoder_dir):
    manifest = write_text(tmp_path / "m.csv", LABEL_CSV.replace("prompt,", "prompt,seed,").replace(
        "Effusion,", "Effusion,5,").replace("Normal,", "Normal,,").replace("Edema,", "Edema,9,"))
    out = tiny_run(tmp_path, manifest, bundle_dir, text_encoder_dir)
    table = pq.read_table(out / "metadata.parquet")
    assert table.num_rows == 3
    # the pass-through columns follow cxrgen's own columns, in manifest order
    assert table.column_names[-5:] == ["label_int", "label_float", "label_bool", "label_str", "mixed"]
    assert pa.types.is_integer(table.schema.field("label_int").type)
    assert pa.types.is_floating(table.schema.field("label_float").type)
    assert pa.types.is_boolean(table.schema.field("label_bool").type)
    assert table.column("label_int").to_pylist() == [1, None, -3]
    assert table.column("label_float").to_pylist() == [0.25, None, 1000.0]
    assert table.column("label_bool").to_pylist() == [True, None, False]
    assert table.column("label_str").to_pylist() == ["left", None, "NA"]
    assert table.column("mixed").to_pylist() == ["7", "x", None]
    # override columns are consumed, not passed through: the seed column became the images' seeds
    assert table.column("seed").to_pylist()[0] == 5 and table.column("seed").to_pylist()[2] == 9
    assert "label_seed" not in table.column_names


def test_parquet_labels_reach_metadata_per_image(tmp_path, bundle_dir, text_encoder_dir):
    columns = {
        "prompt": ["Effusion", "Normal", "Edema"],
        "num_images": pa.array([2, 0, 1], pa.int64()),
        "chexpert_effusion": pa.array([1, None, 0], pa.int64()),
        "prob": pa.array([0.9, 0.1, None], pa.float64()),
        "flag": pa.array([True, None, False]),
        "study": pa.array(["s1", "s2", None]),
    }
    out = tiny_run(tmp_path, write_parquet(tmp_path / "m.parquet", columns), bundle_dir, text_encoder_dir)
    table = pq.read_table(out / "metadata.parquet")
    assert table.column("manifest_row").to_pylist() == [1, 1, 3]  # row 2 asked for no images
    for name in ("chexpert_effusion", "prob", "flag", "study"):
        assert table.schema.field(name).type == columns[name].type, name
        source = columns[name].to_pylist()
        assert table.column(name).to_pylist() == [source[0], source[0], source[2]], name


def test_label_named_like_a_metadata_column_is_kept_under_a_prefix(tmp_path, bundle_dir, text_encoder_dir):
    text = "sentence,prompt,width\nSmall effusion,original label,17\n"
    out = tiny_run(tmp_path, write_text(tmp_path / "m.csv", text), bundle_dir, text_encoder_dir,
                   prompt_column="sentence")
    table = pq.read_table(out / "metadata.parquet").to_pylist()[0]
    assert table["prompt"] == "Small effusion"
    assert table["label_prompt"] == "original label" and table["label_width"] == 17
    assert table["width"] == 32  # cxrgen's own column is untouched


# --------------------------------------------------------------------------- per-row overrides

OVERRIDES = (
    "id,prompt,num_images,guidance_scale,seed,negative_prompt\n"
    "r1,Effusion,3,2.5,100,blurry\n"
    "r2,Normal,,,,\n"
    "r3,Edema,0,0,0,\n"
    "r4,Atelectasis, 2 ,1e1,42,\n"
)


def test_overrides_parsed_and_blanks_mean_default(tmp_path):
    rows = read_manifest(write_text(tmp_path / "m.csv", OVERRIDES)).rows
    assert rows[0] == Row(1, "Effusion", "r1", 3, 2.5, 100, "blurry")
    assert rows[1] == Row(2, "Normal", "r2", None, None, None, None)
    assert rows[2] == Row(3, "Edema", "r3", 0, 0.0, 0, None)
    assert rows[3] == Row(4, "Atelectasis", "r4", 2, 10.0, 42, None)
    assert isinstance(rows[0].num_images, int) and isinstance(rows[0].seed, int)
    assert isinstance(rows[0].guidance_scale, float)


def test_overrides_from_parquet_keep_exact_integers(tmp_path):
    big = MAX_SEED - MAX_NUM_IMAGES  # above 2**53: would be rounded by a trip through float
    columns = {
        "prompt": ["a", "b", "c"],
        "id": pa.array([10, 11, 12], pa.int64()),
        "seed": pa.array([big, None, 2**53 + 1], pa.int64()),
        "num_images": pa.array([1, None, 2], pa.int64()),
        "guidance_scale": pa.array([None, 3.0, 4.5], pa.float64()),
    }
    rows = read_manifest(write_parquet(tmp_path / "m.parquet", columns)).rows
    assert [r.seed for r in rows] == [big, None, 2**53 + 1]
    assert [r.row_id for r in rows] == ["10", "11", "12"]
    assert [r.num_images for r in rows] == [1, None, 2]
    assert [r.guidance_scale for r in rows] == [None, 3.0, 4.5]


def test_overrides_reach_images_and_metadata(tmp_path, bundle_dir, text_encoder_dir):
    out = tiny_run(tmp_path, write_text(tmp_path / "m.csv", OVERRIDES), bundle_dir, text_encoder_dir,
                   num_images=1, guidance_scale=7.0, negative_prompt="run negative")
    rows = pq.read_table(out / "metadata.parquet").to_pylist()
    got = [(r["row_id"], r["sample_index"], r["guidance_scale"], r["negative_prompt"]) for r in rows]
    assert got == [("r1", 0, 2.5, "blurry"), ("r1", 1, 2.5, "blurry"), ("r1", 2, 2.5, "blurry"),
                   ("r2", 0, 7.0, "run negative"),
                   ("r4", 0, 10.0, "run negative"), ("r4", 1, 10.0, "run negative")]
    seeds = {(r["row_id"], r["sample_index"]): r["seed"] for r in rows}
    assert seeds[("r1", 0)] == 100 and seeds[("r1", 2)] == 102
    assert seeds[("r4", 1)] == 43
    expected = int.from_bytes(hashlib.sha256(b"cxrgen-seed:0:id=r2:0").digest()[:8], "big") >> 1
    assert seeds[("r2", 0)] == expected
    assert all((out / r["file_name"]).is_file() for r in rows)
    assert len(list((out / "images").rglob("*.jpg"))) == 6


def test_blank_prompt_allowed_is_unconditional_sample(tmp_path, bundle_dir, text_encoder_dir):
    text = "prompt,label\n,1\n   ,2\nEffusion,3\n"
    path = write_text(tmp_path / "m.csv", text)
    rows = read_manifest(path, allow_empty_prompt=True).rows
    assert [r.prompt for r in rows] == ["", "", "Effusion"]
    out = tiny_run(tmp_path, path, bundle_dir, text_encoder_dir, allow_empty_prompt=True)
    meta = pq.read_table(out / "metadata.parquet").to_pylist()
    assert [m["prompt"] for m in meta] == ["", "", "Effusion"]
    assert meta[0]["token_count"] == 2  # start + end token only, like the unconditional prompt ""
    assert [m["label"] for m in meta] == [1, 2, 3]


# --------------------------------------------------------------------------- bad input: the file


def test_missing_file(tmp_path):
    message = bad(tmp_path / "nope.csv")
    assert "nope.csv" in message and "does not exist" in message


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "folder.csv").mkdir()
    message = bad(tmp_path / "folder.csv")
    assert "folder.csv" in message and "not a file" in message


@pytest.mark.parametrize("name", ["m.xlsx", "m.json", "manifest"])
def test_unknown_suffix(tmp_path, name):
    path = write_text(tmp_path / name, "prompt\nx\n")
    message = bad(path)
    assert name in message and "--manifest-format" in message and "unknown format" in message


@pytest.mark.parametrize("name, data, fmt", [
    ("garbage.parquet", b"prompt\nnot parquet at all\n", "auto"),
    ("binary.csv", bytes(range(256)) * 4, "auto"),
    ("latin1.csv", "prompt\nopacit\xe9\n".encode("latin-1"), "auto"),
    ("ragged.csv", b"prompt,label\na,1\nb,2,3,4\n", "auto"),
    ("empty.csv", b"", "auto"),
    ("text.csv", b"prompt\nhello\n", "parquet"),
])
def test_unparseable_file(tmp_path, name, data, fmt):
    path = tmp_path / name
    path.write_bytes(data)
    message = bad(path, manifest_format=fmt)
    assert name in message and "cannot be read as" in message


def test_no_prompt_column(tmp_path):
    message = bad(write_text(tmp_path / "m.csv", "text,label\nEffusion,1\n"))
    assert "column 'prompt'" in message and "text, label" in message and "--prompt-column" in message


def test_no_prompt_column_parquet(tmp_path):
    message = bad(write_parquet(tmp_path / "m.parquet", {"sentence": ["a"]}))
    assert "column 'prompt'" in message and "sentence" in message


# --------------------------------------------------------------------------- bad input: cells


@pytest.mark.parametrize("text, row", [
    ("prompt,label\nEffusion,1\n,2\n", 2),          # empty cell
    ("prompt,label\n   ,1\n", 1),                   # whitespace only
    ('prompt,label\na,1\nb,2\n"",3\n', 3),          # quoted empty string
    ("label,prompt\n1,a\n2\n", 2),                  # short row: the prompt field is missing
])
def test_blank_prompt_names_row_and_column(tmp_path, text, row):
    message = bad(write_text(tmp_path / "m.csv", text))
    assert f"row {row}, column prompt" in message and "--allow-empty-prompt" in message


@pytest.mark.parametrize("crlf", [False, True])
def test_empty_line_is_a_blank_row_not_skipped(tmp_path, crlf):
    # a one-column spreadsheet writes an empty cell as an empty line; it must not vanish silently
    path = write_text(tmp_path / "m.csv", "prompt\nfirst\n\nthird\n", crlf=crlf)
    assert "row 2, column prompt" in bad(path)
    rows = read_manifest(path, allow_empty_prompt=True).rows
    assert [(r.number, r.prompt) for r in rows] == [(1, "first"), (2, ""), (3, "third")]


def test_empty_lines_at_the_end_are_not_rows(tmp_path):
    rows = read_manifest(write_text(tmp_path / "m.csv", "prompt,label\na,1\nb,2\n\n,\n\n", crlf=True)).rows
    assert [(r.number, r.prompt) for r in rows] == [(1, "a"), (2, "b")]
    table = read_manifest(tmp_path / "m.csv").labels
    assert table.column("label").to_pylist() == [1, 2]


def test_blank_prompt_in_custom_column_and_parquet(tmp_path):
    message = bad(write_text(tmp_path / "m.csv", "sentence\nok\n\t\nlast\n"), prompt_column="sentence")
    assert "row 2, column sentence" in message
    message = bad(write_parquet(tmp_path / "m.parquet", {"prompt": ["a", "b", None]}))
    assert "row 3, column prompt" in message
    rows = read_manifest(tmp_path / "m.parquet", allow_empty_prompt=True).rows
    assert rows[2].prompt == ""


@pytest.mark.parametrize("column, value, words", [
    ("num_images", "two", "not a number"),
    ("num_images", "-1", "negative"),
    ("num_images", "2.5", "not a whole number"),
    ("num_images", "inf", "not finite"),
    ("num_images", "nan", "not finite"),
    ("num_images", str(MAX_NUM_IMAGES + 1), "too large"),
    ("num_images", "1e12", "too large"),
    ("guidance_scale", "high", "not a number"),
    ("guidance_scale", "-0.5", "negative"),
    ("guidance_scale", "inf", "not finite"),
    ("guidance_scale", "-inf", "not finite"),
    ("guidance_scale", "NaN", "not finite"),
    ("guidance_scale", str(MAX_GUIDANCE + 1), "too large"),
    ("guidance_scale", "1e308", "too large"),
    ("seed", "abc", "not a number"),
    ("seed", "-5", "negative"),
    ("seed", "1.5", "not a whole number"),
    ("seed", "Infinity", "not finite"),
    ("seed", str(2**63), "too large"),
    ("seed", "9" * 40, "too large"),
])
def test_bad_override_names_row_and_column(tmp_path, column, value, words):
    text = f"prompt,{column}\nfine,\nfine too,\nbad row,{value}\n"
    message = bad(write_text(tmp_path / "m.csv", text))
    assert f"row 3, column {column}" in message, message
    assert words in message, message
    assert repr(value) in message, message


@pytest.mark.parametrize("column, array, words", [
    ("num_images", pa.array([1, -2]), "negative"),
    ("num_images", pa.array([1.0, 2.5]), "not a whole number"),
    ("num_images", pa.array([None, True]), "not a number"),
    ("guidance_scale", pa.array([1.0, math.inf]), "not finite"),
    ("guidance_scale", pa.array([1.0, 1e6]), "too large"),
    ("seed", pa.array([1, 2**63 - 1], pa.int64()), "too large"),
    ("seed", pa.array(["1", "x"]), "not a number"),
])
def test_bad_override_in_parquet(tmp_path, column, array, words):
    path = write_parquet(tmp_path / "m.parquet", {"prompt": ["a", "b"], column: array})
    message = bad(path)
    assert f"row 2, column {column}" in message and words in message, message


def test_largest_allowed_overrides(tmp_path):
    text = f"prompt,num_images,guidance_scale,seed\na,{MAX_NUM_IMAGES},{MAX_GUIDANCE},{MAX_SEED - MAX_NUM_IMAGES}\n"
    row = read_manifest(write_text(tmp_path / "m.csv", text)).rows[0]
    assert (row.num_images, row.guidance_scale, row.seed) == (MAX_NUM_IMAGES, MAX_GUIDANCE, MAX_SEED - MAX_NUM_IMAGES)
    # the last image of that row still has a seed that fits int64
    assert row.seed + row.num_images - 1 <= MAX_SEED


def test_duplicate_ids_name_both_rows(tmp_path):
    text = "id,prompt\nA1,x\nB2,y\nC3,z\nB2,w\n"
    message = bad(write_text(tmp_path / "m.csv", text))
    assert "rows 2 and 4, column id" in message and "'B2'" in message


def test_duplicate_ids_parquet_int_and_float_spelling(tmp_path):
    path = write_parquet(tmp_path / "m.parquet", {"id": pa.array([7.0, 8.0, 7.0]), "prompt": ["a", "b", "c"]})
    message = bad(path)
    assert "rows 1 and 3, column id" in message and "'7'" in message


@pytest.mark.parametrize("cell", ["", "  ", '""'])
def test_blank_id(tmp_path, cell):
    message = bad(write_text(tmp_path / "m.csv", f"id,prompt\nok,x\n{cell},y\n"))
    assert "row 2, column id" in message and "blank" in message


def test_ids_are_text_not_numbers(tmp_path):
    # "007" and "7" are different ids in a CSV; leading zeros survive
    rows = read_manifest(write_text(tmp_path / "m.csv", "id,prompt\n007,a\n7,b\n7.0,c\n")).rows
    assert [r.row_id for r in rows] == ["007", "7", "7.0"]
