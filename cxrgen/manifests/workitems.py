"""Turn manifest rows into one work item per image: ids, seeds and file names (pure Python, no torch)."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from cxrgen.errors import InputError
from cxrgen.manifests.reader import Manifest, Row, read_manifest

if TYPE_CHECKING:
    from cxrgen.config import RunConfig

FILES_PER_FOLDER = 1000  # keeps every images/ subfolder far below 10,000 entries
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_SLUG = 64


@dataclass(frozen=True, slots=True)  # slots: a million-image plan holds a million of these
class WorkItem:
    """Everything needed to make and record one image."""

    index: int  # position in the plan: manifest order, then sample index
    image_id: str
    file_name: str  # relative to the output folder
    row: int  # 1-based manifest row number
    row_id: str | None
    sample_index: int
    seed: int
    prompt: str
    negative_prompt: str
    guidance_scale: float


def derive_seed(base_seed: int, row_key: str, sample_index: int) -> int:
    """The documented seed rule: first 63 bits of sha256("cxrgen-seed:<base>:<row key>:<k>")."""
    text = f"cxrgen-seed:{base_seed}:{row_key}:{sample_index}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def attempt_seed(image_seed: int, attempt: int) -> int:
    """The documented seed of attempt `attempt` of an image whose seed is `image_seed` (`cxrgen generate --verify`).

    Attempt 0 is the image's own seed, so a verified run's first tries are a plain run's images; attempt j > 0
    takes the first 63 bits of sha256("cxrgen-attempt:<image seed>:<j>"). A pure function of the two numbers:
    the same whatever the batch, worker, rank, shard or resume that makes the attempt.
    """
    if attempt == 0:
        return image_seed
    text = f"cxrgen-attempt:{image_seed}:{attempt}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def row_key(row: Row) -> str:
    """A row's identity for seeding: its id when the manifest has one, else its row number."""
    return f"id={row.row_id}" if row.row_id is not None else f"row={row.number}"


def row_slug(row: Row) -> str:
    """File-name-safe stem for a row; a hash suffix keeps ids unique after sanitising."""
    if row.row_id is None:
        return f"row{row.number:07d}"
    slug = _UNSAFE.sub("_", row.row_id).strip("._-") or "id"  # no leading "-": not an option to shell tools
    if slug != row.row_id or len(slug) > _MAX_SLUG or slug.lower() != slug:
        # Case-insensitive file systems would merge "A" and "a": the hash of the raw id keeps them apart.
        digest = hashlib.sha256(row.row_id.encode("utf-8")).hexdigest()[:8]
        slug = f"{slug[:_MAX_SLUG]}-{digest}"
    return slug


def image_file_name(index: int, image_id: str, image_format: str, file_names: str = "index") -> str:
    """Where image `index` of the plan is written, relative to the output folder."""
    stem = f"{index:08d}" if file_names == "index" else image_id
    return f"images/{index // FILES_PER_FOLDER:05d}/{stem}.{image_format}"


def make_plan(rows: tuple[Row, ...], *, seed: int, num_images: int, guidance_scale: float,
              negative_prompt: str, image_format: str, file_names: str = "index") -> list[WorkItem]:
    """One WorkItem per (row, sample index), in manifest order; independent of batch size and devices."""
    items = list(iter_plan(rows, seed=seed, num_images=num_images, guidance_scale=guidance_scale,
                           negative_prompt=negative_prompt, image_format=image_format, file_names=file_names))
    _check_unique(items)
    return items


def iter_plan(rows: tuple[Row, ...], *, seed: int, num_images: int, guidance_scale: float,
              negative_prompt: str, image_format: str, file_names: str = "index") -> Iterator[WorkItem]:
    """make_plan's items one at a time, unchecked: a merge of ten million images never holds them all."""
    index = 0
    for row in rows:
        slug = row_slug(row)
        count = num_images if row.num_images is None else row.num_images
        for k in range(count):
            image_id = f"{slug}_{k:04d}"
            yield WorkItem(
                index=index,
                image_id=image_id,
                file_name=image_file_name(index, image_id, image_format, file_names),
                row=row.number,
                row_id=row.row_id,
                sample_index=k,
                seed=row.seed + k if row.seed is not None else derive_seed(seed, row_key(row), k),
                prompt=row.prompt,
                negative_prompt=negative_prompt if row.negative_prompt is None else row.negative_prompt,
                guidance_scale=guidance_scale if row.guidance_scale is None else row.guidance_scale,
            )
            index += 1


def _check_unique(items: list[WorkItem]) -> None:
    seen: dict[str, int] = {}
    for item in items:
        key = item.image_id.lower()
        if key in seen:
            raise InputError(f"rows {seen[key]} and {item.row}, column id: both give image id {item.image_id!r}; "
                             "make the ids differ by more than letter case or punctuation")
        seen[key] = item.row


def load_plan(config: "RunConfig") -> tuple[Manifest, list[WorkItem]]:
    """Manifest and plan of a config (pure: reads the manifest, writes nothing, needs no torch)."""
    manifest = read_manifest(config.manifest, config.manifest_format, config.prompt_column,
                             config.allow_empty_prompt)
    plan = make_plan(manifest.rows, seed=config.seed, num_images=config.num_images,
                     guidance_scale=config.guidance_scale, negative_prompt=config.negative_prompt,
                     image_format=config.image_format, file_names=config.file_names)
    if not plan:
        what = "has no data rows" if not manifest.rows else "plans no images (num_images is 0 on every row)"
        raise InputError(f"manifest {manifest.path} {what}; add rows or set --num-images to 1 or more")
    return manifest, plan
