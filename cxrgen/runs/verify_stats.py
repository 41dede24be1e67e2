"""What `--verify` cost and found, per finding: planned, verified, acceptance at the first attempt and overall,
attempts spent, the findings the model rarely draws at the threshold. Read from the run's journals, so `cxrgen
status`, the run summary, the dataset card and the gallery show the same figures, during a run and after it."""
from __future__ import annotations

from pathlib import Path

from cxrgen.runs.journal import read_records
from cxrgen.runs.verify import RARE, read_attempts


def verification_stats(out: Path, run: dict) -> dict | None:
    """The figures of a --verify run (None for a plain run); see the module docstring.

    acceptance of a finding: the share of judged attempts of images labelled positive for it in which it reached
    --min-score (the finding's own rate, so a hard finding stands out in multi-finding prompts).
    """
    block = run.get("settings", {}).get("verify")
    if block is None:
        return None
    described = run.get("verification", {})
    planned = dict(described.get("planned", {}))
    attempts = read_attempts(out)
    kept = read_records(out, ("attempt", "verified"))
    findings = {p: {"planned": n, "verified": 0, "unverified": 0, "attempts": 0, "first_tries": 0,
                    "first_passed": 0, "passed": 0} for p, n in planned.items()}
    made = sum(len(tried) for tried in attempts.values())
    for image_id, tried in attempts.items():
        first = tried[min(tried)]
        verdict = kept.get(image_id, {}).get("verified")
        for pathology in first.get("positives") or []:
            entry = findings.setdefault(pathology, {"planned": 0, "verified": 0, "unverified": 0, "attempts": 0,
                                                    "first_tries": 0, "first_passed": 0, "passed": 0})
            entry["verified"] += verdict is True
            entry["unverified"] += verdict is False
            for j, record in tried.items():
                shown = pathology in (record.get("passed") or [])
                entry["attempts"] += 1
                entry["passed"] += shown
                if j == 0:
                    entry["first_tries"] += 1
                    entry["first_passed"] += shown
    for entry in findings.values():
        entry["acceptance_first"] = entry["first_passed"] / entry["first_tries"] if entry["first_tries"] else None
        entry["acceptance"] = entry["passed"] / entry["attempts"] if entry["attempts"] else None
    verdicts = [r.get("verified") for r in kept.values()]
    not_judged = sum(v is None for v in verdicts)
    kept_count = len(verdicts)
    made += not_judged  # images made once, unverified; remade lost files are not counted
    return {
        "release": block.get("release"), "weights_file": block.get("weights_file"),
        "weights_sha256": block.get("weights_sha256"), "min_score": block.get("min_score"),
        "max_attempts": block.get("max_attempts"), "verify_negatives": block.get("verify_negatives"),
        "findings": findings,
        "rare": sorted(p for p, e in findings.items() if e["acceptance"] is not None and e["acceptance"] < RARE),
        "kept": kept_count, "verified": sum(v is True for v in verdicts), "unverified": sum(v is False for v in verdicts),
        "not_verified": not_judged, "not_verified_planned": described.get("not_verified_images"),
        "attempts": sum(len(tried) for tried in attempts.values()), "made": made,
        "rejected_negatives": sum(1 for tried in attempts.values() for r in tried.values() if r.get("failed_negatives")),
        "cost": made / kept_count if kept_count else None,
        "unverified_columns": described.get("unverified_columns", {}),
    }


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def stats_lines(stats: dict) -> list[str]:
    """The figures as lines for a terminal (status and the run summary)."""
    lines = [f"verified by {stats['release']} at --min-score {stats['min_score']:g}, up to {stats['max_attempts']} "
             f"attempt(s) per image{' (negatives too)' if stats['verify_negatives'] else ''}: "
             f"{stats['verified']} verified, {stats['unverified']} kept unverified (every attempt rejected: the best "
             f"one), {stats['not_verified']} not verified (no positive label the verifier knows)"]
    if stats["cost"] is not None:
        lines.append(f"retry cost: {stats['made']} image(s) made for {stats['kept']} kept "
                     f"({stats['cost']:.2f} per image)")
    width = max([len("finding")] + [len(p) for p in stats["findings"]])
    lines.append(f"{'finding':<{width}}  {'planned':>7}  {'verified':>8}  {'accept@0':>8}  {'accept':>6}  "
                 f"{'attempts':>8}")
    for pathology, e in stats["findings"].items():
        lines.append(f"{pathology:<{width}}  {e['planned']:>7}  {e['verified']:>8}  {_pct(e['acceptance_first']):>8}  "
                     f"{_pct(e['acceptance']):>6}  {e['attempts']:>8}")
    lines += rare_lines(stats)
    if stats["unverified_columns"]:
        lines.append("label columns not verified: " + "; ".join(f"{c} ({why})" for c, why in
                                                                stats["unverified_columns"].items()))
    return lines


def rare_lines(stats: dict) -> list[str]:
    """The warning about findings the model rarely draws at this threshold, with what to do about them."""
    if not stats["rare"]:
        return []
    return [f"rarely drawn at --min-score {stats['min_score']:g} (acceptance under {100 * RARE:.0f}%): "
            f"{', '.join(stats['rare'])}; rephrase their prompts (e.g. the report wording of the training data, a "
            "more specific location or size) or lower --min-score for a new run"]


def card_section(stats: dict) -> str:
    """The dataset card's "Verification" section (Markdown)."""
    lines = ["## Verification", "",
             f"Made with `cxrgen generate --verify`: every image whose row has a positive label was scored by the "
             f"torchxrayvision classifier `{stats['release']}` (weights `{stats['weights_file']}`, sha256 "
             f"`{stats['weights_sha256']}`) from its file, and made again with the next attempt's seed until every "
             f"positive label reached the calibrated score {stats['min_score']:g}"
             + (" and every finding labelled 0 stayed below it" if stats["verify_negatives"] else "")
             + f", up to {stats['max_attempts']} attempts. When every attempt was rejected the best one is kept with "
             "`verified = false`. Columns `attempt`, `verified` (null: not verified) and `verify_score` (the lowest "
             "score among the positive labels) of `metadata.parquet` say which image is which.", "",
             f"- verified: {stats['verified']}; kept unverified: {stats['unverified']}; not verified (no positive "
             f"label the verifier knows): {stats['not_verified']}",
             f"- images made: {stats['made']} for {stats['kept']} kept"
             + (f" ({stats['cost']:.2f} per image)" if stats["cost"] is not None else ""), "",
             "| finding | planned | verified | acceptance at attempt 0 | acceptance overall | attempts |",
             "|---|---|---|---|---|---|"]
    for pathology, e in stats["findings"].items():
        lines.append(f"| {pathology} | {e['planned']} | {e['verified']} | {_pct(e['acceptance_first'])} | "
                     f"{_pct(e['acceptance'])} | {e['attempts']} |")
    lines += ["", "Acceptance of a finding: the share of attempts at images labelled positive for it in which it "
              "reached the threshold. A score within float rounding of the threshold may come out on either side "
              "when the same run is made with another batch size, device or number of workers.", ""]
    lines += [f"**{line}**" for line in rare_lines(stats)] + ([""] if stats["rare"] else [])
    if stats["unverified_columns"]:
        lines += ["Label columns not verified: " + "; ".join(f"`{c}` ({why})" for c, why in
                                                             stats["unverified_columns"].items()) + ".", ""]
    lines += ["`cxrgen export OUT --verified-only` keeps only the verified images. Evaluating with the verifier's own "
              "weights makes `cxrgen evaluate`'s adherence figures circular; its default evaluator is another "
              "release.", ""]
    return "\n".join(lines)
