"""The label map: which manifest label column stands for which classifier pathology, and what a label value says.

One map for everything that reads labels against the classifier: `cxrgen evaluate` (adherence, per-image flags) and
`cxrgen generate --verify` (which findings each image must show). The built-in spellings, extended or overridden by
a `--label-map` JSON file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cxrgen.errors import InputError

# Common spellings (CheXpert / MIMIC-CXR label names and report words) of the classifier's pathologies.
# Keys are normalised (lower case, "_" as space); every pathology's own name is added at run time.
ALIASES = {
    "pleural effusion": "Effusion",
    "effusion": "Effusion",
    "pulmonary edema": "Edema",
    "lung opacity": "Lung Opacity",
    "opacity": "Lung Opacity",
    "lung lesion": "Lung Lesion",
    "enlarged cardiomediastinum": "Enlarged Cardiomediastinum",
    "cardiomegaly": "Cardiomegaly",
    "pleural thickening": "Pleural_Thickening",
}


def normalize_name(name: str) -> str:
    """Case-insensitive, `_` and space alike, surrounding and repeated spaces ignored."""
    return " ".join(str(name).replace("_", " ").lower().split())


def read_label_map(path: str | Path | None, pathologies: list[str]) -> dict[str, str | None]:
    """--label-map FILE: a JSON object column -> pathology name (null: do not evaluate that column)."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"--label-map {path}: cannot read it ({exc.strerror or exc}); give a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--label-map {path} is not valid JSON ({exc}); write an object such as "
                         '{"pleural_effusion": "Effusion"}') from None
    if not isinstance(data, dict):
        raise InputError(f"--label-map {path} must hold a JSON object column -> pathology, such as "
                         '{"pleural_effusion": "Effusion"}')
    by_name = {normalize_name(p): p for p in pathologies}
    result: dict[str, str | None] = {}
    for column, target in data.items():
        if target is not None and (not isinstance(target, str) or normalize_name(target) not in by_name):
            raise InputError(f"--label-map {path}: column {column!r} maps to {target!r}, which is not a pathology of "
                             f"the classifier; use one of {', '.join(pathologies)} (or null to skip the column)")
        result[normalize_name(column)] = None if target is None else by_name[normalize_name(target)]
    return result


def map_columns(columns: list[str], pathologies: list[str], user_map: dict[str, str | None]) -> tuple[dict, list]:
    """(column -> pathology for the columns evaluated, columns not evaluated), built-in map extended by user_map."""
    table: dict[str, str | None] = {normalize_name(p): p for p in pathologies}
    table.update({k: v for k, v in ALIASES.items() if v in pathologies})
    table.update(user_map)
    mapped = {c: table[normalize_name(c)] for c in columns if table.get(normalize_name(c))}
    return mapped, [c for c in columns if c not in mapped]


def label_state(value) -> bool | None:
    """True for a positive label (1 / true), False for a negative (0 / false); -1 (uncertain), blanks and other text: None."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, (float, np.floating)) and math.isnan(value):
            return None
        return True if value == 1 else False if value == 0 else None
    text = str(value).strip().lower()
    return {"1": True, "1.0": True, "true": True, "0": False, "0.0": False, "false": False}.get(text)
