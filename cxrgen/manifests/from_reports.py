"""`cxrgen manifest from-reports`: prompts cut from the user's own reports the way the model's training prompts
were made: the FINDINGS and IMPRESSION sections (the whole text when a report has neither), without headers or
de-identification placeholders, up to 5 consecutive sentences within 77 CLIP tokens."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from cxrgen.errors import InputError
from cxrgen.files import local_path, refuse_url
from cxrgen.manifests.reader import OVERRIDE_COLUMNS, _typed_labels
from cxrgen.manifests.tables import (
    check_output,
    normalize_name,
    output_format,
    read_table,
    write_manifest,
)
from cxrgen.manifests.tokens import MAX_TOKENS, TokenCounter, load_counter

# Sections the model's prompts came from, and the other headers of MIMIC-CXR and IU X-ray reports (MIMIC-CXR's
# section_parser.py lists their spellings and counts). Only named headers count: a structured report's "LUNGS:" or
# "HEART:" inside FINDINGS is findings text, not a new section. Any name may end in "s" or a literal "(s)", as
# MIMIC-CXR writes RECOMMENDATION(S): and IMPRESSION(S):.
_WANTED = ("findings and impression", "findings/impression", "findings", "finding", "impression", "conclusion")
_OTHER = ("final report", "examination", "exam", "type of examination", "indication", "clinical indication",
          "clinical history", "patient history", "clinical information", "history", "reason for examination",
          "reason for exam", "technique", "comparison", "comparison exam", "comparison film", "reference exam",
          "procedure", "notification", "recommendation", "wet read", "wetread", "addendum", "study", "comment",
          "date")
_NAMED = "|".join(re.escape(h).replace(r"\ ", r"\s+").replace("/", r"\s*/\s*")
                  for h in sorted(_WANTED + _OTHER, key=len, reverse=True))
_HEADER = re.compile(rf"(?<![A-Za-z])({_NAMED})(\(s\)|s)?\s*:", re.IGNORECASE)
_FINAL_REPORT = re.compile(r"(?im)^[ \t]*final report[ \t]*$")
# MIMIC-CXR writes ___ for every removed name, date or time; IU X-ray writes XXXX
_PLACEHOLDER = re.compile(r"_{2,}|(?<![A-Za-z])X{2,}(?![A-Za-z])")
_ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "vs", "e.g", "i.e", "approx", "st", "no", "fig", "a.m", "p.m"}
# A sentence ends at . ! ? and a space. What follows may start in lower case: IU X-ray reports hold sentences
# such as "No pneumothoraces. cardiomegaly. Degenerative changes." (abbreviations are checked apart).
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Za-z0-9\"'(\[_])")


@dataclass
class FromReportsResult:
    """What from-reports read and wrote."""

    reports: int
    prompts: int
    skipped: list[int]  # 1-based rows that gave no prompt (blank, or no sentence fits in 77 tokens)
    carried: list[str]  # columns copied onto every prompt row (as named in the manifest)
    out: Path


def sections(text: str) -> str:
    """The FINDINGS and IMPRESSION text of a report (in order), or all of it without headers when it has neither."""
    text = _FINAL_REPORT.sub(" ", text)
    parts: list[tuple[str | None, str]] = []
    last, name = 0, None
    for match in _HEADER.finditer(text):
        parts.append((name, text[last:match.start()]))
        name = re.sub(r"\s*/\s*", "/", " ".join(match.group(1).lower().split()))  # IMPRESSION(S) -> impression
        last = match.end()
    parts.append((name, text[last:]))
    wanted = [body for header, body in parts if header in _WANTED]
    return " ".join(wanted if wanted else [body for _, body in parts])


def sentences(text: str) -> list[str]:
    """Clean sentences: placeholders removed, whitespace tidied, list numbers and empty sentences dropped."""
    text = " ".join(text.split())
    pieces, start = [], 0
    # split before removing placeholders: "unremarkable. XXXX opacity" ends a sentence at the placeholder
    for match in _SPLIT.finditer(text):
        word = text[start:match.start()].rsplit(" ", 1)[-1].rstrip(".").lower()
        if word in _ABBREVIATIONS:  # "Dr. Smith", "e.g. edema": not a sentence end
            continue
        pieces.append(text[start:match.start()])
        start = match.end()
    pieces.append(text[start:])
    result = []
    for piece in pieces:
        piece = " ".join(_PLACEHOLDER.sub(" ", piece).split())
        piece = re.sub(r"\s+([,.;:!?)])", r"\1", piece)  # "at ___." became "at ." : close the gap
        piece = re.sub(r"\(\s*\)", "", piece)
        piece = re.sub(r"^\d{1,2}[.)](\s+|$)", "", piece).strip(" ,;:")  # "1. Small effusion." -> "Small effusion."
        if re.search(r"[A-Za-z]", piece):
            result.append(piece)
    return result


def windows(counts: list[int], max_sentences: int) -> dict[int, int]:
    """start -> end (exclusive) of the longest run of up to max_sentences sentences within 77 tokens."""
    result = {}
    for start in range(len(counts)):
        end, tokens = start, 2  # the start and end tokens, counted once per prompt
        while end < len(counts) and end - start < max_sentences and tokens + counts[end] - 2 <= MAX_TOKENS:
            tokens += counts[end] - 2
            end += 1
        if end > start:
            result[start] = end
    return result


def pick_windows(spans: dict[int, int], k: int, rng: random.Random) -> list[tuple[int, int]]:
    """k windows at random starts, non-overlapping ones first; in report order."""
    starts = list(spans)
    rng.shuffle(starts)
    chosen: list[int] = []
    for start in starts:  # windows that share no sentence with one already chosen
        if len(chosen) < k and all(spans[start] <= c or spans[c] <= start for c in chosen):
            chosen.append(start)
    for start in starts:  # then overlapping ones, when the report is too short for k apart
        if len(chosen) < k and start not in chosen:
            chosen.append(start)
    return sorted((s, spans[s]) for s in chosen)


def build_from_reports(reports_path: str | Path, out: str | Path, *, text_column: str = "report",
                       max_sentences: int = 5, per_report: int = 1, num_images: int = 1, seed: int = 0,
                       tokenizer: str | None = None) -> FromReportsResult:
    """Write a manifest with up to `per_report` prompts per report; the table's other columns ride along."""
    refuse_url(tokenizer, "--tokenizer")
    reports_path, out = local_path(reports_path, "REPORTS"), local_path(out, "--out")
    check_output(out, reports_path)
    for flag, value, low in (("--max-sentences", max_sentences, 1), ("--per-report", per_report, 1),
                             ("--num-images", num_images, 1), ("--seed", seed, 0)):
        if value < low:
            raise InputError(f"{flag} {value}: use a whole number >= {low}")
    table = read_table(reports_path, "reports table")
    present = {normalize_name(c): c for c in table.text.columns}
    text_columns = []
    for name in [n.strip() for n in text_column.split(",") if n.strip()]:
        column = name if name in table.text.columns else present.get(normalize_name(name))
        if column is None:
            raise InputError(f"{table.name} has no column {name!r} (columns: {', '.join(table.text.columns)}); name "
                             "the report text column with --text-column")
        text_columns.append(column)
    if not text_columns:
        raise InputError("--text-column: give the name of the report text column")
    counter = load_counter(tokenizer)
    rng = random.Random(seed)
    carried = [c for c in table.text.columns if c not in text_columns]
    names = _carried_names(carried)
    columns: dict[str, list] = {"id": [], "prompt": [], "num_images": [], "report_row": [], "sentences": []}
    columns.update({names[c]: [] for c in carried})
    source_rows, skipped = [], []
    for row, record in enumerate(table.text[text_columns + carried].to_dict("records"), start=1):
        prompts = report_prompts(" ".join(str(record[c]) for c in text_columns), max_sentences, per_report, rng,
                                 counter)
        if not prompts:
            skipped.append(row)
        for k, (text, first, last) in enumerate(prompts, start=1):
            columns["id"].append(f"report{row:06d}-{k}")
            columns["prompt"].append(text)
            columns["num_images"].append(num_images)
            columns["report_row"].append(row)
            columns["sentences"].append(f"{first}-{last}")
            for c in carried:
                columns[names[c]].append(record[c])
            source_rows.append(row - 1)
    if not source_rows:
        raise InputError(f"{table.name}, column {text_columns[0]}: no report gave a sentence that fits in {MAX_TOKENS} "
                         "CLIP tokens; check --text-column")
    if output_format(out) == "parquet":
        _typed_carried(columns, table, carried, names, source_rows)
    write_manifest(out, columns)
    return FromReportsResult(len(table.text), len(source_rows), skipped, [names[c] for c in carried], out)


def report_prompts(text: str, max_sentences: int, per_report: int, rng: random.Random,
                   counter: TokenCounter) -> list[tuple[str, int, int]]:
    """(prompt, first sentence, last sentence) for up to per_report windows of one report (1-based sentences)."""
    found = sentences(sections(text))
    if not found:
        return []
    spans = windows(counter.counts(found), max_sentences)
    result = []
    for start, end in pick_windows(spans, per_report, rng):
        # tokens add up over sentences; the joined text is counted once more to be sure
        while end > start + 1 and counter.count(" ".join(found[start:end])) > MAX_TOKENS:
            end -= 1
        prompt = " ".join(found[start:end])
        if counter.count(prompt) <= MAX_TOKENS:
            result.append((prompt, start + 1, end))
    return result


def _carried_names(carried: list[str]) -> dict[str, str]:
    """Manifest names of the carried columns: one that generate would read as a setting gets report_ in front."""
    taken = set(OVERRIDE_COLUMNS) | {"prompt", "report_row", "sentences"}
    names, used = {}, set(carried)
    for column in carried:
        name = column
        while name in taken or (name != column and name in used):
            name = f"report_{name}"
        taken.add(name)
        names[column] = name
    return names


def _typed_carried(columns: dict, table, carried: list[str], names: dict, rows: list[int]) -> None:
    """Parquet output: carried columns keep their Parquet types, or get the types generate gives CSV labels."""
    typed = table.typed if table.typed is not None else _typed_labels(table.text, carried)
    picked = typed.select(carried).take(pa.array(rows, type=pa.int64()))
    for column in carried:
        columns[names[column]] = picked.column(column).combine_chunks()
