"""The cxrgen command line: collect options, build one RunConfig, call one library function."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrgen import __version__
from cxrgen.config import DEFAULT_MODEL, DEFAULT_TEXT_ENCODER, RunConfig, default_cache_dir
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
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Bundle download cache "
                                                  "(default: $CXRGEN_HOME or ~/.cache/cxrgen).")]


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


def _exit_for(result) -> None:
    """Exit 3 when this process finished only its share and the run is not complete yet."""
    from cxrgen.errors import INCOMPLETE_EXIT_CODE

    if not result.complete:
        raise typer.Exit(INCOMPLETE_EXIT_CODE)


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
    manifest: Annotated[Path, typer.Argument(help="CSV, TSV or Parquet file with a prompt column.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: beside the "
                                                "manifest, named after it).")] = None,
    manifest_format: Annotated[str, typer.Option(help="auto, csv, tsv or parquet.")] = "auto",
    prompt_column: Annotated[str, typer.Option(help="Column holding the report sentence.")] = "prompt",
    allow_empty_prompt: Annotated[bool, typer.Option("--allow-empty-prompt",
                                                     help="Blank prompts make unconditional samples.")] = False,
    model: Annotated[str, typer.Option(help="Bundle folder, or bundle name to download once.")] = DEFAULT_MODEL,
    text_encoder: Annotated[str, typer.Option(help="Hugging Face repo id or local folder with tokenizer/ "
                                              "and text_encoder/.")] = DEFAULT_TEXT_ENCODER,
    num_images: Annotated[int, typer.Option(help="Images per row (column num_images overrides).")] = 1,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance (column overrides).")] = 7.0,
    negative_prompt: Annotated[str, typer.Option(help="Unconditional prompt (column overrides).")] = "",
    seed: Annotated[int, typer.Option(help="Base seed of the run (column seed overrides).")] = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps (num_inference_steps); the model card uses 50, "
                                       "--scheduler dpmpp2m needs fewer (e.g. 20).")] = 50,
    scheduler: Annotated[str, typer.Option(help="ddim (the model card's) or dpmpp2m (DPM-Solver++(2M)).")] = "ddim",
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, "
                                       "float16.")] = "auto",
    image_format: Annotated[str, typer.Option(help="jpg or png (lossless).")] = "jpg",
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality, 1-95.")] = 95,
    batch_size: BatchSize = 0, decode_batch_size: DecodeBatch = 0, device: Device = "auto",
    workers: Workers = 1, channels_last: ChannelsLast = False, compile: Compile = False,
    cache_dir: CacheDir = None, rank_wait: RankWait = None, quiet: Quiet = False,
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
            jpeg_quality=jpeg_quality, workers=workers, quiet=quiet,
            **({} if rank_wait is None else {"rank_wait": rank_wait}),
        )
        result = run_generate(config, rank=rank_from_env(os.environ))
    except CxrgenError as exc:
        _fail(exc)
    except KeyboardInterrupt:  # Ctrl-C while models load or metadata merges: nothing is lost
        _interrupted(out)
    _exit_for(result)


@app.command()
def resume(
    out: Annotated[Path, typer.Argument(help="Output folder of an earlier run (holds run.json).")],
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
    rank_wait: RankWait = None, quiet: Quiet = False,
) -> None:
    """Finish an interrupted run with the settings saved in OUT/run.json.

    Every option left out keeps its saved value; only speed options can be given, because the others
    change pixels. Refuses when the manifest or a pixel-changing setting differs from the saved run.
    Exit codes as for generate (3: this rank's share is done, other ranks stopped with images left).

    Example: cxrgen resume demo_out --batch-size 8
    """
    try:
        from cxrgen.run import resume as run_resume

        result = run_resume(out, rank=rank_from_env(os.environ), batch_size=batch_size,
                            decode_batch_size=decode_batch_size, device=device, workers=workers,
                            cache_dir=str(cache_dir.resolve()) if cache_dir else None, rank_wait=rank_wait,
                            quiet=quiet)
    except CxrgenError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted(out)
    _exit_for(result)


@app.command()
def status(
    out: Annotated[Path, typer.Argument(help="Output folder of a run.")],
    finalize: Annotated[bool, typer.Option("--finalize", help="Write metadata.parquet if every image is done "
                                           "but no process merged the records (e.g. a rank died).")] = False,
) -> None:
    """Show planned, done and remaining images of OUT and any damaged or orphaned files.

    Exit code 0 when complete, 1 when work remains, 2 when OUT is not a cxrgen run.

    Example: cxrgen status demo_out
    """
    try:
        from cxrgen.state import inspect_run
        from cxrgen.store import resume_command

        report = inspect_run(out)
        if finalize and report.remaining == 0 and not report.finalized:
            from cxrgen.run import finalize_run

            finalize_run(out)
            report = inspect_run(out)
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
def reproduce(
    out: Annotated[Path, typer.Argument(help="Output folder of a run.")],
    image_id: Annotated[str, typer.Argument(help="The image's id (column image_id of metadata.parquet).")],
    copy: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the regenerated image to this "
                                                 "file (the run's format; outside OUT).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N (default: the kind of "
                                                  "device the image was made on).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Bundle folder, if the run's has moved (its checkpoints "
                                                 "must be the run's).")] = None,
    text_encoder: Annotated[Optional[str], typer.Option(help="Text encoder repo id or folder, if the run's has "
                                                        "moved.")] = None,
) -> None:
    """Regenerate one image of OUT from its metadata row and print how far it is from the stored file.

    Example: cxrgen reproduce demo_out demo-001_0000 --out demo-001_0000.jpg
    """
    try:
        from cxrgen.reproduce import reproduce_image

        result = reproduce_image(out, image_id, device=device, output=copy, model=model, text_encoder=text_encoder)
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


def main() -> None:
    """Console-script entry point."""
    app(prog_name="cxrgen")


if __name__ == "__main__":
    main()
