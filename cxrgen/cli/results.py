"""Commands that use a finished run: evaluate, reproduce, export and preview."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrgen.cli.options import (
    FinishedOut,
    Offline,
    Quiet,
    RunOut,
    Verbose,
    fail,
    local,
    location,
    stay_offline,
)
from cxrgen.config import default_cache_dir
from cxrgen.errors import CxrgenError


def evaluate(
    out: FinishedOut,
    real: Annotated[Optional[Path], typer.Option("--real", parser=local("--real"),
                                                 help="Real chest X-rays: a folder of PNG/JPEG files "
                                                 "(searched recursively) or a CSV/Parquet table with a path column "
                                                 "(relative to the table) and optional label columns.")] = None,
    label_map: Annotated[Optional[Path], typer.Option("--label-map", parser=local("--label-map"),
                                                      help="JSON object label column -> classifier "
                                                      "pathology; extends or overrides the built-in map.")] = None,
    min_score: Annotated[float, typer.Option("--min-score", help="Calibrated score a positive label must reach "
                                             "(0.5 = the classifier's operating point).")] = 0.5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per classifier call; 0 = 8 on CPU, "
                                            "64 on CUDA.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    evaluator_weights: Annotated[Optional[Path], typer.Option(
        "--evaluator-weights", parser=local("--evaluator-weights"),
        help="torchxrayvision densenet121-res224-all release file (default: downloaded once "
        "to $CXRGEN_HOME/torchxrayvision/).")] = None,
    evaluator_unsafe_pickle: Annotated[bool, typer.Option(
        "--evaluator-unsafe-pickle", help="Load a weight file that needs classes outside the allow-list with plain "
        "torch.load, as torchxrayvision does: this RUNS CODE FROM THE FILE; only for files you trust.")] = False,
    max_pairs: Annotated[int, typer.Option("--max-pairs", help="MS-SSIM pairs per set at most (0: skip).")] = 2000,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", parser=local("--cache-dir"),
                                                      help="Evaluator weights (torchxrayvision/) and "
                                                      "real-set features (eval-cache/) (default: $CXRGEN_HOME or "
                                                      "~/.cache/cxrgen).")] = None,
    quiet: Quiet = False, offline: Offline = False, verbose: Verbose = False,
) -> None:
    """Measure fidelity (FID/KID with --real), diversity (MS-SSIM) and label adherence of OUT, flag bad images.

    Writes OUT/quality/: scores.parquet (per-image scores, flags, accepted), summary.json and report.md
    with plots; metadata.parquet and the images are not changed. Needs `pip install "cxrgen[evaluate]"`.
    Exit codes: 0 done; 1 could not write; 2 bad input (unfinished run, empty real set, bad weights), nothing
    written.

    Example: cxrgen evaluate demo_out --real /data/mimic-cxr-sample
    """
    try:
        from cxrgen.evaluation.evaluate import EvalOptions, evaluate_run

        options = EvalOptions(
            out=location(out), real=str(real.resolve()) if real else None,
            label_map=str(label_map) if label_map else None, min_score=min_score, batch_size=batch_size,
            device=device, evaluator_weights=str(evaluator_weights) if evaluator_weights else None,
            unsafe_pickle=evaluator_unsafe_pickle, max_pairs=max_pairs,
            cache_dir=str(cache_dir or default_cache_dir(os.environ)), quiet=quiet,
            offline=stay_offline(offline, verbose),
        )
        result = evaluate_run(options)
    except CxrgenError as exc:
        fail(exc)
    if not quiet:
        for line in result.headline():
            typer.echo(line)


def reproduce(
    out: RunOut,
    image_id: Annotated[str, typer.Argument(metavar="IMAGE_ID", help="The image's id (column image_id of "
                                                                   "metadata.parquet).")],
    copy: Annotated[Optional[Path], typer.Option("--out", "-o", parser=local("--out"),
                                                 help="Also write the regenerated image to this "
                                                 "file (the run's format; outside OUT).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N (default: the kind of "
                                                  "device the image was made on).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Bundle folder, if the run's has moved (its checkpoints "
                                                 "must be the run's).")] = None,
    text_encoder: Annotated[Optional[str], typer.Option(help="Text encoder repo id or folder, if the run's has "
                                                        "moved.")] = None,
    offline: Offline = False, verbose: Verbose = False,
) -> None:
    """Regenerate one image of OUT from its metadata row and print how far it is from the stored file.

    Example: cxrgen reproduce demo_out demo-001_0000 --out demo-001_0000.jpg
    """
    try:
        from cxrgen.runs.reproduce import reproduce_image

        result = reproduce_image(location(out), image_id, device=device, output=copy, model=model, text_encoder=text_encoder,
                                 offline=stay_offline(offline, verbose))
    except CxrgenError as exc:
        fail(exc)
    typer.echo(f"image:      {result.image_id} ({result.stored})")
    typer.echo(f"remade on:  {result.device}, {result.dtype}, alone (batch of 1)")
    typer.echo(f"max diff:   {result.max_abs_diff} gray level(s)")
    typer.echo(f"mean diff:  {result.mean_abs_diff:.6f} gray levels")
    typer.echo(f"identical:  {100 * result.identical_fraction:.4f}% of pixels")
    typer.echo(f"same bytes: {'yes' if result.same_bytes else 'no'}")
    if result.output is not None:
        typer.echo(f"written:    {result.output}")


def export(
    out: FinishedOut,
    to: Annotated[str, typer.Option("--to", help="Folder to create (new or empty, outside OUT), or an empty "
                                    "object-store prefix such as s3://bucket/shards (webdataset).")],
    format: Annotated[str, typer.Option("--format", help="webdataset (tar shards of <key>.jpg|png + <key>.json) "
                                        "or imagefolder (hard-linked images + metadata.parquet).")] = "webdataset",
    shard_size: Annotated[str, typer.Option("--shard-size", help="webdataset: bytes per shard at most, e.g. 1GB, "
                                            "500MB, 2GiB.")] = "1GB",
    accepted_only: Annotated[bool, typer.Option("--accepted-only", help="Only the images `cxrgen evaluate OUT` "
                                                "accepted.")] = False,
    verified_only: Annotated[bool, typer.Option("--verified-only", help="Only the images `cxrgen generate --verify` "
                                                "verified (column verified is true).")] = False,
) -> None:
    """Export the images and metadata of OUT as WebDataset shards or as an imagefolder copy.

    Shards are named train-000000.tar, ... in plan order; each sample is <key>.jpg (or .png) plus <key>.json,
    the image's metadata row with its labels. Exit codes: 0 done; 1 could not write; 2 bad input, nothing written.

    Example: cxrgen export demo_out --format webdataset --to demo_shards --shard-size 500MB
    """
    try:
        from cxrgen.publish.export import ExportOptions, export_run, parse_size

        result = export_run(ExportOptions(out=location(out), to=location(to), format=format, shard_size=parse_size(shard_size),
                                          accepted_only=accepted_only,
                                          verified_only=verified_only))
    except CxrgenError as exc:
        fail(exc)
    what = f"{len(result.files)} shard(s)" if result.format == "webdataset" else "an imagefolder"
    typer.echo(f"wrote {what} with {result.images} of {result.total} image(s) to {result.to}")


def preview(
    out: FinishedOut,
    thumb_size: Annotated[int, typer.Option("--thumb-size", help="Longest side of thumbnails and contact-sheet "
                                            "tiles, in pixels (16-1024).")] = 128,
    per_sheet: Annotated[int, typer.Option("--per-sheet", help="Images per contact sheet at most; a prompt with "
                                           "more gets several sheets.")] = 100,
    columns: Annotated[int, typer.Option("--columns", help="Tiles per row of a contact sheet.")] = 10,
) -> None:
    """Write OUT/preview/: one contact-sheet PNG per prompt and index.html, a gallery to open in a browser.

    The gallery works from the file system (no server): thumbnails grouped by prompt, a filter over prompt
    text and label values, each image's parameters, labels and (after `cxrgen evaluate`) scores and flags on
    click. Thumbnails and sheets are remade only when their images changed. Exit codes: 0 done; 1 could not
    write; 2 bad input (unfinished run, not a run folder), nothing written.

    Example: cxrgen preview demo_out, then open demo_out/preview/index.html
    """
    try:
        from cxrgen.publish.preview import build_preview

        result = build_preview(out, thumb_size=thumb_size, per_sheet=per_sheet, columns=columns)
    except CxrgenError as exc:
        fail(exc)
    typer.echo(f"{result.images} image(s), {result.prompts} prompt(s), {len(result.sheets)} contact sheet(s); "
               f"thumbnails: {result.thumbs_made} made, {result.thumbs_kept} up to date"
               + (f", {len(result.unreadable)} unreadable (e.g. {result.unreadable[0]})" if result.unreadable else ""))
    typer.echo(f"open {result.index.resolve().as_uri()}")
