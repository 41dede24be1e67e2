"""`cxrgen manifest ...`: build manifests from a label table (from-labels) or from reports (from-reports)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrgen.cli.options import fail, local
from cxrgen.errors import CxrgenError

manifest_app = typer.Typer(
    help="Build manifests for `cxrgen generate`: class-balanced prompts from a label table (from-labels), or "
         "prompts cut from your own reports (from-reports). Pure Python; no torch or GPU needed.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)
Tokenizer = Annotated[Optional[str], typer.Option(
    "--tokenizer", help="Folder with the SD 2.x CLIP tokenizer files (or a text-encoder folder holding tokenizer/) "
    "used to check the 77-token limit. [default: the copy shipped with cxrgen]")]
ManifestOut = Annotated[Path, typer.Option("--out", "-o", parser=local("--out"),
                                           help="The manifest to write: .csv or .parquet.")]

def manifest_from_labels(
    labels: Annotated[Path, typer.Argument(metavar="LABELS", parser=local("LABELS"),
                                           help="Label table (CSV, TSV or Parquet): one row per "
                                           "real image, one "
                                           "column per finding holding 1, 0, -1 (uncertain) or blank.")],
    out: ManifestOut,
    findings: Annotated[Optional[str], typer.Option("--findings", help="Comma-separated finding columns to use "
                                                    "[default: every column named like a finding]")] = None,
    target: Annotated[Optional[int], typer.Option("--target", help="Every finding reaches N positives, real + "
                                                  "synthetic.")] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", help="R synthetic positives per real positive.")] = None,
    total: Annotated[Optional[int], typer.Option("--total", help="T images, the rarest findings filled first.")] = None,
    max_per_finding: Annotated[Optional[int], typer.Option("--max-per-finding", help="At most M synthetic "
                                                           "positives of any one finding.")] = None,
    normals: Annotated[int, typer.Option("--normals", help="N normal studies (No Finding) besides.")] = 0,
    max_findings: Annotated[int, typer.Option("--max-findings", help="Findings per prompt at most (1-3); "
                                              "combinations follow the table's co-occurrence.")] = 3,
    co_occurrence: Annotated[str, typer.Option("--co-occurrence", help="real: other findings join a prompt as often "
                                               "as in the table; needed: only findings still below their goal (common "
                                               "findings are not inflated).")] = "real",
    uncertain: Annotated[str, typer.Option("--uncertain", help="ignore: -1 is not a positive; positive: count -1 "
                                           "as positive (U-Ones).")] = "ignore",
    counts: Annotated[bool, typer.Option("--counts", help="LABELS is a table of counts: columns finding, positive "
                                         "(negative, uncertain, blank optional); single-finding prompts.")] = False,
    templates: Annotated[Optional[Path], typer.Option("--templates", parser=local("--templates"),
                                                      help="JSON template file replacing the "
                                                      "shipped set (format: docs/manifests.md).")] = None,
    tokenizer: Tokenizer = None,
    seed: Annotated[int, typer.Option(help="Seed of the draw; same input and seed give the same bytes.")] = 0,
) -> None:
    """Write a class-balanced manifest of report-style prompts from a real label table.

    Every row has id, prompt, num_images, one 0/1 column per finding (1: the prompt asserts it; 0: it does
    not) and template_id. Exit code 2 on bad input; nothing is written then.

    Example: cxrgen manifest from-labels train.csv --target 500 --normals 200 -o aug.csv
    """
    try:
        from cxrgen.manifests.from_labels import build_from_labels

        result = build_from_labels(
            labels, out, findings=[f for f in findings.split(",") if f.strip()] if findings else None, target=target,
            ratio=ratio, total=total, max_per_finding=max_per_finding, normals=normals, max_findings=max_findings,
            co_occurrence=co_occurrence, uncertain=uncertain, counts=counts, templates=templates, tokenizer=tokenizer,
            seed=seed)
    except CxrgenError as exc:
        fail(exc)
    what = "table of counts" if counts else "label table"
    typer.echo(f"{what}: {labels} ({result.labels.rows:,} images)" +
               (f"; not findings (ignored): {', '.join(result.labels.ignored)}" if result.labels.ignored else ""))
    width = max(len("finding"), *(len(row[0]) for row in result.table()))
    typer.echo(f"{'finding':<{width}}  {'real 1':>8}  {'real 0':>8}  {'real -1':>8}  {'blank':>8}  "
               f"{'synthetic 1':>11}  {'total 1':>8}")
    for column, pos, neg, unc, blank, made, total_pos in result.table():
        typer.echo(f"{column:<{width}}  {pos:>8,}  {neg:>8,}  {unc:>8,}  {blank:>8,}  {made:>11,}  {total_pos:>8,}")
    typer.echo(f"wrote {result.out}: {result.rows:,} rows, {result.images:,} images ({result.multi:,} with 2-3 "
               f"findings, {result.normals:,} normal)")
    for note in result.notes:
        typer.echo(f"note: {note}")


def manifest_from_reports(
    reports: Annotated[Path, typer.Argument(metavar="REPORTS", parser=local("REPORTS"),
                                            help="Table of reports (CSV, TSV or Parquet), one "
                                            "report per row.")],
    out: ManifestOut,
    text_column: Annotated[str, typer.Option("--text-column", help="Column with the report text; several, "
                                             "comma-separated (e.g. findings,impression), are joined.")] = "report",
    max_sentences: Annotated[int, typer.Option("--max-sentences", help="Consecutive sentences per prompt at most "
                                               "(all within 77 CLIP tokens).")] = 5,
    per_report: Annotated[int, typer.Option("--per-report", help="Prompts per report (different sentences where "
                                            "the report is long enough).")] = 1,
    num_images: Annotated[int, typer.Option("--num-images", help="Images per prompt (column num_images).")] = 1,
    tokenizer: Tokenizer = None,
    seed: Annotated[int, typer.Option(help="Seed choosing the sentences; same input and seed give the same "
                                      "bytes.")] = 0,
) -> None:
    """Write a manifest of prompts cut from your own reports, as the model's training prompts were made.

    Takes the FINDINGS and IMPRESSION sections (the whole text without headers when a report has neither), drops
    ___ / XXXX placeholders, and keeps up to --max-sentences consecutive sentences within 77 CLIP tokens. The
    table's other columns (labels, ids) are copied onto each prompt row.

    Example: cxrgen manifest from-reports reports.csv --text-column report -o prompts.csv
    """
    try:
        from cxrgen.manifests.from_reports import build_from_reports

        result = build_from_reports(reports, out, text_column=text_column, max_sentences=max_sentences,
                                    per_report=per_report, num_images=num_images, seed=seed, tokenizer=tokenizer)
    except CxrgenError as exc:
        fail(exc)
    typer.echo(f"wrote {result.out}: {result.prompts:,} prompts from {result.reports - len(result.skipped):,} of "
               f"{result.reports:,} reports" + (f"; columns copied: {', '.join(result.carried)}" if result.carried
                                                else ""))
    if result.skipped:
        rows = ", ".join(map(str, result.skipped[:10])) + (" ..." if len(result.skipped) > 10 else "")
        typer.echo(f"note: {len(result.skipped):,} report(s) gave no prompt (blank, or no sentence fits in 77 "
                   f"tokens): rows {rows}")
