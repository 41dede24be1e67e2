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
from cxrgen.runs.journal import METADATA_SCHEMA
from cxrgen.storage.base import METADATA, RUN_JSON, Store
from cxrgen.storage.open import open_store

CARD = "README.md"
_TOP_VALUES = 20  # label values listed per column; the rest are summed as "other"
_MONAI_CITATION = ('M. Jorge Cardoso et al. "MONAI: An open-source framework for deep learning in healthcare." '
                   "2022. https://doi.org/10.48550/arXiv.2211.02701 (software: https://doi.org/10.5281/zenodo.4323058)")


def write_run_card(out: Store | Path) -> None:
    """Write OUT/README.md from OUT/metadata.parquet and OUT/run.json (a folder or an object-store prefix)."""
    store = open_store(out)
    run = json.loads(store.read_bytes(RUN_JSON).decode("utf-8"))
    with store.open_input(METADATA) as handle:
        table = pq.read_table(handle)
    store.write_bytes(CARD, card_text(table, run).encode("utf-8"))


def write_card(folder: Path, table: pa.Table, run: dict, note: str = "") -> Path:
    """Write folder/README.md describing `table` (a metadata.parquet) of the run `run` (its run.json)."""
    path = Path(folder) / CARD
    atomic_write(path, card_text(table, run, note).encode("utf-8"))
    return path


def card_text(table: pa.Table, run: dict, note: str = "") -> str:
    """The card's Markdown: front matter, counts, labels, settings, model and terms, loading, citation."""
    image_format = run["config"]["image_format"]
    bundle = _bundle_facts(run)
    parts = [front_matter(image_format), _intro(table, run, note), _labels(table), _settings(table, run),
             _model(table, bundle), _loading(), _provenance(image_format), _citation(bundle)]
    return "\n".join(parts)


def label_columns(table: pa.Table) -> list[str]:
    """The manifest's label columns of a metadata table (everything cxrgen does not write itself)."""
    return [name for name in table.column_names if name not in METADATA_SCHEMA.names]


def front_matter(image_format: str) -> str:
    """The YAML front matter: Hub tags and the one `train` split (metadata.parquet + the images)."""
    # Written by hand: a fixed, tiny YAML document needs no YAML library.
    return ("---\nlicense: other\npretty_name: Synthetic chest X-rays (cxrgen)\ntags:\n- synthetic\n"
            "- chest-x-ray\n- medical-imaging\n- cxrgen\nconfigs:\n- config_name: default\n  data_files:\n"
            f"  - split: train\n    path:\n    - metadata.parquet\n    - images/**/*.{image_format}\n---\n")


def _intro(table: pa.Table, run: dict, note: str) -> str:
    rows = table.num_rows
    prompts = len(set(table.column("prompt").to_pylist()))
    manifest_rows = len(set(table.column("manifest_row").to_pylist()))
    resolved = run.get("resolved", {})
    lines = ["# Synthetic chest X-ray dataset", "",
             "> **Every image here is synthetic**: made by a diffusion model from a text prompt, not taken from a "
             "patient. For research only; not for clinical use, diagnosis or treatment decisions. Each file "
             "carries this marker itself (see *Provenance*).", ""]
    if note:
        lines += [note, ""]
    lines += ["## Contents", "",
              f"- images: {rows} ({run['config']['image_format'].upper()}, "
              f"{resolved.get('height', '?')} x {resolved.get('width', '?')} pixels, 8-bit grayscale), "
              "under `images/`",
              f"- distinct prompts: {prompts}, from {manifest_rows} manifest row(s)",
              f"- `metadata.parquet`: one row per image in plan order; columns {', '.join(table.column_names)}",
              f"- made by cxrgen {run.get('cxrgen_version', '?')}, run started {run.get('created_at', '?')}",
              "- `cxrgen evaluate` adds `quality/` (scores, accept flags, report); `cxrgen preview` adds "
              "`preview/`. Neither is part of the `train` split.", ""]
    return "\n".join(lines)


def _labels(table: pa.Table) -> str:
    columns = label_columns(table)
    lines = ["## Labels", ""]
    if not columns:
        return "\n".join(lines + ["The manifest had no label columns.", ""])
    lines += [f"Label columns (from the manifest, one value per image): {', '.join(f'`{c}`' for c in columns)}.", ""]
    for name in columns:
        counts = table.column(name).value_counts().to_pylist()
        counts.sort(key=lambda c: (-c["counts"], str(c["values"])))
        shown = ", ".join(f"{_value(c['values'])}: {c['counts']}" for c in counts[:_TOP_VALUES])
        rest = sum(c["counts"] for c in counts[_TOP_VALUES:])
        lines.append(f"- `{name}`: {shown}" + (f", other ({len(counts) - _TOP_VALUES} values): {rest}" if rest else ""))
    return "\n".join(lines + [""])


def _value(value) -> str:
    return "blank" if value is None or value == "" else str(value)


def _settings(table: pa.Table, run: dict) -> str:
    config, settings = run["config"], run["settings"]
    guidance = sorted(set(table.column("guidance_scale").to_pylist()))
    lines = ["## Settings", "", "| setting | value |", "|---|---|"]
    shown = [("manifest", f"{config['manifest']} (sha256 {settings.get('manifest_sha256', '?')})"),
             ("images per row (default)", config["num_images"]), ("base seed", config["seed"]),
             ("guidance scale", ", ".join(map(str, guidance))), ("negative prompt (default)", config["negative_prompt"]),
             ("steps", config["steps"]), ("scheduler", config["scheduler"]), ("dtype", settings.get("dtype")),
             ("image format", config["image_format"]), ("JPEG quality", config["jpeg_quality"]),
             ("text encoder", f"{config['text_encoder']} ({settings.get('text_encoder_fingerprint')})"),
             ("device types", ", ".join(sorted(set(table.column("device_type").to_pylist()))))]
    lines += [f"| {name} | {_cell(value)} |" for name, value in shown]
    lines += ["", "Every image's own seed, prompt, guidance scale and row are in `metadata.parquet`; the full run "
              "settings are in `run.json` of the run folder. `cxrgen reproduce OUT IMAGE_ID` remakes one image.", ""]
    return "\n".join(lines)


def _cell(value) -> str:
    text = "(empty)" if value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


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


def _model(table: pa.Table, bundle: dict) -> str:
    first = table.slice(0, 1).to_pylist()[0] if table.num_rows else {}
    lines = ["## Model, licence and terms", "",
             f"- model: {first.get('model_name', '?')} version {first.get('model_version', '?')} (MONAI bundle folder "
             f"`{bundle.get('_folder', '?')}`; cxrgen's default is the model-zoo bundle "
             "`cxr_image_synthesis_latent_diffusion_model`, a latent diffusion model)",
             f"- checkpoints: autoencoder md5 {first.get('autoencoder_md5')}, diffusion model md5 "
             f"{first.get('diffusion_model_md5')}"]
    for key, label in (("description", "description"), ("authors", "authors"), ("copyright", "copyright"),
                       ("data_source", "training data"), ("intended_use", "intended use (the bundle's words)")):
        if bundle.get(key):
            lines.append(f"- {label}: {bundle[key]}")
    lines += ["", "**Terms.** The model was trained on MIMIC-CXR, which PhysioNet distributes as credentialed data "
              "under its data use agreement; that agreement applies to this dataset as well: read it and follow it "
              "before you use or share these images. Research use only; not for clinical use. The model bundle's "
              "own licence is the one shipped with the bundle.", ""]
    return "\n".join(lines)


def _loading() -> str:
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
        "(`<key>.jpg` or `.png` + `<key>.json`, the metadata row):", "",
        "```python",
        "import webdataset as wds",
        'for sample in wds.WebDataset("SHARDS/train-{000000..000009}.tar").decode("pil"):',
        '    image, row = sample["jpg"], sample["json"]',
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
        lines += [""] + [f"- {r}" for r in references]
    if bundle.get("_references"):
        lines += ["", "The bundle's references (from its docs/README.md):", "", bundle["_references"]]
    lines += ["", f"MONAI: {_MONAI_CITATION}", ""]
    return "\n".join(lines)
