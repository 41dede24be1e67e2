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
         "(research use only, not for clinical use).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

# Options shared by generate and resume: none of them changes pixels.
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per UNet call; 0 picks one for the device.")]
DecodeBatch = Annotated[int, typer.Option("--decode-batch-size", help="Latents per decoder call; 0 = 1 on CPU, "
                                          "8 on CUDA.")]
Device = Annotated[str, typer.Option("--device", "--devices", help="auto (every visible GPU, else CPU), cpu, "
                                     "cuda:N, or a list such as cuda:0,cuda:2 (one worker per device).")]
Workers = Annotated[int, typer.Option("--workers", help="Worker processes on this machine (CPU: N processes).")]
ChannelsLast = Annotated[bool, typer.Option("--channels-last", help="channels_last UNet (CUDA speed option).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (compile time reported apart).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Bundle download cache "
                                                  "(default: $CXRGEN_HOME or ~/.cache/cxrgen).")]


def _fail(exc: CxrgenError) -> None:
    # one line even when the message quotes a multi-line value (a wrapped spreadsheet header, say)
    typer.echo(f"cxrgen: error: {' '.join(str(exc).splitlines())}", err=True)
    raise typer.Exit(exc.exit_code)


def _interrupted(out) -> None:
    from cxrgen.store import resume_command

    typer.echo(f"cxrgen: interrupted; finished images are kept: `{resume_command(out)}` continues", err=True)
    raise typer.Exit(130)


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
    steps: Annotated[int, typer.Option(help="num_inference_steps.")] = 50,
    scheduler: Annotated[str, typer.Option(help="ddim (the model card's) or dpmpp2m (DPM-Solver++(2M)).")] = "ddim",
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, "
                                       "float16.")] = "auto",
    image_format: Annotated[str, typer.Option(help="jpg or png (lossless).")] = "jpg",
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality, 1-95.")] = 95,
    batch_size: BatchSize = 0, decode_batch_size: DecodeBatch = 0, device: Device = "auto",
    workers: Workers = 1, channels_last: ChannelsLast = False, compile: Compile = False,
    cache_dir: CacheDir = None, quiet: Quiet = False,
) -> None:
    """Generate one image per (row, sample) of MANIFEST into OUT, with metadata.parquet and run.json.

    Running it again with the same manifest and settings resumes an interrupted run.

    Example: cxrgen generate manifests/demo.csv --out demo_out --num-images 2 --steps 50
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
        )
        run_generate(config, rank=rank_from_env(os.environ))
    except CxrgenError as exc:
        _fail(exc)
    except KeyboardInterrupt:  # Ctrl-C while models load or metadata merges: nothing is lost
        _interrupted(out)


@app.command()
def resume(
    out: Annotated[Path, typer.Argument(help="Output folder of an earlier run (holds run.json).")],
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per UNet call.")] = None,
    decode_batch_size: Annotated[Optional[int], typer.Option("--decode-batch-size", help="Latents per "
                                                             "decoder call.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", "--devices", help="auto, cpu, cuda:N or a "
                                                  "list cuda:0,cuda:2.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Worker processes.")] = None,
    cache_dir: CacheDir = None, quiet: Quiet = False,
) -> None:
    """Finish an interrupted run with the settings saved in OUT/run.json.

    Refuses when the manifest or a setting that changes pixels differs from the saved run.

    Example: cxrgen resume demo_out
    """
    try:
        from cxrgen.run import resume as run_resume

        run_resume(out, rank=rank_from_env(os.environ), batch_size=batch_size, decode_batch_size=decode_batch_size,
                   device=device, workers=workers, cache_dir=str(cache_dir) if cache_dir else None, quiet=quiet)
    except CxrgenError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted(out)


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


def main() -> None:
    """Console-script entry point."""
    app(prog_name="cxrgen")


if __name__ == "__main__":
    main()
