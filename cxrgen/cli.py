"""The cxrgen command line: collect options, build one RunConfig, call one library function."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrgen import __version__
from cxrgen.config import DEFAULT_MODEL, DEFAULT_TEXT_ENCODER, RunConfig, default_cache_dir, offline_from_env
from cxrgen.errors import CxrgenError
from cxrgen.workers import rank_from_env

app = typer.Typer(
    help="Turn a table of radiology-report sentences into a labelled synthetic chest X-ray dataset "
         "(research use only, not for clinical use).\n\n"
         "Example: cxrgen generate manifests/demo.csv --out demo_out, then cxrgen status demo_out",
    # Plain click help: rich's tables label every flag <bool>, as if it took a value, and eat [defaults]
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)

# Options shared by generate and resume: speed options, which never change which images exist or their
# seeds (float rounding of batched kernels aside: README, "What a resume gives").
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per UNet call; 0 picks one for the device.")]
DecodeBatch = Annotated[int, typer.Option("--decode-batch-size", help="Latents per decoder call; 0 = 1 on CPU, "
                                          "8 on CUDA.")]
Device = Annotated[str, typer.Option("--device", "--devices", help="auto (every visible GPU, else CPU), cpu, "
                                     "cuda:N, or a list such as cuda:0,cuda:2 (one worker per device).")]
Workers = Annotated[int, typer.Option("--workers", help="Worker processes on this machine (CPU: N processes).")]
ChannelsLast = Annotated[bool, typer.Option("--channels-last", help="channels_last UNet (CUDA speed option).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (compile time reported apart).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
RankWait = Annotated[Optional[float], typer.Option(
    "--rank-wait", help="Under torchrun/srun: seconds a rank whose share is done waits at least for the other "
    "ranks to start before it concludes they stopped. [default: 60]")]
Shard = Annotated[Optional[str], typer.Option(
    "--shard", help="I/N: make only the images whose plan index modulo N is I (one task of an array job; "
    "read from SLURM_ARRAY_TASK_ID/_COUNT, JOB_COMPLETION_INDEX or AWS_BATCH_JOB_ARRAY_INDEX/_SIZE when "
    "not given). Shards share OUT; the last to finish writes metadata.parquet.")]
Shards = Annotated[Optional[int], typer.Option(
    "--shards", help="Number of shards N of a Kubernetes Indexed Job (JOB_COMPLETION_INDEX gives I); "
    "default $CXRGEN_SHARDS.")]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Bundle download cache "
                                                  "(default: $CXRGEN_HOME or ~/.cache/cxrgen).")]
# What generate and plan (its dry run) spell the same way: the manifest and the per-row defaults.
ManifestArg = Annotated[Path, typer.Argument(metavar="MANIFEST", help="CSV, TSV or Parquet file with a prompt "
                                             "column.")]
ManifestFormat = Annotated[str, typer.Option(help="auto, csv, tsv or parquet.")]
PromptColumn = Annotated[str, typer.Option(help="Column holding the report sentence.")]
AllowEmptyPrompt = Annotated[bool, typer.Option("--allow-empty-prompt", help="Blank prompts make unconditional "
                                                "samples.")]
NumImages = Annotated[int, typer.Option(help="Images per row (column num_images overrides).")]
GuidanceScale = Annotated[float, typer.Option(help="Classifier-free guidance (column overrides).")]
NegativePrompt = Annotated[str, typer.Option(help="Unconditional prompt (column overrides).")]
Seed = Annotated[int, typer.Option(help="Base seed of the run (column seed overrides).")]
FinishedOut = Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of a finished run (holds "
                                             "metadata.parquet).")]
Offline = Annotated[bool, typer.Option("--offline", help="Never touch the network (also HF_HUB_OFFLINE=1): models "
                                       "must be staged with `cxrgen download` or given as folders.")]
Verbose = Annotated[bool, typer.Option("--verbose", help="Let MONAI, transformers and huggingface_hub print their "
                                       "own log lines.")]


def _network(offline: bool, verbose: bool) -> bool:
    """Whether to stay offline (--offline or HF_HUB_OFFLINE, read here at the boundary); quiets library logs."""
    from cxrgen.download import quiet_library_logs

    quiet_library_logs(verbose)
    return offline or offline_from_env(os.environ)


def _fail(exc: CxrgenError) -> None:
    # one line even when the message quotes a multi-line value (a wrapped spreadsheet header, say)
    typer.echo(f"cxrgen: error: {' '.join(str(exc).splitlines())}", err=True)
    raise typer.Exit(exc.exit_code)


def _interrupted(out) -> None:
    from cxrgen.store import resume_command

    if out is not None and (Path(out) / "run.json").is_file():
        typer.echo(f"cxrgen: interrupted; finished images are kept: `{resume_command(out)}` continues", err=True)
    else:  # stopped before the run was recorded: there is nothing to resume yet
        typer.echo("cxrgen: interrupted before the run started; nothing was recorded: run the same "
                   "`cxrgen generate` command again", err=True)
    raise typer.Exit(130)


def _exit_for(result, share) -> None:
    """Exit 3 when images are missing that nobody is making (never a silent 0 on an incomplete run).

    A shard of an array job whose own images are all done exits 0 even while other shards' images are
    missing: schedulers retry or fail array tasks that exit non-zero, and the other shards come later.
    """
    from cxrgen.errors import INCOMPLETE_EXIT_CODE

    shard_done = share is not None and share.shard is not None and result.share_complete
    if not (result.complete or shard_done):
        raise typer.Exit(INCOMPLETE_EXIT_CODE)


def _share(shard: Optional[str], shards: Optional[int]):
    """This process's part of the plan from --shard, an array job's variables and launcher ranks."""
    from cxrgen.workers import parse_shard, shard_from_env, share_of

    return share_of(parse_shard(shard) if shard else shard_from_env(os.environ, shards), rank_from_env(os.environ))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cxrgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """cxrgen: synthetic chest X-rays from report sentences, reproducible and resumable."""


@app.command()
def generate(
    manifest: ManifestArg,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: beside the "
                                                "manifest, named after it).")] = None,
    manifest_format: ManifestFormat = "auto",
    prompt_column: PromptColumn = "prompt",
    allow_empty_prompt: AllowEmptyPrompt = False,
    model: Annotated[str, typer.Option(help="Bundle folder, or bundle name to download once.")] = DEFAULT_MODEL,
    text_encoder: Annotated[str, typer.Option(help="Hugging Face repo id or local folder with tokenizer/ "
                                              "and text_encoder/.")] = DEFAULT_TEXT_ENCODER,
    num_images: NumImages = 1,
    guidance_scale: GuidanceScale = 7.0,
    negative_prompt: NegativePrompt = "",
    seed: Seed = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps (num_inference_steps); the model card uses 50, "
                                       "--scheduler dpmpp2m needs fewer (e.g. 20).")] = 50,
    scheduler: Annotated[str, typer.Option(help="ddim (the model card's) or dpmpp2m (DPM-Solver++(2M)).")] = "ddim",
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, "
                                       "float16 (or fp32, bf16, fp16).")] = "auto",
    image_format: Annotated[str, typer.Option(help="jpg or png (lossless).")] = "jpg",
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality, 1-95.")] = 95,
    file_names: Annotated[str, typer.Option(help="index: images/00000/00000042.jpg (safe for every loader); "
                                            "id: images/00000/<image_id>.jpg (an id such as test-3 then "
                                            "reads as a split to datasets' imagefolder).")] = "index",
    batch_size: BatchSize = 0, decode_batch_size: DecodeBatch = 0, device: Device = "auto",
    workers: Workers = 1, channels_last: ChannelsLast = False, compile: Compile = False,
    cache_dir: CacheDir = None, shard: Shard = None, shards: Shards = None, rank_wait: RankWait = None,
    quiet: Quiet = False, offline: Offline = False, verbose: Verbose = False,
) -> None:
    """Generate one image per (row, sample) of MANIFEST into OUT, with metadata.parquet and run.json.

    Running it again with the same manifest and settings resumes an interrupted run. Exit codes: 0 the run
    is complete; 1 it failed (resumable); 2 bad input, nothing written; 3 this rank's share is done but
    other ranks stopped with images left (resume); 130/143 stopped by SIGINT/SIGTERM (resumable).

    Example: cxrgen generate manifests/demo.csv --out demo_out --steps 50 --batch-size 8
    """
    try:
        from cxrgen.run import generate as run_generate

        # beside the manifest, named after it; a manifest without a suffix must not be its own output folder
        out = out or (manifest.with_suffix("") if manifest.suffix else manifest.with_name(manifest.name + "_out"))
        config = RunConfig(
            manifest=str(manifest.resolve()), out=str(out.resolve()), manifest_format=manifest_format,
            prompt_column=prompt_column, allow_empty_prompt=allow_empty_prompt, model=model,
            text_encoder=text_encoder, cache_dir=str(cache_dir or default_cache_dir(os.environ)),
            num_images=num_images, guidance_scale=guidance_scale, negative_prompt=negative_prompt, seed=seed,
            steps=steps, scheduler=scheduler, batch_size=batch_size, decode_batch_size=decode_batch_size,
            device=device, dtype=dtype, channels_last=channels_last, compile=compile, image_format=image_format,
            jpeg_quality=jpeg_quality, file_names=file_names, workers=workers, quiet=quiet, verbose=verbose,
            offline=_network(offline, verbose),
            **({} if rank_wait is None else {"rank_wait": rank_wait}),
        )
        share = _share(shard, shards)
        result = run_generate(config, rank=share)
    except CxrgenError as exc:
        _fail(exc)
    except KeyboardInterrupt:  # Ctrl-C while models load or metadata merges: nothing is lost
        _interrupted(out)
    _exit_for(result, share)


@app.command()
def resume(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of an earlier run (holds run.json).")],
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per UNet call; 0 picks one "
                                                      "for the device. [default: the saved value]")] = None,
    decode_batch_size: Annotated[Optional[int], typer.Option("--decode-batch-size", help="Latents per decoder "
                                                             "call; 0 = 1 on CPU, 8 on CUDA. [default: the saved "
                                                             "value]")] = None,
    device: Annotated[Optional[str], typer.Option("--device", "--devices", help="auto, cpu, cuda:N or a list "
                                                  "cuda:0,cuda:2. [default: the saved value]")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Worker processes on this machine. "
                                                   "[default: the saved value]")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Bundle download cache. [default: the "
                                                      "saved value]")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Re-read, checksum and decode every recorded image "
                                         "first and remake damaged ones (slow on big runs; by default one "
                                         "file-size check each).")] = False,
    shard: Shard = None, shards: Shards = None, rank_wait: RankWait = None, quiet: Quiet = False,
    offline: Offline = False, verbose: Verbose = False,
) -> None:
    """Finish an interrupted run with the settings saved in OUT/run.json.

    Every option left out keeps its saved value; only speed options can be given, because the others
    change pixels. Refuses when the manifest or a pixel-changing setting differs from the saved run.
    Exit codes as for generate (3: this rank's share is done, other ranks stopped with images left).

    Example: cxrgen resume demo_out --batch-size 8
    """
    try:
        from cxrgen.run import resume as run_resume

        share = _share(shard, shards)
        result = run_resume(out, rank=share, batch_size=batch_size,
                            decode_batch_size=decode_batch_size, device=device, workers=workers,
                            cache_dir=str(cache_dir.resolve()) if cache_dir else None, rank_wait=rank_wait,
                            verify=verify, quiet=quiet, verbose=verbose, offline=_network(offline, verbose))
    except CxrgenError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted(out)
    _exit_for(result, share)


@app.command()
def status(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of a run.")],
    finalize: Annotated[bool, typer.Option("--finalize", help="Write metadata.parquet if every image is done "
                                           "but no process merged the records (e.g. a rank died).")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Re-read, checksum and decode every recorded image "
                                         "(finds damaged files of the right size; slow on big runs).")] = False,
) -> None:
    """Show planned, done and remaining images of OUT and any damaged or orphaned files.

    Exit code 0 when complete, 1 when work remains, 2 when OUT is not a cxrgen run.

    Example: cxrgen status demo_out
    """
    try:
        from cxrgen.state import inspect_run
        from cxrgen.store import resume_command

        report = inspect_run(out, verify=verify)
        if finalize and report.remaining == 0 and not report.finalized:
            from cxrgen.run import finalize_run

            finalize_run(out)
            report = inspect_run(out, verify=verify)
        elif finalize and report.remaining > 0:
            typer.echo(f"cannot finalize: {report.remaining} image(s) are not done yet; make them with "
                       f"`{resume_command(report.out)}` (it writes metadata.parquet at the end)", err=True)
    except CxrgenError as exc:
        _fail(exc)
    typer.echo(f"run:       {report.out}")
    typer.echo(f"planned:   {report.planned}")
    typer.echo(f"done:      {report.done}")
    typer.echo(f"remaining: {report.remaining}")
    typer.echo(f"metadata:  {'complete' if report.finalized else 'not written yet'}")
    for label, names in (("recorded but missing or unreadable", report.missing_files),
                         ("files with no record", report.orphaned_files), ("temporary files", report.temp_files)):
        if names:
            typer.echo(f"{label}: {len(names)} (e.g. {names[0]})")
    if not report.complete:
        typer.echo(f"resume with: {resume_command(report.out)}")
        raise typer.Exit(1)


@app.command()
def evaluate(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of a finished run.")],
    real: Annotated[Optional[Path], typer.Option("--real", help="Real chest X-rays: a folder of PNG/JPEG files "
                                                 "(searched recursively) or a CSV/Parquet table with a path column "
                                                 "(relative to the table) and optional label columns.")] = None,
    label_map: Annotated[Optional[Path], typer.Option("--label-map", help="JSON object label column -> classifier "
                                                      "pathology; extends or overrides the built-in map.")] = None,
    min_score: Annotated[float, typer.Option("--min-score", help="Calibrated score a positive label must reach "
                                             "(0.5 = the classifier's operating point).")] = 0.5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per classifier call; 0 = 8 on CPU, "
                                            "64 on CUDA.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    evaluator_weights: Annotated[Optional[Path], typer.Option(
        "--evaluator-weights", help="torchxrayvision densenet121-res224-all release file (default: downloaded once "
        "to $CXRGEN_HOME/torchxrayvision/).")] = None,
    evaluator_unsafe_pickle: Annotated[bool, typer.Option(
        "--evaluator-unsafe-pickle", help="Load a weight file that needs classes outside the allow-list with plain "
        "torch.load, as torchxrayvision does: this RUNS CODE FROM THE FILE; only for files you trust.")] = False,
    max_pairs: Annotated[int, typer.Option("--max-pairs", help="MS-SSIM pairs per set at most (0: skip).")] = 2000,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Evaluator weights (torchxrayvision/) and "
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
        from cxrgen.evaluate import EvalOptions, evaluate_run

        options = EvalOptions(
            out=str(out.resolve()), real=str(real.resolve()) if real else None,
            label_map=str(label_map) if label_map else None, min_score=min_score, batch_size=batch_size,
            device=device, evaluator_weights=str(evaluator_weights) if evaluator_weights else None,
            unsafe_pickle=evaluator_unsafe_pickle, max_pairs=max_pairs,
            cache_dir=str(cache_dir or default_cache_dir(os.environ)), quiet=quiet,
            offline=_network(offline, verbose),
        )
        result = evaluate_run(options)
    except CxrgenError as exc:
        _fail(exc)
    if not quiet:
        for line in result.headline():
            typer.echo(line)


@app.command()
def reproduce(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of a run.")],
    image_id: Annotated[str, typer.Argument(metavar="IMAGE_ID", help="The image's id (column image_id of "
                                                                   "metadata.parquet).")],
    copy: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the regenerated image to this "
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
        from cxrgen.reproduce import reproduce_image

        result = reproduce_image(out, image_id, device=device, output=copy, model=model, text_encoder=text_encoder,
                                 offline=_network(offline, verbose))
    except CxrgenError as exc:
        _fail(exc)
    typer.echo(f"image:      {result.image_id} ({result.stored})")
    typer.echo(f"remade on:  {result.device}, {result.dtype}, alone (batch of 1)")
    typer.echo(f"max diff:   {result.max_abs_diff} gray level(s)")
    typer.echo(f"mean diff:  {result.mean_abs_diff:.6f} gray levels")
    typer.echo(f"identical:  {100 * result.identical_fraction:.4f}% of pixels")
    typer.echo(f"same bytes: {'yes' if result.same_bytes else 'no'}")
    if result.output is not None:
        typer.echo(f"written:    {result.output}")


@app.command()
def export(
    out: FinishedOut,
    to: Annotated[Path, typer.Option("--to", help="Folder to create (new or empty, outside OUT).")],
    format: Annotated[str, typer.Option("--format", help="webdataset (tar shards of <key>.jpg|png + <key>.json) "
                                        "or imagefolder (hard-linked images + metadata.parquet).")] = "webdataset",
    shard_size: Annotated[str, typer.Option("--shard-size", help="webdataset: bytes per shard at most, e.g. 1GB, "
                                            "500MB, 2GiB.")] = "1GB",
    accepted_only: Annotated[bool, typer.Option("--accepted-only", help="Only the images `cxrgen evaluate OUT` "
                                                "accepted.")] = False,
) -> None:
    """Export the images and metadata of OUT as WebDataset shards or as an imagefolder copy.

    Shards are named train-000000.tar, ... in plan order; each sample is <key>.jpg (or .png) plus <key>.json,
    the image's metadata row with its labels. Exit codes: 0 done; 1 could not write; 2 bad input, nothing written.

    Example: cxrgen export demo_out --format webdataset --to demo_shards --shard-size 500MB
    """
    try:
        from cxrgen.export import ExportOptions, export_run, parse_size

        result = export_run(ExportOptions(out=str(out), to=str(to), format=format, shard_size=parse_size(shard_size),
                                          accepted_only=accepted_only))
    except CxrgenError as exc:
        _fail(exc)
    what = f"{len(result.files)} shard(s)" if result.format == "webdataset" else "an imagefolder"
    typer.echo(f"wrote {what} with {result.images} of {result.total} image(s) to {result.to}")


@app.command()
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
        from cxrgen.preview import build_preview

        result = build_preview(out, thumb_size=thumb_size, per_sheet=per_sheet, columns=columns)
    except CxrgenError as exc:
        _fail(exc)
    typer.echo(f"{result.images} image(s), {result.prompts} prompt(s), {len(result.sheets)} contact sheet(s); "
               f"thumbnails: {result.thumbs_made} made, {result.thumbs_kept} up to date"
               + (f", {len(result.unreadable)} unreadable (e.g. {result.unreadable[0]})" if result.unreadable else ""))
    typer.echo(f"open {result.index.resolve().as_uri()}")


manifest_app = typer.Typer(
    help="Build manifests for `cxrgen generate`: class-balanced prompts from a label table (from-labels), or "
         "prompts cut from your own reports (from-reports). Pure Python; no torch or GPU needed.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)
app.add_typer(manifest_app, name="manifest")
Tokenizer = Annotated[Optional[str], typer.Option(
    "--tokenizer", help="Folder with the SD 2.x CLIP tokenizer files (or a text-encoder folder holding tokenizer/) "
    "used to check the 77-token limit. [default: the copy shipped with cxrgen]")]
ManifestOut = Annotated[Path, typer.Option("--out", "-o", help="The manifest to write: .csv or .parquet.")]


@manifest_app.command("from-labels")
def manifest_from_labels(
    labels: Annotated[Path, typer.Argument(metavar="LABELS", help="Label table (CSV, TSV or Parquet): one row per "
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
    templates: Annotated[Optional[Path], typer.Option("--templates", help="JSON template file replacing the "
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
        from cxrgen.prompts import build_from_labels

        result = build_from_labels(
            labels, out, findings=[f for f in findings.split(",") if f.strip()] if findings else None, target=target,
            ratio=ratio, total=total, max_per_finding=max_per_finding, normals=normals, max_findings=max_findings,
            co_occurrence=co_occurrence, uncertain=uncertain, counts=counts, templates=templates, tokenizer=tokenizer,
            seed=seed)
    except CxrgenError as exc:
        _fail(exc)
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


@manifest_app.command("from-reports")
def manifest_from_reports(
    reports: Annotated[Path, typer.Argument(metavar="REPORTS", help="Table of reports (CSV, TSV or Parquet), one "
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
        from cxrgen.reports import build_from_reports

        result = build_from_reports(reports, out, text_column=text_column, max_sentences=max_sentences,
                                    per_report=per_report, num_images=num_images, seed=seed, tokenizer=tokenizer)
    except CxrgenError as exc:
        _fail(exc)
    typer.echo(f"wrote {result.out}: {result.prompts:,} prompts from {result.reports - len(result.skipped):,} of "
               f"{result.reports:,} reports" + (f"; columns copied: {', '.join(result.carried)}" if result.carried
                                                else ""))
    if result.skipped:
        rows = ", ".join(map(str, result.skipped[:10])) + (" ..." if len(result.skipped) > 10 else "")
        typer.echo(f"note: {len(result.skipped):,} report(s) gave no prompt (blank, or no sentence fits in 77 "
                   f"tokens): rows {rows}")


_IGNORED = "Accepted so that a generate command line works unchanged; plan ignores it."


@app.command()
def plan(
    manifest: ManifestArg,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder generate would use (default: "
                                                "beside the manifest, named after it).")] = None,
    manifest_format: ManifestFormat = "auto",
    prompt_column: PromptColumn = "prompt",
    allow_empty_prompt: AllowEmptyPrompt = False,
    text_encoder: Annotated[str, typer.Option(help="Hugging Face repo id or local folder; its tokenizer counts the "
                                              "tokens (the default's is shipped with cxrgen).")] = DEFAULT_TEXT_ENCODER,
    num_images: NumImages = 1,
    guidance_scale: GuidanceScale = 7.0,
    negative_prompt: NegativePrompt = "",
    seed: Seed = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps; the estimate scales with them.")] = 50,
    scheduler: Annotated[str, typer.Option(help="ddim or dpmpp2m.")] = "ddim",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16 (or fp32, bf16, fp16).")] = "auto",
    image_format: Annotated[str, typer.Option(help="jpg or png.")] = "jpg",
    batch_size: BatchSize = 0, device: Device = "auto", workers: Workers = 1,
    show_all: Annotated[bool, typer.Option("--show-all", help="List every truncated and duplicate prompt.")] = False,
    model: Annotated[str, typer.Option(hidden=True, help=_IGNORED)] = DEFAULT_MODEL,
    jpeg_quality: Annotated[int, typer.Option(hidden=True, help=_IGNORED)] = 95,
    file_names: Annotated[str, typer.Option(hidden=True, help=_IGNORED)] = "index",
    decode_batch_size: Annotated[int, typer.Option("--decode-batch-size", hidden=True, help=_IGNORED)] = 0,
    channels_last: Annotated[bool, typer.Option("--channels-last", hidden=True, help=_IGNORED)] = False,
    compile: Annotated[bool, typer.Option("--compile", hidden=True, help=_IGNORED)] = False,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", hidden=True, help=_IGNORED)] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", hidden=True, help=_IGNORED)] = None,
    shards: Annotated[Optional[int], typer.Option("--shards", hidden=True, help=_IGNORED)] = None,
    rank_wait: Annotated[Optional[float], typer.Option("--rank-wait", hidden=True, help=_IGNORED)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", hidden=True, help=_IGNORED)] = False,
) -> None:
    """Dry run of generate: rows, images, images per label value, truncated and duplicate prompts, and a run-time
    estimate. Takes generate's options; writes nothing, loads no model, needs no torch.

    Example: cxrgen plan aug.csv --steps 50 --device cuda
    """
    try:
        from cxrgen.dryrun import plan_run

        out = out or (manifest.with_suffix("") if manifest.suffix else manifest.with_name(manifest.name + "_out"))
        config = RunConfig(
            manifest=str(manifest), out=str(out.resolve()), manifest_format=manifest_format,
            prompt_column=prompt_column, allow_empty_prompt=allow_empty_prompt, text_encoder=text_encoder,
            num_images=num_images, guidance_scale=guidance_scale, negative_prompt=negative_prompt, seed=seed,
            steps=steps, scheduler=scheduler, batch_size=batch_size, device=device, dtype=dtype,
            image_format=image_format, workers=workers)
        report = plan_run(config)
    except CxrgenError as exc:
        _fail(exc)
    for line in report.lines(show_all):
        typer.echo(line)


@app.command()
def download(
    model: Annotated[str, typer.Option(help="Bundle name, optionally NAME@VERSION (default version: the pinned "
                                       "one).")] = DEFAULT_MODEL,
    text_encoder: Annotated[str, typer.Option(help="Hugging Face repo id, optionally REPO@REVISION.")]
    = DEFAULT_TEXT_ENCODER,
    evaluator: Annotated[bool, typer.Option("--evaluator", help="Also the torchxrayvision weights of `cxrgen "
                                            "evaluate` (needs the evaluate extra).")] = False,
    cache_dir: CacheDir = None, quiet: Quiet = False, offline: Offline = False, verbose: Verbose = False,
) -> None:
    """Stage the bundle and text encoder (and with --evaluator the evaluator's weights) in the cache, for offline use.

    Fetches only the files a run reads, at pinned versions, verifies them (md5 of the checkpoints, sizes,
    sha256) and resumes a cut download. Safe to start on many ranks at once: one downloads, the others
    wait. With --offline it only reports what is there and what is missing. Exit codes: 0 everything is
    staged; 2 something could not be fetched (or, offline, is missing).

    Example: cxrgen download --evaluator   (on a login node; then copy or share $CXRGEN_HOME)
    """
    try:
        from cxrgen.cache_info import download as stage_all

        offline = _network(offline, verbose)
        report = stage_all(cache_dir or default_cache_dir(os.environ), model, text_encoder, evaluator,
                           offline=offline, progress=not quiet, log=lambda line: typer.echo(line, err=True))
    except CxrgenError as exc:
        _fail(exc)
    if not quiet or report.problem():
        for line in report.lines():
            typer.echo(line)
    if report.problem():
        _fail(report.problem())


@app.command()
def info(
    model: Annotated[str, typer.Option(help="Bundle name (NAME@VERSION) a run would use.")] = DEFAULT_MODEL,
    text_encoder: Annotated[str, typer.Option(help="Text encoder repo (REPO@REVISION) a run would use.")]
    = DEFAULT_TEXT_ENCODER,
    evaluator: Annotated[bool, typer.Option("--evaluator", help="Require the evaluator's weights too.")] = False,
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

        from cxrgen.cache_info import cache_report

        report = cache_report(cache_dir or default_cache_dir(os.environ), model, text_encoder, evaluator)
    except CxrgenError as exc:
        _fail(exc)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else "\n".join(report.lines()))
    if not report.complete:
        raise typer.Exit(1)


def _usage_line(exc, args: list[str]) -> str:
    """One line for a command-line mistake: what is wrong, the fix where one is known, where help is."""
    import difflib

    from typer._click import exceptions as click_exc  # typer vendors click

    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx else " ".join(["cxrgen", *args[:1]]) if args and args[0].isalpha() else "cxrgen"
    param = getattr(exc, "param", None)
    cause = getattr(exc.__cause__, "errors", None)
    if isinstance(exc, click_exc.NoSuchOption):
        best = difflib.get_close_matches(exc.option_name, exc.possibilities or [], n=1)
        text = f"no such option {exc.option_name}" + (f"; did you mean {best[0]}?" if best else "")
    elif isinstance(exc, click_exc.MissingParameter) and param is not None:
        text = f"missing {param.param_type_name} {(param.name or '').upper()}"
    elif isinstance(exc, click_exc.BadParameter) and param is not None and callable(cause):
        error = cause()[0]
        kind = {"int_parsing": "a valid integer", "float_parsing": "a valid number"}.get(error.get("type"))
        name = param.opts[0] if param.opts else param.name
        example = f"; e.g. {name} {param.default}" if kind and param.default is not None else ""
        text = (f"{name}: {error.get('input')!r} is not {kind}{example}" if kind
                else f"{name}: {exc.format_message()}")
    else:
        text = exc.format_message()
    return f"{' '.join(text.split())}  (see '{where} --help')"


def main() -> None:
    """Console-script entry point: a usage mistake is one line (exit 2); the rest as Typer does it."""
    import sys

    from typer._click import exceptions as click_exc  # typer vendors click

    try:
        code = app(prog_name="cxrgen", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:  # a bare `cxrgen` or `cxrgen manifest`: the help page
        exc.show()
        sys.exit(exc.exit_code)
    except click_exc.UsageError as exc:
        typer.echo(f"cxrgen: error: {_usage_line(exc, sys.argv[1:])}", err=True)
        sys.exit(exc.exit_code)
    except click_exc.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:  # typer raises its own Abort (its vendored click has none)
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
