"""A real label table (CheXpert / MIMIC-CXR-JPG style): finding columns, counts, and how many synthetic
positives each finding needs (--target, --ratio, --total, --max-per-finding)."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from cxrgen.errors import InputError
from cxrgen.manifests.tables import Table, normalize_name

# CheXpert writes 1.0 / 0.0 / -1.0 / blank; MIMIC-CXR-JPG the same; other exports write 1 / 0 or true / false.
# "nan" is how pandas prints a blank float cell when a table passes through str().
_VALUES = {"1": 1, "1.0": 1, "true": 1, "0": 0, "0.0": 0, "false": 0, "-1": -1, "-1.0": -1, "": None, "nan": None}
UNCERTAIN_POLICIES = ("ignore", "positive")


@dataclass(frozen=True)
class FindingCounts:
    """Real cells of one finding column: positives (1), negatives (0), uncertain (-1) and blanks."""

    column: str  # the column's name in the label table
    finding: str  # the template set's name for it
    positive: int
    negative: int
    uncertain: int
    blank: int

    def real_positives(self, uncertain: str = "ignore") -> int:
        """Real positives under the --uncertain policy: with "positive" (U-Ones) the -1 cells count too."""
        return self.positive + (self.uncertain if uncertain == "positive" else 0)


@dataclass
class LabelTable:
    """The finding columns of a label table, its counts, and each row's set of positive findings."""

    name: str
    rows: int
    findings: list[FindingCounts]
    ignored: list[str]  # columns that are not findings (paths, ids, demographics)
    # Per row, the indices (into findings) of its positive findings; None for a table of counts
    positive_sets: list[tuple[int, ...]] | None = field(default=None, repr=False)
    uncertain: str = "ignore"  # the --uncertain policy the positives (goals, ranking, co-occurrence) follow


def match_columns(columns: list[str], known: list[str], chosen: list[str] | None, source: str) -> dict[str, str]:
    """column -> finding name for the finding columns: recognised by name, or the --findings list."""
    by_name = {normalize_name(k): k for k in known}
    if chosen:
        present = {normalize_name(c): c for c in columns}
        result = {}
        for name in chosen:
            column = present.get(normalize_name(name))
            if column is None:
                raise InputError(f"--findings {name!r}: {source} has no such column (columns: {', '.join(columns)}); "
                                 "name columns of the table")
            finding = by_name.get(normalize_name(name))
            if finding is None:
                raise InputError(f"--findings {name!r}: the template set has no finding of that name (it has: "
                                 f"{', '.join(known)}); rename the column or add the finding with --templates")
            result[column] = finding
        return result
    result, seen = {}, {}
    for column in columns:
        finding = by_name.get(normalize_name(column))
        if finding is None:
            continue
        if finding in seen:
            raise InputError(f"{source}: columns {seen[finding]!r} and {column!r} both name the finding {finding}; "
                             "remove one or choose with --findings")
        seen[finding] = column
        result[column] = finding
    if not result:
        raise InputError(f"{source} has no finding column (columns: {', '.join(columns)}); name the columns like "
                         f"the findings ({', '.join(known)}; any case, _ or space) or choose them with --findings")
    return result


def read_labels(table: Table, known: list[str], chosen: list[str] | None = None, uncertain: str = "ignore",
                normal: str | None = None) -> LabelTable:
    """Parse every finding cell (1, 0, -1, blank, true/false), count them, and collect each row's positives.

    `normal` names the no-finding column's finding ("No Finding"): counted, but never part of a positive set.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise InputError(f"--uncertain {uncertain!r}: use ignore or positive")
    columns = list(table.text.columns)
    mapping = match_columns(columns, known, chosen, table.name)
    counts, matrix = [], []
    for column, finding in mapping.items():
        values = _parse_column(table, column)
        counts.append(FindingCounts(column, finding, int((values == 1).sum()), int((values == 0).sum()),
                                    int((values == -1).sum()), int((values == 2).sum())))
        positive = (values == 1) | ((values == -1) if uncertain == "positive" else False)
        matrix.append(positive & (finding != normal))
    positives = np.stack(matrix, axis=1)
    sets = [tuple(int(i) for i in np.flatnonzero(row)) for row in positives]
    ignored = [c for c in columns if c not in mapping]
    return LabelTable(table.name, len(table.text), counts, ignored, sets, uncertain)


def _parse_column(table: Table, column: str) -> np.ndarray:
    """1, 0, -1 per cell, 2 for blank; the first bad cell is an error naming its row and column."""
    cells = table.text[column].tolist()
    codes = {}
    for value in dict.fromkeys(cells):  # each distinct spelling once: a 200k-row table has a handful
        code = _VALUES.get(str(value).strip().lower(), "bad")
        codes[value] = 2 if code is None else code
    bad = [v for v, c in codes.items() if c == "bad"]
    if bad:
        row = next(i for i, v in enumerate(cells) if codes[v] == "bad") + 1
        raise InputError(f"{table.name} row {row}, column {column}: {str(cells[row - 1])!r} is not 1, 0, -1 or blank "
                         "(or true/false); fix the cell")
    return np.array([codes[v] for v in cells], dtype=np.int8)


def read_counts(table: Table, known: list[str], chosen: list[str] | None = None,
                uncertain: str = "ignore") -> LabelTable:
    """A table of counts: one row per finding, columns finding and positive (negative, uncertain, blank optional)."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise InputError(f"--uncertain {uncertain!r}: use ignore or positive")
    present = {normalize_name(c): c for c in table.text.columns}
    if "finding" not in present or "positive" not in present:
        raise InputError(f"{table.name}: a table of counts (--counts) needs the columns finding and positive "
                         f"(it has: {', '.join(table.text.columns)}); add them")
    by_name = {normalize_name(k): k for k in known}
    wanted = {normalize_name(c) for c in chosen} if chosen else None
    findings, seen = [], {}
    for number, record in enumerate(table.text.to_dict("records"), start=1):
        raw = str(record[present["finding"]]).strip()
        finding = by_name.get(normalize_name(raw))
        if finding is None:
            raise InputError(f"{table.name} row {number}, column {present['finding']}: {raw!r} is not a finding of the "
                             f"template set ({', '.join(known)}); fix the name")
        if finding in seen:
            raise InputError(f"{table.name} rows {seen[finding]} and {number}, column {present['finding']}: {finding} "
                             "appears twice; keep one row per finding")
        seen[finding] = number
        numbers = [_count(table.name, number, present.get(key), record) for key in
                   ("positive", "negative", "uncertain", "blank")]
        if wanted is None or normalize_name(finding) in wanted:
            findings.append(FindingCounts(raw, finding, *numbers))
    if wanted is not None:
        missing = sorted(wanted - {normalize_name(f.finding) for f in findings})
        if missing:
            raise InputError(f"--findings: {table.name} has no row for {', '.join(missing)}; add the rows or drop "
                             "the names")
    ignored = [c for c in table.text.columns if normalize_name(c) not in
               ("finding", "positive", "negative", "uncertain", "blank")]
    return LabelTable(table.name, sum(f.positive + f.negative + f.uncertain + f.blank for f in findings), findings,
                      ignored, None, uncertain)


def _count(name: str, number: int, column: str | None, record: dict) -> int:
    if column is None:
        return 0
    raw = str(record[column]).strip()
    if raw == "":
        return 0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value.is_integer()):
        raise InputError(f"{name} row {number}, column {column}: {raw!r} is not a whole number >= 0; fix the cell")
    return int(value)


@dataclass(frozen=True)
class Goal:
    """How many synthetic positives the draw aims at per finding, and where it must stop."""

    need: dict[str, int]  # finding -> synthetic positives still wanted (target and ratio modes)
    cap: int | None  # --max-per-finding: synthetic positives of any one finding, companions included
    total: int | None  # --total: images to draw, rarest findings first


def goal(counts: list[FindingCounts], *, target: int | None = None, ratio: float | None = None,
         total: int | None = None, max_per_finding: int | None = None, normal: str | None = None,
         uncertain: str = "ignore") -> Goal:
    """Turn exactly one of --target/--ratio/--total (and the cap) into what the draw aims at.

    Real positives follow the --uncertain policy: under "positive" a -1 counts towards the target and the ratio.
    """
    given = [name for name, value in (("--target", target), ("--ratio", ratio), ("--total", total))
             if value is not None]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)}: give only one of --target, --ratio, --total")
    for flag, value in (("--target", target), ("--total", total), ("--max-per-finding", max_per_finding)):
        if value is not None and value < 0:
            raise InputError(f"{flag} {value}: use a whole number >= 0")
    if ratio is not None and not (math.isfinite(ratio) and ratio >= 0):
        raise InputError(f"--ratio {ratio}: use a number >= 0 (synthetic positives per real positive)")
    cap = max_per_finding
    need: dict[str, int] = {}
    for c in counts:
        if c.finding == normal:  # normal images come from --normals only
            continue
        real = c.real_positives(uncertain)
        if target is not None:
            wanted = max(0, target - real)
        elif ratio is not None:
            wanted = math.floor(ratio * real + 0.5)  # half up: the same on every platform
        else:
            wanted = 0
        need[c.finding] = wanted if cap is None else min(wanted, cap)
    return Goal(need, cap, total)


def pick_anchor(real: dict[str, int], made: Counter, plan: Goal, order: list[str]) -> str | None:
    """The finding the next image is drawn for, or None when every finding met its goal or cap."""
    # the fewest positives (real + synthetic) first: under --total that fills the rarest finding up to the next
    # rarest, then both; ties go to the rarer real finding, then the template order
    best = None
    for index, finding in enumerate(order):
        if plan.cap is not None and made[finding] >= plan.cap:
            continue
        if plan.total is None and made[finding] >= plan.need.get(finding, 0):
            continue
        key = (real[finding] + made[finding], real[finding], index)
        if best is None or key < best[0]:
            best = (key, finding)
    return None if best is None else best[1]


def companion_table(labels: LabelTable, anchors: list[str], allowed: set[frozenset]) -> dict[str, list]:
    """For each finding, the other positives of its real positive rows: [(companions, rows)], sorted.

    `allowed` holds the pairs of findings that may share a prompt; a row's companions that conflict with the
    anchor are dropped (the row still counts, so the share of single-finding prompts stays that of reality).
    """
    table: dict[str, list] = {}
    if labels.positive_sets is None:
        return table
    names = [f.finding for f in labels.findings]
    for anchor in anchors:
        index = names.index(anchor)
        tally: Counter = Counter()
        for positives in labels.positive_sets:
            if index in positives:
                others = tuple(names[i] for i in positives if i != index
                               and frozenset((anchor, names[i])) in allowed)
                tally[others] += 1
        table[anchor] = sorted(tally.items())
    return table
