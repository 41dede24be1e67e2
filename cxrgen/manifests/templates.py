"""The template set of `cxrgen manifest from-labels`: report sentences per finding, negatives and normal studies,
read from a JSON file (cxrgen/data/templates.json, or --templates) and checked before anything is drawn.

Format (docs/manifests.md): {"cxrgen_templates": 1, "slots": {name: [values]}, "findings": {name: {"keywords":
[...], "positive": [sentence, ...]}}, "normal": {"finding": name, "prompts": [...]}, "negatives": [{"text": ...,
"negates": [finding, ...]}], "conflicts": [[finding, finding], ...]}. A sentence may use {slot} placeholders.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cxrgen.errors import InputError
from cxrgen.manifests.tokens import MAX_TOKENS, TokenCounter

SHIPPED_TEMPLATES = Path(__file__).parent.parent / "data" / "templates.json"
FORMAT_VERSION = 1
_KEYS = {"cxrgen_templates", "about", "slots", "findings", "normal", "negatives", "conflicts"}
_SLOT = re.compile(r"\{([A-Za-z0-9_]+)\}")


@dataclass(frozen=True)
class Sentence:
    """One template: its id (template_id in the manifest), text with {slot}s, and what it asserts or denies."""

    id: str
    text: str
    finding: str | None = None  # the finding a positive sentence asserts
    negates: frozenset = frozenset()  # findings a negative sentence denies: never beside one of them


@dataclass(frozen=True)
class TemplateSet:
    """Checked templates: findings in reading order, their sentences, negatives, normals and allowed pairs."""

    source: str
    slots: dict[str, tuple[str, ...]]
    findings: tuple[str, ...]  # reading order: the order sentences appear in a prompt
    keywords: dict[str, tuple[str, ...]]
    positive: dict[str, tuple[Sentence, ...]]
    negatives: tuple[Sentence, ...]
    normal: str | None  # the no-finding column's name, e.g. "No Finding"
    normals: tuple[Sentence, ...]
    conflicts: frozenset  # frozenset pairs of findings never asserted in one prompt

    @property
    def names(self) -> list[str]:
        """Every finding a label column may name, the normal one last."""
        return list(self.findings) + ([self.normal] if self.normal else [])

    def allowed_pairs(self) -> set[frozenset]:
        """Pairs of findings that may be asserted in one prompt."""
        return {frozenset(p) for p in itertools.combinations(self.findings, 2)} - set(self.conflicts)


def slug(name: str) -> str:
    """File-name-safe lower-case form of a finding name (ids of rows and templates)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "finding"


def keyword_pattern(keywords) -> re.Pattern:
    """Whole-word, case-insensitive match of any keyword (so `line` never matches `linear`)."""
    return re.compile(r"(?<![a-z0-9])(" + "|".join(re.escape(k.lower()) for k in keywords) + r")(?![a-z0-9])",
                      re.IGNORECASE)


def load_templates(path: str | Path | None, counter: TokenCounter) -> TemplateSet:
    """Read and check a template file (None: the shipped one); any problem is one InputError naming where."""
    path = Path(path) if path is not None else SHIPPED_TEMPLATES
    where = path.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"--templates {path}: cannot read it ({exc.strerror or exc}); give a JSON file") from None
    except UnicodeDecodeError:
        raise InputError(f"--templates {path}: not UTF-8 text; save the JSON file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} line {exc.lineno}, column {exc.colno}: {exc.msg}; fix the JSON") from None
    if not isinstance(data, dict) or data.get("cxrgen_templates") != FORMAT_VERSION:
        raise InputError(f'{where}: not a cxrgen template file; it must be a JSON object with "cxrgen_templates": '
                         f"{FORMAT_VERSION} (format: docs/manifests.md)")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; use only {', '.join(sorted(_KEYS))}")
    slots = _slots(where, data.get("slots", {}))
    findings = data.get("findings")
    if not isinstance(findings, dict) or not findings:
        raise InputError(f'{where}: "findings" must be an object finding name -> {{"keywords", "positive"}}')
    names = list(findings)
    keywords, positive = {}, {}
    for name in names:
        spec = findings[name]
        at = f"{where} findings[{name!r}]"
        if not isinstance(spec, dict) or set(spec) - {"keywords", "positive"}:
            raise InputError(f'{at}: must be an object with "keywords" and "positive" only')
        words = spec.get("keywords", [name.lower()])
        if not _strings(words):
            raise InputError(f"{at}.keywords: must be a non-empty list of words or phrases")
        keywords[name] = tuple(words)
        texts = spec.get("positive")
        if not _strings(texts):
            raise InputError(f"{at}.positive: must be a non-empty list of sentences")
        positive[name] = tuple(Sentence(f"{slug(name)}-{i + 1}", t, finding=name) for i, t in enumerate(texts))
    normal_name, normals = _normals(where, data.get("normal"), names)
    negatives = _negatives(where, data.get("negatives", []), names)
    conflicts = _conflicts(where, data.get("conflicts", []), names)
    templates = TemplateSet(str(path), slots, tuple(names), keywords, positive, negatives, normal_name, normals,
                            conflicts)
    _check_sentences(where, templates, counter)
    return templates


def _strings(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v.strip() for v in value)


def _slots(where: str, slots) -> dict[str, tuple[str, ...]]:
    if not isinstance(slots, dict):
        raise InputError(f'{where}: "slots" must be an object slot name -> list of values')
    for name, values in slots.items():
        if not _SLOT.fullmatch("{" + name + "}") or not _strings(values):
            raise InputError(f"{where} slots[{name!r}]: a slot needs a name of letters, digits or _ and a non-empty "
                             "list of values")
    return {name: tuple(values) for name, values in slots.items()}


def _normals(where: str, normal, names: list[str]) -> tuple[str | None, tuple[Sentence, ...]]:
    if normal is None:
        return None, ()
    if not isinstance(normal, dict) or not isinstance(normal.get("finding"), str) or \
            not _strings(normal.get("prompts")):
        raise InputError(f'{where} normal: must be {{"finding": "No Finding", "prompts": [sentence, ...]}}')
    if normal["finding"] in names:
        raise InputError(f"{where} normal.finding: {normal['finding']!r} is also under findings; name it once")
    return normal["finding"], tuple(Sentence(f"normal-{i + 1}", t) for i, t in enumerate(normal["prompts"]))


def _negatives(where: str, negatives, names: list[str]) -> tuple[Sentence, ...]:
    if not isinstance(negatives, list):
        raise InputError(f'{where}: "negatives" must be a list of {{"text": ..., "negates": [finding, ...]}}')
    result = []
    for i, item in enumerate(negatives):
        at = f"{where} negatives[{i}]"
        if not isinstance(item, dict) or set(item) != {"text", "negates"} or not _strings([item["text"]]) \
                or not _strings(item["negates"]):
            raise InputError(f'{at}: must be {{"text": sentence, "negates": [finding, ...]}}')
        unknown = [n for n in item["negates"] if n not in names]
        if unknown:
            raise InputError(f"{at}.negates: {unknown[0]!r} is not under findings; use one of {', '.join(names)}")
        result.append(Sentence(f"negative-{i + 1}", item["text"], negates=frozenset(item["negates"])))
    return tuple(result)


def _conflicts(where: str, conflicts, names: list[str]) -> frozenset:
    if not isinstance(conflicts, list):
        raise InputError(f'{where}: "conflicts" must be a list of pairs [finding, finding]')
    pairs = set()
    for i, pair in enumerate(conflicts):
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in names for p in pair) and pair[0] != pair[1]):
            raise InputError(f"{where} conflicts[{i}]: must be a pair of two different findings named under findings")
        pairs.add(frozenset(pair))
    return frozenset(pairs)


def _check_sentences(where: str, templates: TemplateSet, counter: TokenCounter) -> None:
    """Slots exist, labels follow from the words (own keyword, no other finding's), and 77 tokens hold."""
    patterns = {name: keyword_pattern(words) for name, words in templates.keywords.items()}
    located = [(f"findings[{s.finding!r}].positive[{i}]", s) for name in templates.findings
               for i, s in enumerate(templates.positive[name])]
    located += [(f"negatives[{i}]", s) for i, s in enumerate(templates.negatives)]
    located += [(f"normal.prompts[{i}]", s) for i, s in enumerate(templates.normals)]
    for at, sentence in located:
        for name in _SLOT.findall(sentence.text):
            if name not in templates.slots:
                raise InputError(f"{where} {at}: slot {{{name}}} is not defined under slots; add it or fix the name")
        if "{" in _SLOT.sub("", sentence.text) or "}" in _SLOT.sub("", sentence.text):
            raise InputError(f"{where} {at}: a brace that is not a {{slot}}; remove it")
        variants = [fill(sentence.text, choice) for choice in _slot_choices(sentence.text, templates.slots, counter)]
        mentioned = {n for n, p in patterns.items() if any(p.search(v) for v in variants)}
        if sentence.finding is not None:
            if sentence.finding not in mentioned:
                raise InputError(f"{where} {at} ({sentence.text!r}): names none of the keywords of {sentence.finding}; "
                                 "use one, so the label can be checked against the words")
            others = sorted(mentioned - {sentence.finding})
            if others:
                raise InputError(f"{where} {at} ({sentence.text!r}): mentions {others[0]} (keyword of that finding), "
                                 f"whose label would be 0; reword it to assert {sentence.finding} only")
        elif sentence.negates or at.startswith("negatives"):
            loose = sorted(mentioned - sentence.negates)
            if loose:
                raise InputError(f"{where} {at} ({sentence.text!r}): mentions {loose[0]} but does not list it in "
                                 "negates; add it, so the sentence is never put beside a positive " + loose[0])
        tokens = max(counter.counts(variants))
        if tokens > MAX_TOKENS:
            raise InputError(f"{where} {at} ({sentence.text!r}): {tokens} CLIP tokens with its longest slot values, "
                             f"over {MAX_TOKENS}; shorten it")


def _slot_choices(text: str, slots: dict, counter: TokenCounter) -> list[dict[str, str]]:
    """Each value of each slot at least once, and the longest values together (the worst case for tokens)."""
    names = slots_of(text)
    if not names:
        return [{}]
    # CLIP splits words apart, so a sentence's tokens add up over its words: the most tokens per slot is the worst
    longest = {n: max(slots[n], key=lambda v: (counter.count(v), len(v), v)) for n in names}
    choices = [longest]
    for n in names:
        choices += [dict(longest, **{n: value}) for value in slots[n]]
    return choices


def slots_of(text: str) -> list[str]:
    """The slot names a sentence uses, each once, in order."""
    return list(dict.fromkeys(_SLOT.findall(text)))


def fill(text: str, values: dict[str, str]) -> str:
    """The sentence with its slots filled and every sentence in it starting with a capital letter."""
    filled = _SLOT.sub(lambda m: values[m.group(1)], text)
    return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), filled)
