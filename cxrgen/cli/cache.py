"""Commands for the model cache: download (stage the files a run needs) and info (what is staged)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrgen.cli.options import CacheDir, Offline, Quiet, Verbose, fail, stay_offline
from cxrgen.config import default_cache_dir
from cxrgen.errors import CxrgenError
from cxrgen.pins import DEFAULT_MODEL, DEFAULT_TEXT_ENCODER


def download(
    model: Annotated[str, typer.Option(help="Bundle name, optionally NAME@VERSION (default version: the pinned "
                                       "one).")] = DEFAULT_MODEL,
    text_encoder: Annotated[str, typer.Option(help="Hugging Face repo id, optionally REPO@REVISION.")]
    = DEFAULT_TEXT_ENCODER,
    evaluator: Annotated[bool, typer.Option("--evaluator", help="Also the torchxrayvision weights of `cxrgen "
                                            "evaluate` (needs the evaluate extra).")] = False,
    verifier: Annotated[bool, typer.Option("--verifier", help="Also the weights of `cxrgen generate --verify` "
                                           "(densenet121-res224-chex; needs the evaluate extra).")] = False,
    verifier_weights: Annotated[Optional[str], typer.Option(
        "--verifier-weights", help="Stage this torchxrayvision DenseNet release for --verify instead of the "
        "default (e.g. nih, pc, all).")] = None,
    demo: Annotated[Optional[Path], typer.Option("--demo", metavar="DIR", help="Download nothing: write the demo "
                                                 "model (tiny, random weights: its images are NOISE) and a demo "
                                                 "manifest into DIR, to check an install, GPU, cluster launch or "
                                                 "gallery in a minute.")] = None,
    cache_dir: CacheDir = None, quiet: Quiet = False, offline: Offline = False, verbose: Verbose = False,
) -> None:
    """Stage the bundle and text encoder (and with --evaluator / --verifier the classifiers' weights) in the cache,
    for offline use.

    Fetches only the files a run reads, at pinned versions, and verifies them (md5 of the checkpoints,
    sizes, sha256). Hub files are transferred by huggingface_hub (HF_ENDPOINT, HF_TOKEN, its retries and
    Xet transfers); a copy already in your Hugging Face cache is used instead. A bundle the hub lacks comes
    from NVIDIA's hosting zip, which resumes a cut download. Safe to start on many ranks at once: one
    downloads, the others wait. With --offline it only reports what is there and what is missing. Exit
    codes: 0 everything is staged; 2 something could not be fetched (or, offline, is missing).

    Example: cxrgen download --evaluator --verifier   (on a login node; then copy or share $CXRGEN_HOME)

    Example: cxrgen download --demo demo_model   (no download; prints the commands that try it)
    """
    if demo is not None:
        return _demo(demo, evaluator, quiet)
    try:
        from cxrgen.hub.info import download as stage_all

        offline = stay_offline(offline, verbose)
        report = stage_all(cache_dir or default_cache_dir(os.environ), model, text_encoder, evaluator,
                           verifier=verifier_weights or ("" if verifier else None), offline=offline,
                           progress=not quiet, log=lambda line: typer.echo(line, err=True))
    except CxrgenError as exc:
        fail(exc)
    if not quiet or report.problem():
        for line in report.lines():
            typer.echo(line)
    if report.problem():
        fail(report.problem())


def _demo(folder: Path, evaluator: bool, quiet: bool) -> None:
    try:
        if evaluator:
            from cxrgen.errors import InputError

            raise InputError("--demo downloads nothing, so --evaluator does not apply; run `cxrgen download "
                             "--evaluator` on its own for the evaluator's weights")
        from cxrgen.hub.download import quiet_library_logs
        from cxrgen.model.demo import NOISE, write_demo

        quiet_library_logs()  # transformers' "Writing model shards" bar is not ours to show
        kit = write_demo(folder)
    except CxrgenError as exc:
        fail(exc)
    if quiet:
        return
    typer.echo(f"wrote the {NOISE}:")
    typer.echo(f"  bundle:       {kit.bundle}\n  text encoder: {kit.text_encoder}\n  manifest:     {kit.manifest}")
    out = kit.root / "out"
    typer.echo("try the pipeline (a minute on a CPU):")
    for line in (f"cxrgen generate {_q(kit.manifest)} --model {_q(kit.bundle)} --text-encoder {_q(kit.text_encoder)} "
                 f"--out {_q(out)}", f"cxrgen status {_q(out)}", f"cxrgen preview {_q(out)}",
                 f"cxrgen export {_q(out)} --format webdataset --to {_q(kit.root / 'shards')}"):
        typer.echo(f"  {line}")


def _q(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def info(
    model: Annotated[str, typer.Option(help="Bundle name (NAME@VERSION) a run would use.")] = DEFAULT_MODEL,
    text_encoder: Annotated[str, typer.Option(help="Text encoder repo (REPO@REVISION) a run would use.")]
    = DEFAULT_TEXT_ENCODER,
    evaluator: Annotated[bool, typer.Option("--evaluator", help="Require the evaluator's weights too.")] = False,
    verifier: Annotated[bool, typer.Option("--verifier", help="Require the default verifier's weights too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    cache_dir: CacheDir = None, offline: Offline = False,
) -> None:
    """Show what the cache holds for a run: each file with its size and verified / missing / corrupt.

    Never uses the network (--offline is accepted for symmetry). Exit codes: 0 everything a run needs is
    staged and verifies; 1 something is missing or corrupt (the report names the download command).

    Example: cxrgen info --evaluator
    """
    try:
        import json

        from cxrgen.hub.info import cache_report

        report = cache_report(cache_dir or default_cache_dir(os.environ), model, text_encoder, evaluator,
                              "" if verifier else None)
    except CxrgenError as exc:
        fail(exc)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else "\n".join(report.lines()))
    if not report.complete:
        raise typer.Exit(1)
