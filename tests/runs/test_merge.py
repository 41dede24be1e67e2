"""The streaming merge (issue 21): metadata.parquet written row group by row group from records read in pieces,
the same table and card as a merge in one go, on a local folder and in a bucket; finalize_run never holds the plan.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import bucket_objects, upload_run
from typer.testing import CliRunner

import cxrgen.runs.generate
import cxrgen.runs.merge
import cxrgen.storage.local
from cxrgen.cli import app
from cxrgen.runs.card import Facts, card_text
from cxrgen.runs.generate import finalize_run
from cxrgen.runs.journal import RECORDS_DIR

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
MANIFEST = "id,prompt,Edema,view\na,big heart,1,PA\nb,small lung,0,\nc,clear chest,,AP\nd,big heart,1,PA\n"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, bundle_dir, text_encoder_dir) -> Path:
    """A finished run of 4 rows x 3 images, merged in one row group (the default size)."""
    root = tmp_path_factory.mktemp("merge")
    (root / "m.csv").write_text(MANIFEST)
    result = runner.invoke(app, ["generate", str(root / "m.csv"), "-o", str(root / "out"), "--model", str(bundle_dir),
                                 "--text-encoder", str(text_encoder_dir), "--steps", "1", "--num-images", "3",
                                 "--batch-size", "2", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    return root / "out"


def unmerged(finished: Path, tmp_path: Path) -> Path:
    out = Path(shutil.copytree(finished, tmp_path / "out"))
    (out / "metadata.parquet").unlink()
    (out / "README.md").unlink()
    return out


def test_row_groups_and_pieces_give_the_one_go_table_and_card(finished, tmp_path, monkeypatch):
    out = unmerged(finished, tmp_path)
    # a remade image: its latest record describes its file and wins, in whatever piece or group it lands; an
    # older duplicate in another writer's journal (an earlier created_at, listed later) loses
    part = out / RECORDS_DIR / "part-main.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    remade = dict(json.loads(lines[4]), worker="remade", created_at="2999-01-01T00:00:00+00:00")
    stale = dict(json.loads(lines[7]), worker="stale", created_at="1999-01-01T00:00:00+00:00")
    part.write_text("".join(lines) + json.dumps(remade) + "\n" + '{"image_id": "torn", "manif')
    (out / RECORDS_DIR / "part-old.jsonl").write_text(json.dumps(stale) + "\n")
    monkeypatch.setattr(cxrgen.runs.merge, "ROW_GROUP", 5)  # 12 images: groups of 5, 5 and 2
    real = cxrgen.storage.local._LocalPart.chunks
    monkeypatch.setattr(cxrgen.storage.local._LocalPart, "chunks", lambda self: real(self, 700))  # ~1 record a piece
    monkeypatch.setattr(cxrgen.runs.generate, "load_plan", lambda *a: pytest.fail("the plan was held"))
    assert finalize_run(out) == out / "metadata.parquet"
    streamed, expected = pq.ParquetFile(out / "metadata.parquet"), pq.read_table(finished / "metadata.parquet")
    rows = expected.to_pylist()
    at = next(i for i, r in enumerate(rows) if r["image_id"] == remade["image_id"])
    rows[at].update(worker="remade", created_at=remade["created_at"])
    expected = pa.Table.from_pylist(rows, schema=expected.schema)
    assert [streamed.metadata.row_group(i).num_rows for i in range(streamed.num_row_groups)] == [5, 5, 2]
    assert streamed.read().equals(expected)
    assert (out / "README.md").read_text() == (finished / "README.md").read_text()
    assert card_text(expected, json.loads((out / "run.json").read_text())) == (out / "README.md").read_text()
    assert len((out / ".cxrgen" / "merges.log").read_text().splitlines()) == 2  # the original run's, and this one
    assert not list((out / ".cxrgen").glob(".merge-*")) and not list(out.glob(".metadata.parquet*"))


def test_a_missing_record_or_file_means_no_merge_and_nothing_written(finished, tmp_path):
    out = unmerged(finished, tmp_path)
    table = pq.read_table(finished / "metadata.parquet")
    (out / table.column("file_name")[7].as_py()).unlink()
    assert finalize_run(out) is None
    assert not (out / "metadata.parquet").exists() and not (out / "README.md").exists()
    assert not list((out / ".cxrgen").glob(".merge-*")) and not list(out.glob(".metadata.parquet*"))
    part = out / RECORDS_DIR / "part-main.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(line for line in lines if json.loads(line)["image_id"] != table.column("image_id")[3].as_py()))
    shutil.copy(finished / table.column("file_name")[7].as_py(), out / table.column("file_name")[7].as_py())
    assert finalize_run(out) is None and not (out / "metadata.parquet").exists()


def test_facts_gathered_by_row_group_equal_the_whole_tables(finished):
    table = pq.read_table(finished / "metadata.parquet")
    table = table.set_column(table.schema.get_field_index("Edema"), "Edema",
                             pa.array([1.0, None, float("nan")] * 4, pa.float64()))
    whole, pieces = Facts.of(table), Facts(table.column_names)
    for start in range(0, table.num_rows, 5):
        pieces.add(table.slice(start, 5))
    run = json.loads((finished / "run.json").read_text())
    assert card_text(whole, run) == card_text(pieces, run)
    assert (whole.rows, whole.prompts, whole.manifest_rows) == (12, 3, 4)
    assert sorted(v[1] for v in whole.labels["Edema"].values()) == [4, 4, 4]  # NaN is one value, as Arrow counts it


def test_a_bucket_run_merges_in_row_groups_too(finished, tmp_path, s3, monkeypatch):
    out = unmerged(finished, tmp_path)
    monkeypatch.setattr(cxrgen.runs.merge, "ROW_GROUP", 4)
    run_json = json.loads((out / "run.json").read_text())
    url = upload_run(out, s3)
    # the bucket's run holds the folder's journal part under the records prefix: read as one record object
    assert finalize_run(url) == f"{url}/metadata.parquet"
    found = bucket_objects(s3, url)
    merged = pq.ParquetFile(pa.BufferReader(found["metadata.parquet"]))
    assert merged.num_row_groups == 3 and merged.read().equals(pq.read_table(finished / "metadata.parquet"))
    assert found["README.md"].decode() == card_text(merged.read(), run_json)
