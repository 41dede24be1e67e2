"""OUT/README.md: the dataset card, written together with metadata.parquet so the two always agree.

Its YAML front matter pins the one `train` split to metadata.parquet and the images, so `load_dataset(OUT)`
(and the Hugging Face Hub) never take `quality/`, `preview/` or an image named `test-...` for a split.
`load_dataset("imagefolder", data_dir=OUT)` ignores the card; it relies on no path of OUT holding a split name
(index file names, `quality/` rather than `evaluation/`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cxrgen.files import atomic_write
from cxrgen.markdown import md_code, md_text
from cxrgen.runs.journal import METADATA_SCHEMA
from cxrgen.runs.verify_stats import card_section, verification_stats
from cxrgen.storage.base import METADATA, RUN_JSON, Store
from cxrgen.storage.open import open_store

CARD = "README.md"
_TOP_VALUES = 20  # label values listed per column; the rest are summed as "other"
_MONAI_CITATION = ('M. Jorge Cardoso et al. "MONAI: An open-source framework for deep learning in healthcare." '
                   "2022. https://doi.org/10.48550/arXiv.2211.02701 (software: https://doi.org/10.5281/zenodo.4323058)")


class Facts:
    """What the card says about a metadata table, gathered row group by row group: memory stays bounded (8 bytes
    per row for the distinct-prompt count) however big the table is."""

    def __init__(self, column_names: list[str]):
        self.column_names = list(column_names)
        self.rows, self.manifest_rows, self._last_row = 0, 0, None
        self.first: dict = {}
        self.labels: dict[str, dict] = {name: {} for name in label_columns(self.column_names)}
        self.guidance: set = set()
        self.device_types: set = set()
        self._prompts: list = []

    @classmethod
    def of(cls, table: pa.Table) -> "Facts":
        facts = cls(table.column_names)
        facts.add(table)
        return facts

    def add(self, table: pa.Table) -> None:
        """Count one row group (rows in plan order: a manifest row's images are consecutive)."""
        import numpy as np

        if not self.rows and table.num_rows:
            self.first = table.slice(0, 1).to_pylist()[0]
        self.rows += table.num_rows
        for row in table.column("manifest_row").to_pylist():
            self.manifest_rows += row != self._last_row
            self._last_row = row
        self._prompts.append(np.unique(np.array([hash(p) for p in table.column("prompt").to_pylist()], np.int64)))
        self.guidance.update(table.column("guidance_scale").unique().to_pylist())
        self.device_types.update(table.column("device_type").unique().to_pylist())
        for name, tally in self.labels.items():
            for value, count in value_counts(table.column(name)):
                key = "nan" if isinstance(value, float) and value != value else (type(value).__name__, value)
                tally[key] = (value, tally.get(key, (value, 0))[1] + count)

    @property
    def prompts(self) -> int:
        import numpy as np

        return len(np.unique(np.concatenate(self._prompts))) if self._prompts else 0


def write_run_card(out: Store | Path) -> None:
    """Write OUT/README.md from OUT/metadata.parquet and OUT/run.json (a folder or an object-store prefix)."""
    store = open_store(out)
    run = json.loads(store.read_bytes(RUN_JSON).decode("utf-8"))
    with store.open_input(METADATA) as handle:
        table = pq.ParquetFile(handle)
        facts = Facts(table.schema_arrow.names)
        for group in range(table.num_row_groups):
            facts.add(table.read_row_group(group))
    store.write_bytes(CARD, card_text(facts, run, verification=verification_stats(store, run)).encode("utf-8"))


def write_card(folder: Path, table: pa.Table, run: dict, note: str = "", verification: dict | None = None,
               shards: list[str] | None = None) -> Path:
    """Write folder/README.md describing `table` (a metadata.parquet) of the run `run` (its run.json).

    shards: the folder holds these WebDataset shards (`cxrgen export --format webdataset`) instead of
    metadata.parquet and images/.
    """
    path = Path(folder) / CARD
    atomic_write(path, card_text(Facts.of(table), run, note, verification, shards).encode("utf-8"))
    return path


def card_text(table: pa.Table | Facts, run: dict, note: str = "", verification: dict | None = None,
              shards: list[str] | None = None) -> str:
    """The card's Markdown: front matter, counts, labels, (--verify's figures), settings, model and terms, loading,
    citation.

    Every string that comes from the manifest, the run or the bundle is escaped (cxrgen.markdown): the Hub
    renders the card, HTML included.
    """
    facts = table if isinstance(table, Facts) else Facts.of(table)
    image_format = run["config"]["image_format"]
    bundle = _bundle_facts(run)
    demo = run.get("resolved", {}).get("demo") is True
    parts = [front_matter(image_format, shards, demo), _intro(facts, run, note, shards), _labels(facts),
             *([card_section(verification)] if verification is not None else []), _settings(facts, run),
             _model(facts, bundle), _loading(shards), _provenance(image_format), _citation(bundle)]
    return "\n".join(parts)


def label_columns(table: pa.Table | list[str]) -> list[str]:
    """The manifest's label columns of a metadata table (everything cxrgen does not write itself)."""
    names = table if isinstance(table, list) else table.column_names
    return [name for name in names if name not in METADATA_SCHEMA.names]


def front_matter(image_format: str, shards: list[str] | None = None, demo: bool = False) -> str:
    """The YAML front matter: Hub tags and the one `train` split (metadata.parquet + the images, or the shards)."""
    # Written by hand: a fixed, tiny YAML document needs no YAML library.
    files = "    - train-*.tar\n" if shards else f"    - metadata.parquet\n    - images/**/*.{image_format}\n"
    what = ("pretty_name: cxrgen demo (random noise, not chest X-rays)\ntags:\n- cxrgen\n- demo\n- noise\n" if demo
            else "pretty_name: Synthetic chest X-rays (cxrgen)\ntags:\n- synthetic\n- chest-x-ray\n"
                 "- medical-imaging\n- cxrgen\n")
    return (f"---\nlicense: other\n{what}configs:\n- config_name: default\n  data_files:\n"
            f"  - split: train\n    path:\n{files}---\n")


def _intro(facts: Facts, run: dict, note: str, shards: list[str] | None = None) -> str:
    rows, prompts, manifest_rows = facts.rows, facts.prompts, facts.manifest_rows
    resolved = run.get("resolved", {})
    lines = ["# Synthetic chest X-ray dataset", "",
             "> **Every image here is synthetic**: made by a diffusion model from a text prompt, not taken from a "
             "patient. For research only; not for clinical use, diagnosis or treatment decisions. Each file "
             "carries this marker itself (see *Provenance*).", ""]
    if resolved.get("demo") is True:
        lines = ["# Demo dataset: random noise, not chest X-rays", "",
                 "> **Every image here is noise.** It was made with cxrgen's demo model (`cxrgen download --demo`), "
                 "whose weights are random: no image shows anything. It exists to check an install, a GPU, a "
                 "cluster launch, an export or a gallery. Never train, evaluate or publish on it as data.", ""]
    if note:
        lines += [note, ""]  # the caller's own Markdown, its data already escaped
    where = f"in {len(shards or [])} WebDataset shard(s) `train-NNNNNN.tar`" if shards else "under `images/`"
    columns = ", ".join(md_code(c) for c in facts.column_names)
    table_line = (f"- each sample's `<key>.json`: its metadata row; columns {columns}" if shards
                  else f"- `metadata.parquet`: one row per image in plan order; columns {columns}")
    lines += ["## Contents", "",
              f"- images: {rows} ({run['config']['image_format'].upper()}, "
              f"{resolved.get('height', '?')} x {resolved.get('width', '?')} pixels, 8-bit grayscale), {where}",
              f"- distinct prompts: {prompts}, from {manifest_rows} manifest row(s)",
              table_line,
              f"- made by cxrgen {md_text(run.get('cxrgen_version', '?'))}, run started "
              f"{md_text(run.get('created_at', '?'))}",
              "- `cxrgen evaluate` adds `quality/` (scores, accept flags, report); `cxrgen preview` adds "
              "`preview/`. Neither is part of the `train` split.", ""]
    return "\n".join(lines)


def _labels(facts: Facts) -> str:
    columns = list(facts.labels)
    lines = ["## Labels", ""]
    if not columns:
        return "\n".join(lines + ["The manifest had no label columns.", ""])
    lines += [f"Label columns (from the manifest, one value per image): {', '.join(md_code(c) for c in columns)}.", ""]
    for name in columns:
        counts = sorted(facts.labels[name].values(), key=lambda c: (-c[1], str(c[0])))
        shown = ", ".join(f"{md_text(_value(value))}: {count}" for value, count in counts[:_TOP_VALUES])
        rest = sum(count for _, count in counts[_TOP_VALUES:])
        lines.append(f"- {md_code(name)}: {shown}" + (f", other ({len(counts) - _TOP_VALUES} values): {rest}"
                                                      if rest else ""))
    return "\n".join(lines + [""])


def value_counts(column: pa.ChunkedArray) -> list[tuple[object, int]]:
    """(value, images) of a label column, most frequent first; nested values (lists, structs) counted as JSON."""
    if _nested(column.type):
        # Arrow counts only flat values; a list label such as tags: list<string> is counted by its JSON text
        tally: dict[str, int] = {}
        for value in column.to_pylist():
            key = "null" if value is None else json.dumps(value, ensure_ascii=False, default=str)
            tally[key] = tally.get(key, 0) + 1
        counts = [(None if key == "null" else key, n) for key, n in tally.items()]
    else:
        counts = [(c["values"], c["counts"]) for c in column.value_counts().to_pylist()]
    return sorted(counts, key=lambda c: (-c[1], str(c[0])))


def _value(value) -> str:
    return "blank" if value is None or value == "" else str(value)


def _nested(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        return _nested(kind.value_type)
    return pa.types.is_nested(kind) or pa.types.is_union(kind)


def _settings(facts: Facts, run: dict) -> str:
    config, settings = run["config"], run["settings"]
    guidance = sorted(facts.guidance)
    lines = ["## Settings", "", "| setting | value |", "|---|---|"]
    shown = [("manifest", f"{config['manifest']} (sha256 {settings.get('manifest_sha256', '?')})"),
             ("images per row (default)", config["num_images"]), ("base seed", config["seed"]),
             ("guidance scale", ", ".join(map(str, guidance))), ("negative prompt (default)", config["negative_prompt"]),
             ("steps", config["steps"]), ("scheduler", config["scheduler"]), ("dtype", settings.get("dtype")),
             ("image format", config["image_format"]), ("JPEG quality", config["jpeg_quality"]),
             ("text encoder", f"{config['text_encoder']} ({settings.get('text_encoder_fingerprint')})"),
             ("device types", ", ".join(sorted(facts.device_types)))]
    lines += [f"| {name} | {_cell(value)} |" for name, value in shown]
    lines += ["", "Every image's own seed, prompt, guidance scale and row are in `metadata.parquet`; the full run "
              "settings are in `run.json` of the run folder. `cxrgen reproduce OUT IMAGE_ID` remakes one image.", ""]
    return "\n".join(lines)


def _cell(value) -> str:
    return "(empty)" if value == "" else md_text(value)


def _bundle_facts(run: dict) -> dict:
    """configs/metadata.json of the run's bundle and the References section of its docs/README.md, if readable."""
    root = Path(run.get("resolved", {}).get("bundle_root") or "")
    facts: dict = {}
    try:
        facts = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    try:
        readme = (root / "docs" / "README.md").read_text(encoding="utf-8")
        facts["_references"] = readme.split("## References", 1)[1].strip() if "## References" in readme else ""
    except OSError:
        pass
    facts = facts if isinstance(facts, dict) else {}
    facts["_folder"] = root.name
    return facts


def _model(facts: Facts, bundle: dict) -> str:
    first = facts.first
    lines = ["## Model, licence and terms", "",
             f"- model: {md_text(first.get('model_name', '?'))} version {md_text(first.get('model_version', '?'))} "
             f"(MONAI bundle folder {md_code(bundle.get('_folder', '?'))}; cxrgen's default is the model-zoo bundle "
             "`cxr_image_synthesis_latent_diffusion_model`, a latent diffusion model)",
             f"- checkpoints: autoencoder md5 {md_text(first.get('autoencoder_md5'))}, diffusion model md5 "
             f"{md_text(first.get('diffusion_model_md5'))}"]
    for key, label in (("description", "description"), ("authors", "authors"), ("copyright", "copyright"),
                       ("data_source", "training data"), ("intended_use", "intended use (the bundle's words)")):
        if bundle.get(key):
            lines.append(f"- {label}: {md_text(bundle[key])}")
    lines += ["", "**Terms.** The model was trained on MIMIC-CXR, which PhysioNet distributes as credentialed data "
              "under its data use agreement; that agreement applies to this dataset as well: read it and follow it "
              "before you use or share these images. Research use only; not for clinical use. The model bundle's "
              "own licence is the one shipped with the bundle.", ""]
    return "\n".join(lines)


def _loading(shards: list[str] | None = None) -> str:
    if shards:  # this folder holds the shards: their real names
        last = len(shards) - 1
        pattern = "train-000000.tar" if not last else f"train-{{000000..{last:06d}}}.tar"
        return "\n".join([
            "## How to load", "",
            f"Each sample is `<key>.jpg` (or `.png`) + `<key>.json`, the metadata row; {len(shards)} shard(s):", "",
            "```python",
            "import webdataset as wds",
            f'for sample in wds.WebDataset("SHARDS/{pattern}").decode("pil"):   # SHARDS: this folder',
            '    image, row = sample.get("jpg", sample.get("png")), sample["json"]',
            "",
            "import datasets",
            'ds = datasets.load_dataset("SHARDS", split="train")  # this card pins the shards as the one split',
            "```", ""])
    return "\n".join([
        "## How to load", "",
        "```python",
        "import pandas as pd",
        'meta = pd.read_parquet("OUT/metadata.parquet")   # file_name is relative to OUT',
        "",
        "import datasets",
        'ds = datasets.load_dataset("OUT", split="train")  # this card pins the one split: image + every column',
        "```", "",
        "`cxrgen export OUT --format webdataset --to SHARDS` writes WebDataset shards "
        "(`<key>.jpg` or `.png` + `<key>.json`, the metadata row) and a card in SHARDS naming them; read every "
        "shard, however many there are:", "",
        "```python",
        "import glob",
        "import webdataset as wds",
        'for sample in wds.WebDataset(sorted(glob.glob("SHARDS/train-*.tar"))).decode("pil"):',
        '    image, row = sample.get("jpg", sample.get("png")), sample["json"]',
        "```", "",
        "`cxrgen export OUT --format imagefolder --accepted-only --to KEPT` keeps only the images "
        "`cxrgen evaluate` accepted.", ""])


def _provenance(image_format: str) -> str:
    where = 'a PNG iTXt chunk "Comment"' if image_format == "png" else "the JPEG comment (COM segment)"
    read = 'Image.open(f).info["Comment"]' if image_format == "png" else 'Image.open(f).info["comment"]'
    return "\n".join([
        "## Provenance", "",
        f"Every image file holds one JSON object in {where}: `synthetic: true`, the generator and its version, "
        "the model's name, version and checkpoint md5s, and the image's id, seed, prompt, negative prompt, "
        f"guidance scale, steps and scheduler. Read it with Pillow (`{read}`), "
        "`cxrgen.provenance.read_provenance(path)` or `exiftool -Comment FILE`.", ""])


def _citation(bundle: dict) -> str:
    lines = ["## How to cite", "",
             "The model: cite the MONAI bundle `cxr_image_synthesis_latent_diffusion_model` and the works it names."]
    references = bundle.get("references")
    if isinstance(references, list) and references:
        lines += [""] + [f"- {md_text(r)}" for r in references]
    if bundle.get("_references"):
        # quoted as plain text, line by line: the bundle's Markdown is not the card's to render (nor its HTML)
        quoted = [f"> {md_text(line)}" if line.strip() else ">" for line in bundle["_references"].splitlines()]
        lines += ["", "The bundle's references (from its docs/README.md):", "", *quoted]
    lines += ["", f"MONAI: {_MONAI_CITATION}", ""]
    return "\n".join(lines)
