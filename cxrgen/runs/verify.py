"""Verified generation (`cxrgen generate --verify`): what each image must show, the verdict on an attempt, and
what a run's journals say is left to do.

An image whose row has a positive label the verifier knows is scored after every attempt; attempt j is made
from cxrgen.manifests.workitems.attempt_seed(seed, j). Each attempt's verdict goes into its own journal
(OUT/.cxrgen/attempts/) before the next attempt of that image starts, so a resume never repeats or re-judges a
recorded attempt. The file at an image's own path is always its best attempt so far; the image is recorded in
the run's journal (hence metadata.parquet) once an attempt is accepted, or when the attempts run out: then the
best one is kept with verified = false. Rows with no positive label (and, with --verify-negatives, no negative
one either) are made once, as in a plain run, with verified = null.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from cxrgen.config import RunConfig
from cxrgen.errors import InputError
from cxrgen.files import STATE_DIR
from cxrgen.manifests.reader import Manifest
from cxrgen.manifests.workitems import WorkItem, attempt_seed
from cxrgen.model.label_map import label_state, map_columns, read_label_map
from cxrgen.runs.journal import Journal, read_records

ATTEMPTS_DIR = f"{STATE_DIR}/attempts"  # one journal part per writer, as records/
REJECTED_DIR = "rejected"  # --keep-rejected: rejected attempts and their metadata.parquet
RARE = 0.10  # a finding shown in fewer attempts than this is one the model rarely draws at this threshold
# What an attempt record holds beyond the image's metadata row (the kept record is the row without them).
VERDICT_FIELDS = ("accepted", "margin", "scores", "positives", "passed", "failed_negatives", "at_path",
                  "rejected_file")


@dataclass(frozen=True)
class Verification:
    """The checked --verify settings of a run and which findings each manifest row asks its images to show."""

    min_score: float
    max_attempts: int
    verify_negatives: bool
    keep_rejected: bool
    release: str  # torchxrayvision's name of the verifier's weights
    weights: str  # the weight file
    sha256: str
    findings: dict  # label column -> pathology, for the columns verified
    unverified: dict  # label column -> why it is not verified (no pathology, or one this release was not trained on)
    targets: dict = field(repr=False, default_factory=dict)  # manifest row number -> ((pathology, positive?), ...)

    def block(self) -> dict:
        """run.json's settings["verify"]: what a resume must match (the weights by content, not by path)."""
        return {"min_score": self.min_score, "max_attempts": self.max_attempts,
                "verify_negatives": self.verify_negatives, "keep_rejected": self.keep_rejected,
                "release": self.release, "weights_file": Path(self.weights).name, "weights_sha256": self.sha256,
                "findings": dict(self.findings)}

    def judged(self, item: WorkItem) -> bool:
        """Whether the image is verified: its row has a positive target (or any target, with negatives)."""
        targets = self.targets.get(item.row, ())
        return any(positive or self.verify_negatives for _, positive in targets)

    def describe(self, plan: list[WorkItem]) -> dict:
        """run.json's "verification": the verifier's file and what the plan asks of it (for status and the card)."""
        planned: dict[str, int] = {p: 0 for p in dict.fromkeys(self.findings.values())}
        unjudged = 0
        for item in plan:
            if not self.judged(item):
                unjudged += 1
                continue
            for pathology, positive in self.targets.get(item.row, ()):
                if positive:
                    planned[pathology] += 1
        return {"weights": self.weights, "planned": planned, "not_verified_images": unjudged,
                "unverified_columns": dict(self.unverified)}

    def note(self) -> str | None:
        """The one line, said once up front, naming the label columns that are not verified; None if all are."""
        if not self.unverified:
            return None
        return ("cxrgen: --verify: not verified (the verifier does not score them): "
                + "; ".join(f"{column} ({why})" for column, why in self.unverified.items()))


def prepare(config: RunConfig, manifest: Manifest, source=None, log=None) -> Verification:
    """Check every --verify input and resolve the verifier's weights (fetched once unless offline); raise
    InputError naming the problem before anything is written. log: where to say, once, which label columns are
    not verified (the caller passes it to the one process of a run that starts it)."""
    from cxrgen.extras import require_extra

    require_extra("--verify")  # torchxrayvision is the evaluate extra's
    from cxrgen.model.classifier import RELEASE, load_evaluator, release_info, resolve_verifier

    every = [p for p in release_info(RELEASE)["labels"] if p]  # the 18 names any release's outputs carry
    user_map = read_label_map(config.label_map or None, every)
    columns = manifest.labels.column_names
    labels = {c: manifest.labels.column(c).to_pylist() for c in columns}
    release, weights = resolve_verifier(config.verifier_weights, config.cache_dir, source, offline=config.offline,
                                        progress=not config.quiet)
    known = [p for p in release_info(release)["labels"] if p]
    mapped, unmapped = map_columns(columns, every, user_map)
    findings = {c: p for c, p in mapped.items() if p in known}
    unverified = {c: f"{p} is not among the findings {release} was trained on" for c, p in mapped.items()
                  if p not in known}
    # a column holding no 0/1 value at all (a template id, a view) is no label: nothing to report about it
    unverified.update({c: "no classifier pathology; map it with --label-map" for c in unmapped
                       if any(label_state(v) is not None for v in labels[c])})
    if not findings:
        what = f"label columns ({', '.join(columns)})" if columns else "label columns (it has none)"
        raise InputError(f"--verify: none of the manifest's {what} is a finding the verifier {release} knows "
                         f"({', '.join(known)}); name a column after one of them, or map columns with --label-map")
    evaluator = load_evaluator(weights, "cpu", release=release, unsafe_hint="`cxrgen evaluate "
                               "--evaluator-unsafe-pickle` can load it; --verify takes only files on the allow-list")
    targets = {}
    for index in range(manifest.labels.num_rows):
        row: dict[str, bool] = {}
        for column, pathology in findings.items():
            state = label_state(labels[column][index])
            if state is not None and (state or config.verify_negatives):
                row[pathology] = row.get(pathology, False) or state  # two columns, one pathology: positive wins
        if row:
            targets[index + 1] = tuple(sorted(row.items()))
    verification = Verification(config.min_score, config.max_attempts, config.verify_negatives,
                                config.keep_rejected, release, str(weights), evaluator.sha256, findings, unverified,
                                targets)
    if log is not None and verification.note():
        log(verification.note())
    return verification


def from_run(config: RunConfig, run: dict) -> Verification:
    """A worker's Verification, from its config (the verifier's file as the parent resolved it) and run.json's
    settings; units carry their own targets, so none are read here."""
    from cxrgen.model.classifier import resolve_verifier

    block = run["settings"]["verify"]
    release, weights = resolve_verifier(config.verifier_weights, config.cache_dir, offline=True, progress=False)
    return Verification(block["min_score"], block["max_attempts"], block["verify_negatives"], block["keep_rejected"],
                        release, str(weights), block["weights_sha256"], dict(block["findings"]), {})


def differences(saved: dict | None, current: dict | None) -> list[str]:
    """Each --verify setting that differs between a run's saved settings["verify"] and this call's."""
    if saved == current:
        return []
    if saved is None or current is None:
        return [f"--verify: {'off' if saved is None else 'on'} -> {'off' if current is None else 'on'}"]
    return [f"verify {key}: {json.dumps(saved.get(key))} -> {json.dumps(current.get(key))}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


# ---------------------------------------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Verdict:
    """What the verifier said about one attempt."""

    accepted: bool
    margin: float  # the worst label's distance past the threshold (negative: short of it); ranks attempts
    verify_score: float | None  # the lowest score among the positive labels (None: the row has none)
    passed: tuple[str, ...]  # positive findings that reached min_score
    failed_negatives: tuple[str, ...]  # negative findings that reached it (--verify-negatives)


def judge(scores: dict[str, float], targets: tuple, min_score: float) -> Verdict:
    """Accepted when every positive target scores at least min_score and every negative one (present only with
    --verify-negatives) stays below it. A score that is not a number counts as failing."""
    margins, passed, failed, positives = [], [], [], []
    for pathology, positive in targets:
        score = scores.get(pathology, math.nan)
        if not math.isfinite(score):
            margins.append(-math.inf)
            if not positive:
                failed.append(pathology)
            else:
                positives.append(-math.inf)
            continue
        if positive:
            positives.append(score)
            margins.append(score - min_score)
            if score >= min_score:
                passed.append(pathology)
        else:
            margins.append(min_score - score)
            if score >= min_score:
                failed.append(pathology)
    accepted = len(passed) == len(positives) and not failed
    verify_score = min(positives) if positives else None
    return Verdict(accepted, min(margins) if margins else math.inf,
                   None if verify_score is None or not math.isfinite(verify_score) else verify_score,
                   tuple(passed), tuple(failed))


# ---------------------------------------------------------------------------------------------- work units

@dataclass(frozen=True)
class Unit:
    """One attempt to make: an image, which attempt, and whether it is judged or its verdict is already known.

    judge=False: a plain image (no target) or a remake of a decided attempt whose file was lost; `keep` then
    holds the metadata fields the record gets (attempt, verified, verify_score). best: the attempt record of
    the image's best attempt so far, whose file is at the image's path.
    """

    item: WorkItem
    attempt: int = 0
    judge: bool = True
    targets: tuple = ()
    best: dict | None = None
    keep: dict | None = None

    @property
    def seed(self) -> int:
        return attempt_seed(self.item.seed, self.attempt)

    @property
    def engine_item(self) -> WorkItem:
        """The work item the engine samples: the image's own, with this attempt's seed."""
        return self.item if self.attempt == 0 else dataclasses.replace(self.item, seed=self.seed)


def kept_record(attempt_record: dict, verified: bool | None) -> dict:
    """The image's journal record (its metadata row) from the record of the attempt kept."""
    record = {k: v for k, v in attempt_record.items() if k not in VERDICT_FIELDS}
    record["verified"] = verified
    return record


def best_of(records: dict[int, dict]) -> dict | None:
    """The best-scoring attempt record (highest margin; the earlier one on a tie), None when there is none."""
    ranked = sorted(records.items(), key=lambda kv: (-_margin(kv[1]), kv[0]))
    return ranked[0][1] if ranked else None


def _margin(record: dict) -> float:
    value = record.get("margin")
    return -math.inf if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def better(record: dict, best: dict | None) -> bool:
    """Whether an attempt beats the best so far (strictly: a tie keeps the earlier attempt)."""
    return best is None or _margin(record) > _margin(best)


def read_attempts(out: Path) -> dict[str, dict[int, dict]]:
    """Every recorded attempt, by image_id and attempt number (the first record of an attempt wins; a torn last
    line from a kill is skipped)."""
    folder = Path(out) / ATTEMPTS_DIR
    found: dict[str, dict[int, dict]] = {}
    for part in sorted(folder.glob("part-*.jsonl")) if folder.is_dir() else []:
        with open(part, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "image_id" in record and "attempt" in record:
                    found.setdefault(record["image_id"], {}).setdefault(int(record["attempt"]), record)
    return found


def plan_work(out: Path, todo: list[WorkItem], verification: Verification, writer: str,
              verify_files: bool = False) -> tuple[list[Unit], set[str]]:
    """The units that finish `todo` (images not yet recorded, or whose file is lost), and the image_ids this call
    recorded at once: decided by their journaled verdicts (accepted, or out of attempts) with the kept attempt's
    file already at the image's path, as a kill between the verdict and the image's record leaves them."""
    attempts = read_attempts(out) if todo else {}
    records = read_records(out, ("file_name", "attempt", "verified", "verify_score")) if todo else {}
    units, settle = [], []
    for item in todo:
        targets = verification.targets.get(item.row, ())
        recorded = records.get(item.image_id)
        if recorded is not None:  # decided and recorded, but its file is gone or damaged: make it again
            units.append(Unit(item, int(recorded.get("attempt") or 0), judge=False, targets=targets,
                              keep={"verified": recorded.get("verified"), "verify_score": recorded.get("verify_score")}))
            continue
        if not verification.judged(item):
            units.append(Unit(item, 0, judge=False, keep={"verified": None, "verify_score": None}))
            continue
        tried = attempts.get(item.image_id, {})
        accepted = sorted(j for j, r in tried.items() if r.get("accepted"))
        decided = tried[accepted[0]] if accepted else best_of(tried) if len(tried) >= verification.max_attempts \
            else None
        if decided is None:
            units.append(Unit(item, max(tried) + 1 if tried else 0, targets=targets, best=best_of(tried)))
        elif holds(Path(out) / item.file_name, decided):
            settle.append(kept_record(decided, bool(decided.get("accepted"))))
        else:
            units.append(Unit(item, int(decided["attempt"]), judge=False, targets=targets,
                              keep={"verified": bool(decided.get("accepted")),
                                    "verify_score": decided.get("verify_score")}))
    if settle:
        journal = Journal(Path(out), writer)
        try:
            journal.append(settle)
        finally:
            journal.close()
    return units, {r["image_id"] for r in settle}


def holds(path: Path, record: dict) -> bool:
    """Whether path holds the very bytes an attempt record describes (size and CRC-32)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return len(data) == record.get("file_bytes") and zlib.crc32(data) == record.get("file_crc32")


def candidate_files(out: Path) -> set[str]:
    """File names holding an unrecorded image's best attempt so far (they are no orphans)."""
    return {r["file_name"] for tried in read_attempts(out).values() for r in tried.values() if r.get("at_path")}


# ---------------------------------------------------------------------------------------------- rejected/

def rejected_name(file_name: str, attempt: int) -> str:
    """Where --keep-rejected writes a rejected attempt: rejected/<the image's folder>/<stem>-a<j>.<ext>."""
    path = Path(file_name)
    folder = path.parent.name
    return f"{REJECTED_DIR}/{folder}/{path.stem}-a{attempt}{path.suffix}"


def write_rejected_table(out: Path) -> Path | None:
    """OUT/rejected/metadata.parquet: one row per rejected attempt kept on disk, file_name relative to rejected/
    (so the folder loads as an imagefolder of its own), with every verified finding's score."""
    import pyarrow.parquet as pq

    from cxrgen.files import atomic_write

    out = Path(out)
    attempts = read_attempts(out)
    kept = read_records(out, ("attempt", "verified"))
    rows_out = []
    for image_id, tried in attempts.items():
        for j, record in sorted(tried.items()):
            if record.get("rejected_file"):
                rows_out.append((image_id, j, record, kept.get(image_id)))
    if not rows_out:
        return None
    names = sorted({p for _, _, r, _ in rows_out for p in (r.get("scores") or {})})
    table = pa.table({
        "image_id": pa.array([i for i, _, _, _ in rows_out], pa.string()),
        "attempt": pa.array([j for _, j, _, _ in rows_out], pa.int64()),
        "file_name": pa.array([r["rejected_file"][len(REJECTED_DIR) + 1:] for _, _, r, _ in rows_out], pa.string()),
        "seed": pa.array([r.get("seed") for _, _, r, _ in rows_out], pa.int64()),
        "prompt": pa.array([r.get("prompt") for _, _, r, _ in rows_out], pa.string()),
        "manifest_row": pa.array([r.get("manifest_row") for _, _, r, _ in rows_out], pa.int64()),
        "verify_score": pa.array([r.get("verify_score") for _, _, r, _ in rows_out], pa.float64()),
        "margin": pa.array([r.get("margin") for _, _, r, _ in rows_out], pa.float64()),
        "failed_negatives": pa.array([",".join(r.get("failed_negatives") or []) for _, _, r, _ in rows_out],
                                     pa.string()),
        # the attempt kept in images/ with verified = false, when every attempt was rejected
        "kept": pa.array([k is not None and k.get("attempt") == j and k.get("verified") is False
                          for _, j, _, k in rows_out], pa.bool_()),
        **{f"score_{n.replace(' ', '_')}": pa.array([(r.get("scores") or {}).get(n) for _, _, r, _ in rows_out],
                                                    pa.float64()) for n in names},
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    path = out / REJECTED_DIR / "metadata.parquet"
    atomic_write(path, buffer.getvalue())
    return path
