"""`cxrgen manifest from-labels`: a class-balanced manifest of report-style prompts whose label columns agree with
the prompt by construction.

Each image is drawn for one finding (the one furthest below its goal), joined by the findings its real positives
co-occur with (1-3 findings in all, as often as in the real table), written with one template per finding plus
up to two negative sentences about findings it does not assert. Label 1 = the prompt asserts the finding; label
0 = it does not (it either denies it or does not mention it). Same input and seed give the same bytes.
"""
from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cxrgen.errors import InputError
from cxrgen.files import local_path, refuse_url
from cxrgen.manifests.labels import (
    FindingCounts,
    Goal,
    LabelTable,
    companion_table,
    goal,
    pick_anchor,
    read_counts,
    read_labels,
)
from cxrgen.manifests.tables import check_output, read_table, write_manifest
from cxrgen.manifests.templates import (
    Sentence,
    TemplateSet,
    fill,
    load_templates,
    slots_of,
    slug,
)
from cxrgen.manifests.tokens import MAX_TOKENS, TokenCounter, load_counter

MAX_SENTENCES = 5  # the model was trained on up to 5 report sentences
CO_OCCURRENCE = ("real", "needed")
NEGATIVE_CHOICES = (0, 1, 1, 2)  # negative sentences per prompt, drawn uniformly: mostly one, sometimes none or two
_REDRAWS = 50  # template draws tried before a combination of findings is declared too long for 77 tokens


@dataclass(frozen=True)
class Image:
    """One synthetic image: the finding it was drawn for and every finding its prompt asserts (reading order)."""

    anchor: str | None  # None for a normal study
    findings: tuple[str, ...]


@dataclass
class FromLabelsResult:
    """What from-labels read, decided and wrote."""

    labels: LabelTable
    synthetic: dict[str, int]  # finding -> synthetic positives (images whose prompt asserts it)
    images: int
    multi: int  # images whose prompt asserts 2 or more findings
    normals: int
    rows: int
    out: Path
    notes: list[str] = field(default_factory=list)

    def table(self) -> list[tuple]:
        """(column, real 1, real 0, real -1, blank, synthetic 1, total 1) per finding column."""
        result = []
        for c in self.labels.findings:
            made = self.synthetic.get(c.finding, 0)
            result.append((c.column, c.positive, c.negative, c.uncertain, c.blank, made,
                           c.real_positives(self.labels.uncertain) + made))
        return result


def build_from_labels(labels_path: str | Path, out: str | Path, *, findings: list[str] | None = None,
                      target: int | None = None, ratio: float | None = None, total: int | None = None,
                      max_per_finding: int | None = None, normals: int = 0, max_findings: int = 3,
                      co_occurrence: str = "real", uncertain: str = "ignore", counts: bool = False,
                      templates: str | Path | None = None, tokenizer: str | None = None,
                      seed: int = 0) -> FromLabelsResult:
    """Read a label table (or a table of counts), balance it, and write the manifest to `out`."""
    refuse_url(templates, "--templates")
    refuse_url(tokenizer, "--tokenizer")
    labels_path, out = local_path(labels_path, "LABELS"), local_path(out, "--out")
    check_output(out, labels_path)
    if not 1 <= max_findings <= 3:
        raise InputError(f"--max-findings {max_findings}: use 1, 2 or 3 findings per prompt")
    if normals < 0:
        raise InputError(f"--normals {normals}: use a whole number >= 0")
    if seed < 0:
        raise InputError(f"--seed {seed}: use a whole number >= 0")
    if co_occurrence not in CO_OCCURRENCE:
        raise InputError(f"--co-occurrence {co_occurrence!r}: use real or needed")
    if target is None and ratio is None and total is None and not normals:
        raise InputError("say how many images to make: --target N, --ratio R or --total T (and/or --normals N)")
    counter = load_counter(tokenizer)
    template_set = load_templates(templates, counter)
    if normals and template_set.normal is None:
        raise InputError(f"--normals {normals}: the template set {template_set.source} has no normal prompts; add a "
                         '"normal" section')
    table = read_table(labels_path, "label table")
    labels = read_counts(table, template_set.names, findings, uncertain) if counts else \
        read_labels(table, template_set.names, findings, uncertain, template_set.normal)
    plan = goal(labels.findings, target=target, ratio=ratio, total=total, max_per_finding=max_per_finding,
                normal=template_set.normal, uncertain=uncertain)
    rng = random.Random(seed)
    images = draw_images(labels, plan, template_set, rng, max_findings, co_occurrence) + [Image(None, ())] * normals
    if not images:
        raise InputError(f"{labels.name}: every finding already reaches the goal with real images, so there is "
                         "nothing to make; raise --target/--ratio/--total or ask for --normals")
    columns = _manifest_columns(labels, template_set, images, rng, counter)
    write_manifest(out, columns)
    synthetic = Counter(f for image in images for f in image.findings)
    if normals:
        synthetic[template_set.normal] = normals
    return FromLabelsResult(labels, dict(synthetic), len(images), sum(len(i.findings) > 1 for i in images), normals,
                            len(columns["id"]), out, _notes(labels.findings, plan, synthetic, ratio, len(images) -
                                                            normals, template_set.normal, uncertain))


def draw_images(labels: LabelTable, plan: Goal, templates: TemplateSet, rng: random.Random,
                max_findings: int = 3, co_occurrence: str = "real") -> list[Image]:
    """The findings of every image, drawn until each finding meets its goal (or --total images exist).

    co_occurrence "real": a finding joins an image as often as it joins the anchor in the real table;
    "needed": only while it still needs positives itself, so findings common already are not inflated.
    """
    order = [f for f in templates.findings if f in plan.need]
    real = {c.finding: c.real_positives(labels.uncertain) for c in labels.findings}  # ranking follows the policy
    allowed = templates.allowed_pairs()
    # cumulative weights once per finding: random.choices draws the same with them as with the plain weights
    companions = {f: (options, list(itertools.accumulate(rows for _, rows in options)))
                  for f, options in companion_table(labels, order, allowed).items()}
    made: Counter = Counter()
    images: list[Image] = []
    while plan.total is None or len(images) < plan.total:
        anchor = pick_anchor(real, made, plan, order)
        if anchor is None:
            break
        others = draw_companions(*companions.get(anchor, ([], [])), rng, max_findings, made, plan.cap, allowed)
        if co_occurrence == "needed" and plan.total is None:
            others = [f for f in others if made[f] < plan.need.get(f, 0)]
        chosen = tuple(f for f in templates.findings if f == anchor or f in others)
        made.update(chosen)
        images.append(Image(anchor, chosen))
    return images


def draw_companions(options: list, cumulative: list[int], rng: random.Random, max_findings: int, made: Counter,
                    cap: int | None, allowed: set) -> list[str]:
    """The other findings of one real positive row of the anchor, drawn in proportion to how often they occur."""
    if not options or max_findings == 1:
        return []
    pick = rng.choices(range(len(options)), cum_weights=cumulative)[0]
    kept: list[str] = []
    for finding in options[pick][0]:
        if (cap is None or made[finding] < cap) and all(frozenset((finding, k)) in allowed for k in kept):
            kept.append(finding)
    if len(kept) > max_findings - 1:  # a row with more positives than a prompt holds: keep a random few
        kept = sorted(rng.sample(kept, max_findings - 1))
    return kept


def compose(templates: TemplateSet, findings: tuple[str, ...], rng: random.Random,
            counter: TokenCounter) -> tuple[str, list[str]]:
    """(prompt, template ids) asserting exactly `findings`: one sentence each, then 0-2 negatives of others."""
    for _ in range(_REDRAWS):
        chosen = [rng.choice(templates.positive[f]) for f in findings]
        sentences = [_fill(s, templates, rng) for s in chosen]
        negatives = _negatives(templates, set(findings), rng, MAX_SENTENCES - len(sentences))
        # too long for the text encoder: drop negatives first, then draw other phrasings
        while negatives and _tokens(sentences + [n.text for n in negatives], counter) > MAX_TOKENS:
            negatives.pop()
        if _tokens(sentences + [n.text for n in negatives], counter) <= MAX_TOKENS:
            return " ".join(sentences + [n.text for n in negatives]), [s.id for s in chosen] + [n.id for n in negatives]
    raise InputError(f"{Path(templates.source).name}: no phrasing of {' + '.join(findings)} fits in {MAX_TOKENS} CLIP "
                     "tokens; shorten those templates or lower --max-findings")


def _tokens(sentences: list[str], counter: TokenCounter) -> int:
    """Tokens of the sentences joined by spaces: CLIP splits at whitespace first, so the counts add up (each
    sentence's start and end tokens counted once for the whole); every prompt is counted whole before writing."""
    return sum(counter.count(s) - 2 for s in sentences) + 2


def _fill(sentence: Sentence, templates: TemplateSet, rng: random.Random) -> str:
    return fill(sentence.text, {n: rng.choice(templates.slots[n]) for n in slots_of(sentence.text)})


def _negatives(templates: TemplateSet, asserted: set, rng: random.Random, room: int) -> list[Sentence]:
    """Up to `room` negative sentences that deny none of the asserted findings and do not repeat each other."""
    wanted = min(rng.choice(NEGATIVE_CHOICES), room)
    result: list[Sentence] = []
    denied: set = set()
    for _ in range(wanted):
        candidates = [n for n in templates.negatives if not (n.negates & asserted) and not (n.negates & denied)]
        if not candidates:
            break
        pick = rng.choice(candidates)
        result.append(pick)
        denied |= pick.negates
    return result


def _manifest_columns(labels: LabelTable, templates: TemplateSet, images: list[Image], rng: random.Random,
                      counter: TokenCounter) -> dict[str, list]:
    """Rows of the manifest: identical prompts merged into one row (num_images), grouped by finding."""
    rows: dict[tuple[str, str], dict] = {}
    for image in images:
        if image.anchor is None:
            sentence = rng.choice(templates.normals)
            text, ids = _fill(sentence, templates, rng), [sentence.id]
        else:
            text, ids = compose(templates, image.findings, rng, counter)
        key = (text, "+".join(ids))
        if key in rows:
            rows[key]["num_images"] += 1
        else:
            rows[key] = {"image": image, "num_images": 1, "first": len(rows)}
    too_long = [text for (text, _), n in zip(rows, counter.counts([text for text, _ in rows])) if n > MAX_TOKENS]
    if too_long:  # cannot happen while CLIP's counts add up over words; checked because the limit is the point
        raise InputError(f"{Path(templates.source).name}: the prompt {too_long[0]!r} has more than {MAX_TOKENS} CLIP "
                         "tokens; shorten its templates")
    rank = {f: i for i, f in enumerate(templates.findings)}
    ordered = sorted(rows.items(), key=lambda kv: (rank.get(kv[1]["image"].anchor, len(rank)), kv[1]["first"]))
    finding_columns = [(c.column, c.finding) for c in labels.findings]
    if templates.normal and any(i.anchor is None for i in images) and \
            templates.normal not in {f for _, f in finding_columns}:
        finding_columns.append((templates.normal, templates.normal))
    columns: dict[str, list] = {"id": [], "prompt": [], "num_images": []}
    columns.update({column: [] for column, _ in finding_columns})
    columns["template_id"] = []
    numbers: Counter = Counter()
    for (text, template_id), row in ordered:
        image = row["image"]
        group = slug(image.anchor or templates.normal or "normal")
        numbers[group] += 1
        columns["id"].append(f"{group}-{numbers[group]:05d}")
        columns["prompt"].append(text)
        columns["num_images"].append(row["num_images"])
        for column, finding in finding_columns:
            asserted = finding in image.findings or (image.anchor is None and finding == templates.normal)
            columns[column].append(1 if asserted else 0)
        columns["template_id"].append(template_id)
    return columns


def _notes(counts: list[FindingCounts], plan: Goal, synthetic: Counter, ratio: float | None, images: int,
           normal: str | None, uncertain: str = "ignore") -> list[str]:
    """Why a finding got fewer synthetic positives than one might expect."""
    notes = []
    for c in counts:
        if c.finding == normal:
            continue
        if plan.cap is not None and synthetic[c.finding] >= plan.cap:
            notes.append(f"{c.column}: stopped at --max-per-finding {plan.cap}")
        if ratio is not None and c.real_positives(uncertain) == 0:
            notes.append(f"{c.column}: no real positives, so --ratio gives it none; use --target for it")
    if plan.total is not None and images < plan.total:
        notes.append(f"--total {plan.total}: every finding reached --max-per-finding after {images} image(s)")
    return notes
