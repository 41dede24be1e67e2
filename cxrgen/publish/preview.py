"""`cxrgen preview OUT`: thumbnails, one contact sheet per prompt and a static HTML gallery in OUT/preview/.

Everything here is derived from metadata.parquet, the images and (when present) `cxrgen evaluate`'s scores.parquet;
nothing else in OUT is touched. The gallery opens from the file system: its data is embedded in the page.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import math
import os
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin, features

from cxrgen.config import is_url
from cxrgen.errors import InputError, RunError
from cxrgen.files import (
    atomic_write,
    inside,
    io_error,
    local_path,
    resume_command,
    write_json,
)
from cxrgen.runs.journal import EVAL_DIR, METADATA_SCHEMA
from cxrgen.runs.state import read_run_json
from cxrgen.runs.verify_stats import verification_stats

PREVIEW_DIR = "preview"
THUMBS_DIR = "thumbs"
SHEET_PATTERN = re.compile(r"^prompt-\d{5,}-[0-9a-f]{8}-\d+\.png$")  # 100,000+ prompts: 6+ digits
THUMB_QUALITY = 85
PAD = 6  # pixels around tiles and captions on a contact sheet
MIN_SHEET_WIDTH = 400  # pixels: a sheet of one or two tiles still has room for its prompt
TITLE_LINES = 8  # a sheet's prompt wraps onto this many lines at most (77 tokens fit on fewer)
_STAMP = "settings.json"  # thumbnail size and quality: a change makes every thumbnail stale
_JS_SAFE_INT = 2**53 - 1  # Number.MAX_SAFE_INTEGER: larger integers lose digits in JSON.parse
_SHEET_VERSION = "sheet-v2"  # part of every sheet's key: change it when the drawing changes
_SHEET_KEY = "cxrgen-sheet-key"  # PNG text chunk: a sheet whose inputs did not change is not redrawn
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


@dataclass
class Sheet:
    """One contact-sheet PNG: a prompt's images (or a slice of them) in a grid."""

    file: str  # relative to OUT/preview
    group: int
    rows: list[int]  # metadata row positions, in plan order


@dataclass
class PreviewResult:
    """What `build_preview` wrote."""

    index: Path
    images: int
    prompts: int
    sheets: list[Sheet]
    thumbs_made: int
    thumbs_kept: int
    unreadable: list[str] = field(default_factory=list)  # image ids with no thumbnail
    evaluated: bool = False


def build_preview(out: Path | str, *, thumb_size: int = 128, per_sheet: int = 100, columns: int = 10,
                  workers: int = 0) -> PreviewResult:
    """Write OUT/preview/: thumbnails, one contact sheet per prompt (split past per_sheet) and index.html."""
    if is_url(str(out)):
        # the gallery is a folder of files opened from the file system: it is built beside a local copy
        raise InputError(f"cxrgen preview works on a local folder, and {out} is a URL; copy the run first (e.g. "
                         f"`aws s3 sync {out} ./run`), then run `cxrgen preview ./run`")
    out = local_path(out, "OUT")
    _check_options(thumb_size, per_sheet, columns)
    # 1. the run's table (finished runs only) and, when `cxrgen evaluate` has run, its verdicts
    table = _read_metadata(out)
    rows = table.to_pylist()
    scores = _read_scores(out)
    folder = out / PREVIEW_DIR
    # 2. thumbnails: made only when missing or older than their image, in parallel (Pillow releases the GIL)
    thumbs = [_thumb_name(out, row["file_name"]) for row in rows]
    stale = _stale_thumbs(out, rows, thumbs, thumb_size)
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        made = dict(zip(stale, pool.map(lambda i: _make_thumb(out / rows[i]["file_name"], folder / thumbs[i],
                                                              thumb_size), stale)))
    sizes = [made[i] if i in made else _thumb_dims(folder / thumbs[i]) for i in range(len(rows))]
    write_json(folder / THUMBS_DIR / _STAMP, {"thumb_size": thumb_size, "quality": THUMB_QUALITY})
    # 3. contact sheets: rows grouped by exact prompt text, in plan order
    groups: dict[str, list[int]] = {}
    for position, row in enumerate(rows):
        groups.setdefault(row["prompt"] or "", []).append(position)
    group_of = {position: g for g, positions in enumerate(groups.values()) for position in positions}
    sheets = _write_sheets(folder, rows, thumbs, sizes, list(groups.items()), thumb_size, per_sheet, columns)
    # 4. the gallery page, with every string embedded as JSON (never as HTML)
    labels = [name for name in table.column_names if name not in METADATA_SCHEMA.names]
    data = _gallery_data(out, rows, labels, scores, thumbs, sizes, group_of, list(groups), sheets, thumb_size)
    data["verification"] = _verification(out)
    data["demo"] = (_run_json(out).get("resolved") or {}).get("demo") is True  # the page says: noise
    index = folder / "index.html"
    atomic_write(index, render_html(data).encode("utf-8"))
    return PreviewResult(index=index, images=len(rows), prompts=len(groups), sheets=sheets,
                         thumbs_made=sum(1 for size in made.values() if size), thumbs_kept=len(rows) - len(made),
                         unreadable=[rows[i]["image_id"] for i, size in enumerate(sizes) if size is None],
                         evaluated=scores is not None)


def _verification(out: Path) -> dict | None:
    """--verify's per-finding figures, as `cxrgen status` and the card show them; None for a plain run (or a folder
    whose run.json is not cxrgen's: the gallery needs only metadata.parquet)."""
    try:
        run = read_run_json(out)
    except InputError:
        return None
    return verification_stats(out, run) if run is not None else None


def _check_options(thumb_size: int, per_sheet: int, columns: int) -> None:
    for name, value, low, high in (("--thumb-size", thumb_size, 16, 1024), ("--per-sheet", per_sheet, 1, 10000),
                                   ("--columns", columns, 1, 100)):
        if not low <= value <= high:
            raise InputError(f"{name} {value} is out of range; give a value from {low} to {high}")


def _read_metadata(out: Path):
    path = out / "metadata.parquet"
    if not path.is_file():
        if (out / "run.json").is_file():
            raise InputError(f"{out} has no metadata.parquet yet: the run is unfinished; finish it with "
                             f"`{resume_command(out)}` (see `cxrgen status {shlex.quote(str(out))}`), then run "
                             "`cxrgen preview` again")
        raise InputError(f"{out} is not a cxrgen output folder (no metadata.parquet); give the --out folder "
                         "of `cxrgen generate`")
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}; remake it with `cxrgen status {out} --finalize`") from None
    missing = [c for c in ("image_id", "file_name", "prompt") if c not in table.column_names]
    if missing:
        raise InputError(f"{path} lacks the column(s) {', '.join(missing)}; it is not a cxrgen metadata table")
    return table


def _run_json(out: Path) -> dict:
    try:
        data = json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_scores(out: Path) -> dict[str, dict] | None:
    path = out / EVAL_DIR / "scores.parquet"
    if not path.is_file():
        return None
    try:
        return {row.pop("image_id"): row for row in pq.read_table(path).to_pylist()}
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read {path}: {exc}; run `cxrgen evaluate {out}` again") from None


def _thumb_name(out: Path, file_name: str) -> str:
    """thumbs/<path under images/>.jpg; refuses a file_name that leaves OUT."""
    inside(out, file_name)
    path = PurePosixPath(file_name)
    parts = path.parts[1:] if len(path.parts) > 1 and path.parts[0] == "images" else path.parts
    return str(PurePosixPath(THUMBS_DIR, *parts).with_suffix(".jpg"))


def _stale_thumbs(out: Path, rows: list[dict], thumbs: list[str], thumb_size: int) -> list[int]:
    """Positions whose thumbnail is missing, older than its image, or of other settings."""
    stamp = out / PREVIEW_DIR / THUMBS_DIR / _STAMP
    try:
        same = json.loads(stamp.read_text()) == {"thumb_size": thumb_size, "quality": THUMB_QUALITY}
    except (OSError, ValueError):
        same = False
    if not same:
        # every thumbnail is remade: until the new stamp is written at the end, none is trusted (an interrupted
        # remake at another size must not leave thumbnails that a later run takes as up to date)
        stamp.unlink(missing_ok=True)
        return list(range(len(rows)))
    stale = []
    for i, (row, thumb) in enumerate(zip(rows, thumbs)):
        try:
            if (out / PREVIEW_DIR / thumb).stat().st_mtime_ns < (out / row["file_name"]).stat().st_mtime_ns:
                stale.append(i)
        except OSError:
            stale.append(i)
    return stale


def _make_thumb(source: Path, target: Path, size: int) -> tuple[int, int] | None:
    """Write a JPEG whose longest side is `size` (scaled up or down); None when the image cannot be read."""
    try:
        with Image.open(source) as image:
            image.draft("L" if image.mode == "L" else "RGB", (size, size))  # JPEG: decode at a reduced scale
            image = ImageOps.contain(_displayable(image), (size, size), Image.Resampling.LANCZOS)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMB_QUALITY)
    atomic_write(target, buffer.getvalue())
    return image.size


def _displayable(image: Image.Image) -> Image.Image:
    if image.mode in ("L", "RGB"):
        return image
    if image.mode.startswith("I"):  # 16-bit grayscale: keep the top 8 bits
        return image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return image.convert("RGB")


def _thumb_dims(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError):
        return None


def sheet_geometry(count: int, columns: int, thumb_size: int, title: str = "", ids: tuple[str, ...] = ()) -> dict:
    """Where a contact sheet puts things: sheet size, header height, cell size, tile origins, and the lines of
    the title and of each id as they are drawn (wrapped, never cut: a sheet of one image keeps its prompt and id)."""
    font = caption_font()
    line = font.getbbox("Ag_0")[3] + 2
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    width = max(PAD + cols * (thumb_size + PAD), MIN_SHEET_WIDTH)
    title_lines = _wrap(title, font, width - 2 * PAD, TITLE_LINES) if title else []
    header = max(2, len(title_lines)) * line + 2 * PAD
    id_lines = [_char_lines(image_id, font, thumb_size) for image_id in ids]
    # room for the longest id and the widest seed (63 bits), both wrapped rather than cut on small tiles
    widest = max("0123456789", key=font.getlength) * 19  # 63-bit seeds have up to 19 digits
    caption = max((len(lines) for lines in id_lines), default=1) + len(_seed_lines(widest, font, thumb_size))
    cell_w, cell_h = thumb_size, thumb_size + caption * line
    origins = [(PAD + (k % cols) * (cell_w + PAD), header + (k // cols) * (cell_h + PAD)) for k in range(count)]
    return {"size": (width, header + rows * (cell_h + PAD)), "header": header, "line": line,
            "cell": (cell_w, cell_h), "origins": origins, "title_lines": title_lines, "id_lines": id_lines}


@functools.lru_cache(maxsize=1)
def caption_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font (no font files needed)."""
    return ImageFont.load_default(size=11) if features.check_module("freetype2") else ImageFont.load_default()


def _write_sheets(folder: Path, rows, thumbs, sizes, groups, thumb_size: int, per_sheet: int,
                  columns: int) -> list[Sheet]:
    """Render every prompt's sheet(s), skipping those whose stored key says they are up to date."""
    sheets = []
    for number, (prompt, positions) in enumerate(groups, start=1):
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]  # names never carry prompt text
        parts = math.ceil(len(positions) / per_sheet)
        for part, start in enumerate(range(0, len(positions), per_sheet), start=1):
            chunk = positions[start:start + per_sheet]
            sheet = Sheet(file=f"prompt-{number:05d}-{digest}-{part}.png", group=number - 1, rows=chunk)
            sheets.append(sheet)
            title = f"{prompt or '(empty prompt: unconditional)'} ({len(positions)} images" + \
                (f", part {part} of {parts})" if parts > 1 else ")")
            tiles = [(folder / thumbs[i] if sizes[i] else None, rows[i]["image_id"], rows[i].get("seed"))
                     for i in chunk]
            key = _sheet_key(title, tiles, thumb_size, columns)
            if _stored_key(folder / sheet.file) == key:
                continue
            info = PngImagePlugin.PngInfo()
            info.add_text(_SHEET_KEY, key)
            buffer = io.BytesIO()
            # compress level 3: level 6 takes about 3x longer for files a few per cent smaller
            render_sheet(title, tiles, thumb_size, columns).save(buffer, format="PNG", compress_level=3, pnginfo=info)
            atomic_write(folder / sheet.file, buffer.getvalue())
    keep = {s.file for s in sheets}
    for old in folder.iterdir():  # sheets of earlier --per-sheet/--columns settings
        if SHEET_PATTERN.match(old.name) and old.name not in keep:
            try:
                old.unlink()
            except OSError as exc:
                raise io_error(old, exc) from None
    return sheets


def _sheet_key(title: str, tiles, thumb_size: int, columns: int) -> str:
    """Everything a sheet's pixels depend on, thumbnails by modification time (they change only when remade)."""
    parts = [_SHEET_VERSION, title, str(thumb_size), str(columns)]
    for thumb, image_id, seed in tiles:
        parts += [image_id, str(seed), str(thumb.stat().st_mtime_ns) if thumb is not None else "-"]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def _stored_key(path: Path) -> str | None:
    try:
        with Image.open(path) as image:  # reads the chunks before the pixels only
            return image.info.get(_SHEET_KEY)
    except (OSError, ValueError):
        return None


def render_sheet(title: str, tiles: list[tuple[Path | None, str, int | None]], thumb_size: int,
                 columns: int) -> Image.Image:
    """A grayscale grid of thumbnails (centred in their cells), each captioned with image_id and seed, under
    a title; a tile whose thumbnail is None is outlined and marked unreadable."""
    geometry = sheet_geometry(len(tiles), columns, thumb_size, title, tuple(t[1] for t in tiles))
    font, line = caption_font(), geometry["line"]
    sheet = Image.new("L", geometry["size"], 24)  # grayscale like the images: a third of RGB's encoding time
    draw = ImageDraw.Draw(sheet)
    for k, text in enumerate(geometry["title_lines"]):
        draw.text((PAD, PAD + k * line), text, fill=255, font=font)
    for (thumb, image_id, seed), (x, y), id_lines in zip(tiles, geometry["origins"], geometry["id_lines"]):
        if thumb is None:
            draw.rectangle([x, y, x + thumb_size - 1, y + thumb_size - 1], outline=160)
            draw.text((x + 4, y + 4), "unreadable", fill=255, font=font)
        else:
            with Image.open(thumb) as image:
                sheet.paste(image.convert("L"), (x + (thumb_size - image.width) // 2,
                                                 y + (thumb_size - image.height) // 2))
        caption = [*id_lines, *_seed_lines(seed, font, thumb_size)]
        for k, text in enumerate(caption):
            draw.text((x, y + thumb_size + 1 + k * line), text, fill=220, font=font)
    return sheet


def _seed_lines(seed: int | str | None, font, width: int) -> list[str]:
    """"seed N" on as many lines as `width` needs: every digit stays (the seed remakes the image)."""
    if seed is None:
        return []
    text = f"seed {seed}"
    if font.getlength(text) <= width:
        return [text]
    lines, current = ["seed"], ""
    for digit in str(seed):
        if current and font.getlength(current + digit) > width:
            lines.append(current)
            current = ""
        current += digit
    return [*lines, current]


def _char_lines(text: str, font, width: int) -> list[str]:
    """text on as many lines of `width` pixels as it needs, broken between characters: nothing is cut."""
    lines, current = [], ""
    for char in _drawable(" ".join(text.split()), font):
        if current and font.getlength(current + char) > width:
            lines.append(current)
            current = ""
        current += char
    return [*lines, current]


def _drawable(text: str, font) -> str:
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")  # the bitmap font has latin-1 glyphs only


def _fit(text: str, font, width: int) -> str:
    """The text, cut with an ellipsis so it fits `width` pixels."""
    text = _drawable(" ".join(text.split()), font)
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _wrap(text: str, font, width: int, lines: int) -> list[str]:
    """Greedy word wrap into at most `lines` lines; the last one ends in an ellipsis when text is left."""
    words, result = _drawable(" ".join(text.split()), font).split(" "), []
    while words and len(result) < lines - 1:
        current = words.pop(0)
        while words and font.getlength(current + " " + words[0]) <= width:
            current += " " + words.pop(0)
        result.append(_fit(current, font, width))
    if words:
        result.append(_fit(" ".join(words), font, width))
    return result


def _gallery_data(out: Path, rows, labels, scores, thumbs, sizes, group_of, prompts, sheets, thumb_size) -> dict:
    """The page's data: columnar per image, so 10,000 images stay a few MB."""
    params = [name for name in rows[0] if name not in labels and name != "prompt"] if rows else []
    score_names = sorted({k for s in (scores or {}).values() for k in s if k not in ("flags", "accepted")})
    images = []
    for position, row in enumerate(rows):
        verdict = (scores or {}).get(row["image_id"])
        images.append({
            "g": group_of[position], "t": thumbs[position] if sizes[position] else None,
            "w": sizes[position][0] if sizes[position] else thumb_size,
            "h": sizes[position][1] if sizes[position] else thumb_size,
            "f": row["file_name"], "p": [_plain(row[n]) for n in params], "l": [_plain(row[n]) for n in labels],
            **({"e": [_plain(verdict.get(n)) for n in score_names], "fl": verdict.get("flags") or "",
                "a": bool(verdict.get("accepted"))} if verdict is not None else {}),
        })
    return {"run": out.resolve().name, "thumb": thumb_size, "params": params, "labels": labels,
            "scores": score_names if scores is not None else None, "prompts": prompts,
            "sheets": [[s.group, s.file] for s in sheets], "images": images}


def _plain(value):
    """A JSON value: NaN becomes null; an integer JavaScript cannot hold exactly (63-bit seeds) and anything
    unusual become their text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _JS_SAFE_INT:
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def render_html(data: dict) -> str:
    """The gallery page: the template with the data embedded as JSON that no string can break out of."""
    template = resources.files("cxrgen").joinpath("data/preview.html").read_text(encoding="utf-8")
    # `<` as \u003c: a prompt holding "</script>" stays inside the JSON block (and `>`/`&` for good measure)
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    payload = payload.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    # The page's own script is the only one the Content-Security-Policy allows (by its hash).
    script = _SCRIPT.search(template)
    if script is None:
        raise RunError("cxrgen/data/preview.html has no <script> block; reinstall cxrgen")
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode("utf-8")).digest()).decode("ascii")
    return template.replace("__SCRIPT_HASH__", f"sha256-{digest}").replace("__CXRGEN_DATA__", payload, 1)
