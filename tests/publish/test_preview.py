"""`cxrgen preview OUT` (issue 10, item 3): thumbnails, contact sheets and the gallery page's embedded data.

The run is real (tiny random bundle through `cxrgen generate`) and evaluated by the real `cxrgen evaluate` with
the random-weight evaluator of tests/tiny_eval.py; everything is checked through the files preview writes.
The page itself is driven in Chromium by tests/test_gallery_browser.py.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiny_eval as te
from helpers import (
    PROMPTS,
    assert_input_error,
    make_verified_folder,
    preview,
)
from PIL import Image, ImageOps

from cxrgen.publish.preview import (
    MIN_SHEET_WIDTH,
    SHEET_PATTERN,
    build_preview,
    caption_font,
    render_html,
    render_sheet,
    sheet_geometry,
)
from cxrgen.runs.journal import EVAL_DIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")








@pytest.fixture
def run(evaluated_run, tmp_path) -> Path:
    """A private copy of the evaluated run, without any preview yet."""
    return Path(shutil.copytree(evaluated_run, tmp_path / "out"))


def embedded(index: Path) -> dict:
    html = index.read_text(encoding="utf-8")
    block = re.search(r'<script type="application/json" id="cxrgen-data">(.*?)</script>', html, re.S).group(1)
    assert "<" not in block and ">" not in block and "&" not in block  # nothing in it can end the block
    return json.loads(block)


def thumb_of(out: Path, row: dict) -> Path:
    """The documented thumbnail of an image: its path under images/, in preview/thumbs/, as .jpg."""
    return (out / "preview" / "thumbs" / Path(row["file_name"]).relative_to("images")).with_suffix(".jpg")


def sheet_files(out: Path) -> list[Path]:
    return sorted(p for p in (out / "preview").iterdir() if SHEET_PATTERN.match(p.name))


def test_one_sheet_per_prompt_with_captioned_tiles_of_the_thumbnails(run):
    result = preview(run)
    assert result.exit_code == 0, result.output
    meta = pq.read_table(run / "metadata.parquet").to_pylist()
    sheets = sheet_files(run)
    assert len(sheets) == len(PROMPTS) == len({r["prompt"] for r in meta})
    for position, (sheet, prompt) in enumerate(zip(sheets, PROMPTS)):
        # stable, safe names: the group's number and a hash of the prompt, never the prompt's text
        assert sheet.name == f"prompt-{position + 1:05d}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}-1.png"
        rows = [r for r in meta if r["prompt"] == prompt]
        geometry = sheet_geometry(len(rows), 10, 128, f"{prompt} ({len(rows)} images)",
                                  tuple(r["image_id"] for r in rows))
        with Image.open(sheet) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.int16)
            assert image.size == geometry["size"]
        header = pixels[:geometry["header"]]
        assert header.max() - header.min() > 100  # the title is drawn
        for row, (x, y) in zip(rows, geometry["origins"]):
            with Image.open(thumb_of(run, row)) as thumb:
                assert max(thumb.size) == 128
                tile = pixels[y:y + thumb.height, x:x + thumb.width]
                assert np.array_equal(tile, np.asarray(thumb, dtype=np.int16))  # pasted as it is
                with Image.open(run / row["file_name"]) as source:
                    resized = np.asarray(ImageOps.contain(source.convert("L"), (128, 128)), dtype=np.float64)
            assert np.corrcoef(resized.ravel(), tile.ravel())[0, 1] > 0.95
            caption = pixels[y + 128:y + geometry["cell"][1], x:x + 128]
            assert (caption > 150).sum() > 20  # image_id and seed are written under the tile


def test_embedded_data_holds_every_string_exactly_and_the_evaluation(run):
    result = preview(run)
    assert result.exit_code == 0, result.output
    data = embedded(run / "preview" / "index.html")
    meta = pq.read_table(run / "metadata.parquet").to_pylist()
    scores = pq.read_table(run / EVAL_DIR / "scores.parquet").to_pylist()
    assert data["prompts"] == PROMPTS  # `<script>`, quotes, `&` and `</script>` survive as text
    assert data["labels"] == ["Pleural Effusion"]
    assert len(data["images"]) == len(meta) == 7
    seed = data["params"].index("seed")
    for image, row, score in zip(data["images"], meta, scores):
        assert data["prompts"][image["g"]] == row["prompt"]
        # 63-bit seeds travel as text: JavaScript numbers would round them (2**53 and beyond)
        assert image["p"][seed] == (str(row["seed"]) if row["seed"] >= 2**53 else row["seed"])
        assert image["l"] == [row["Pleural Effusion"]]
        assert image["f"] == row["file_name"] and (run / "preview" / image["t"]).is_file()
        assert (image["fl"], image["a"]) == (score["flags"], score["accepted"])
        assert image["e"][data["scores"].index("xrv_Effusion")] == pytest.approx(score["xrv_Effusion"])
    # The only script the page's Content-Security-Policy allows is its own, by hash.
    html = (run / "preview" / "index.html").read_text()
    own = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(own.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in html


def test_a_string_cannot_leave_the_json_block():
    hostile = "</script><script>alert(1)</script><!-- \u2028 & > <"
    html = render_html({"prompts": [hostile]})
    assert html.count("</script>") == 2  # the data block's end and the page script's end, nothing more
    block = re.search(r'id="cxrgen-data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(block) == {"prompts": [hostile]}


def test_thumbnails_and_sheets_are_remade_only_when_stale(run):
    assert preview(run).exit_code == 0
    thumbs = sorted((run / "preview" / "thumbs").rglob("*.jpg"))
    assert len(thumbs) == 7
    before = {p: p.stat().st_mtime_ns for p in [*thumbs, *sheet_files(run)]}
    again = build_preview(run)
    assert (again.thumbs_made, again.thumbs_kept) == (0, 7)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
    # A newer image: its thumbnail and its prompt's sheet are remade, nothing else.
    meta = pq.read_table(run / "metadata.parquet").to_pylist()
    source = run / meta[2]["file_name"]
    later = max(before.values()) + 10**9
    os.utime(source, ns=(later, later))
    result = build_preview(run)
    assert (result.thumbs_made, result.thumbs_kept) == (1, 6)
    changed = {p for p in before if p.stat().st_mtime_ns != before[p]}
    assert changed == {thumb_of(run, meta[2]), sheet_files(run)[1]}
    # Another size remakes every thumbnail at that size.
    assert build_preview(run, thumb_size=64).thumbs_made == 7
    assert {max(Image.open(p).size) for p in thumbs} == {64}


def test_per_sheet_splits_big_prompts_and_drops_sheets_of_old_settings(run):
    assert preview(run).exit_code == 0
    result = preview(run, "--per-sheet", "1", "--columns", "3", "--thumb-size", "48")
    assert result.exit_code == 0, result.output
    names = [p.name for p in sheet_files(run)]
    assert len(names) == 7  # one image per sheet; the three one-per-prompt sheets are gone
    assert [n.rsplit("-", 1)[1] for n in names] == ["1.png", "2.png", "1.png", "2.png", "1.png", "2.png", "3.png"]
    first = pq.read_table(run / "metadata.parquet").to_pylist()[0]
    with Image.open(run / "preview" / names[0]) as image:
        assert image.size == sheet_geometry(1, 3, 48, f"{PROMPTS[0]} (2 images, part 1 of 2)",
                                            (first["image_id"],))["size"]


def test_an_unreadable_image_is_marked_not_fatal(run):
    meta = pq.read_table(run / "metadata.parquet").to_pylist()
    (run / meta[0]["file_name"]).write_bytes(b"not an image")
    result = build_preview(run)
    assert result.unreadable == [meta[0]["image_id"]]
    data = embedded(result.index)
    assert data["images"][0]["t"] is None and all(image["t"] for image in data["images"][1:])
    assert len(sheet_files(run)) == 3


def test_unfinished_runs_and_other_folders_are_refused_in_one_line(run, tmp_path):
    (run / "metadata.parquet").unlink()
    assert_input_error(preview(run), "unfinished", "cxrgen resume", "cxrgen status")
    assert not (run / "preview").exists()
    assert_input_error(preview(tmp_path / "nowhere"), "not a cxrgen output folder")
    assert_input_error(preview(tmp_path, "--thumb-size", "4"), "--thumb-size 4")


def test_a_run_in_a_bucket_is_previewed_from_a_local_copy(tmp_path):
    assert_input_error(preview("s3://bucket/run"), "s3://bucket/run", "aws s3 sync s3://bucket/run ./run",
                       "cxrgen preview ./run")
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()


def test_a_file_name_outside_the_folder_is_refused(tmp_path):
    out = te.make_run(tmp_path / "out", te.images(1, 0))
    table = pq.read_table(out / "metadata.parquet")
    pq.write_table(table.set_column(1, "file_name", [["../../etc/passwd"]]), out / "metadata.parquet")
    assert_input_error(preview(out), "../../etc/passwd", "relative to OUT")


def test_a_remake_at_another_size_that_stops_midway_leaves_no_mixed_thumbnails(run, monkeypatch):
    """A remake at --thumb-size 64 cut short (full disk, Ctrl-C) must not let a later run at 128 keep the 64s."""
    import cxrgen.publish.preview as module
    from cxrgen.errors import RunError

    assert build_preview(run).thumbs_made == 7
    real, made = module._make_thumb, []

    def stops_after_three(source, target, size):
        if len(made) == 3:
            raise RunError(f"no space left on the device while writing {target}")
        made.append(target)
        return real(source, target, size)

    monkeypatch.setattr(module, "_make_thumb", stops_after_three)
    with pytest.raises(RunError):
        build_preview(run, thumb_size=64, workers=1)
    monkeypatch.undo()
    assert len(made) == 3  # three thumbnails are now 64 pixels wide
    result = build_preview(run)
    thumbs = sorted((run / "preview" / "thumbs").rglob("*.jpg"))
    assert {max(Image.open(p).size) for p in thumbs} == {128} and len(thumbs) == 7
    assert all(max(image["w"], image["h"]) == 128 for image in embedded(result.index)["images"])


# Every way a page can turn a string into markup or code. The gallery must use none of them: data reaches the page
# through textContent, attributes through properties (issue 19: a planted `innerHTML` survived where the browser
# test skips).
HTML_SINKS = re.compile(r"\b(innerHTML|outerHTML|insertAdjacentHTML|document\s*\.\s*write(?:ln)?|"
                        r"createContextualFragment|DOMParser|parseFromString|srcdoc|setHTML|setHTMLUnsafe|"
                        r"eval|Function)\b|\.html\s*\(|\bset(?:Timeout|Interval)\s*\(\s*['\"`]")


def _page_script(html: str) -> str:
    """The page's own script, its comments removed (a comment may name what it avoids)."""
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    script = re.sub(r"/\*.*?\*/", "", script, flags=re.S)
    return re.sub(r"(^|\s)//[^\n]*", r"\1", script)


def test_the_gallery_script_never_turns_data_into_html(run):
    """Checked without a browser, on the shipped template and on a written page."""
    from importlib import resources

    template = resources.files("cxrgen").joinpath("data/preview.html").read_text(encoding="utf-8")
    assert preview(run).exit_code == 0
    written = (run / "preview" / "index.html").read_text(encoding="utf-8")
    for page in (template, written):
        script = _page_script(page)
        assert "createElement" in script and "textContent" in script  # what it does instead
        assert HTML_SINKS.search(script) is None, HTML_SINKS.search(script).group(0)
        assert re.findall(r"<script\b", page) == ['<script', '<script']  # the JSON block and the page's script
    # the checker itself catches the ways a planted bug would write it
    for planted in ('title.innerHTML = prompt;', 'section.insertAdjacentHTML("beforeend", prompt)',
                    "document.write(prompt)", "el.outerHTML=x", "setTimeout('go()', 1)"):
        assert HTML_SINKS.search(_page_script(f"<script>{planted}</script>")), planted


def test_the_gallery_carries_verify_figures_and_each_images_verdict(tmp_path):
    out = make_verified_folder(tmp_path / "out")
    data = embedded(build_preview(out).index)
    figures = data["verification"]["findings"]["Pneumothorax"]
    # the figures status and the card show: 2 planned, 1 verified, 0 of 2 first tries and 1 of 4 attempts accepted
    assert (figures["planned"], figures["verified"], figures["attempts"]) == (2, 1, 4)
    assert (figures["acceptance_first"], figures["acceptance"]) == (0.0, 0.25)
    assert data["verification"]["rare"] == [] and data["verification"]["made"] == 5
    column = data["params"].index("verified")
    assert [image["p"][column] for image in data["images"]] == [True, False, None]
    # a plain run has no figures
    plain = make_verified_folder(tmp_path / "plain")
    run = json.loads((plain / "run.json").read_text())
    del run["settings"]["verify"]
    (plain / "run.json").write_text(json.dumps(run))
    assert embedded(build_preview(plain).index)["verification"] is None


def test_a_sheet_of_one_image_keeps_its_whole_prompt_and_id(tmp_path):
    """Wrapped onto more lines instead of cut with an ellipsis: the sheet is what people share."""
    prompt = ("Moderate right pleural effusion with adjacent compressive atelectasis and a small left apical "
              "pneumothorax, no focal consolidation")
    image_id = "patient-000123_study-4567_view-frontal_sample-0000"
    thumb = tmp_path / "t.jpg"
    Image.fromarray(np.full((48, 48), 128, np.uint8)).save(thumb)
    title = f"{prompt} (1 images)"
    geometry = sheet_geometry(1, 10, 48, title, (image_id,))
    assert " ".join(geometry["title_lines"]) == title and "…" not in "".join(geometry["title_lines"])
    assert "".join(geometry["id_lines"][0]) == image_id and len(geometry["id_lines"][0]) > 1
    font = caption_font()
    assert all(font.getlength(line) <= 48 for line in geometry["id_lines"][0])
    sheet = render_sheet(title, [(thumb, image_id, 7)], 48, 10)
    assert sheet.size == geometry["size"] and sheet.size[0] >= MIN_SHEET_WIDTH
    pixels = np.asarray(sheet)
    line, pad = geometry["line"], 6
    for k in range(len(geometry["title_lines"])):  # every title line is drawn
        assert (pixels[pad + k * line:pad + (k + 1) * line] > 150).sum() > 10, k
    x, y = geometry["origins"][0]
    for k in range(len(geometry["id_lines"][0])):  # and every line of the id under the tile
        band = pixels[y + 48 + 1 + k * line:y + 48 + 1 + (k + 1) * line, x:x + 48]
        assert (band > 150).sum() > 5, k


def test_one_image_per_sheet_through_the_command_keeps_every_prompt(run):
    assert preview(run, "--per-sheet", "1", "--thumb-size", "48").exit_code == 0
    meta = pq.read_table(run / "metadata.parquet").to_pylist()
    counts = {p: sum(r["prompt"] == p for r in meta) for p in PROMPTS}
    sheets = sheet_files(run)
    assert len(sheets) == len(meta)
    for sheet, row in zip(sheets, sorted(meta, key=lambda r: PROMPTS.index(r["prompt"]))):
        part = sum(1 for s in sheets[:sheets.index(sheet)] if s.name.split("-")[1] == sheet.name.split("-")[1])
        total = counts[row["prompt"]]
        title = f"{row['prompt']} ({total} images" + (f", part {part + 1} of {total})" if total > 1 else ")")
        geometry = sheet_geometry(1, 10, 48, title, (row["image_id"],))
        assert " ".join(geometry["title_lines"]).replace("?", "") == " ".join(title.split()).replace("?", "")
        with Image.open(sheet) as image:
            assert image.size == geometry["size"]
