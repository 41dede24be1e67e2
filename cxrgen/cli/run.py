"""Commands that make a run folder: generate, resume, status and plan (generate's dry run)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrgen.cli.options import (
    AllowEmptyPrompt,
    BatchSize,
    CacheDir,
    ChannelsLast,
    Compile,
    DecodeBatch,
    Device,
    Engine,
    GuidanceScale,
    KeepRejected,
    LabelMap,
    ManifestArg,
    ManifestFormat,
    MaxAttempts,
    MinScore,
    NegativePrompt,
    NumImages,
    Offline,
    PromptColumn,
    Quiet,
    RankWait,
    RayAddress,
    RayGpus,
    RayWorkers,
    Seed,
    Shard,
    Shards,
    Verbose,
    VerifierWeights,
    Verify,
    VerifyNegatives,
    Workers,
    RunOut,
    default_out,
    exit_for,
    fail,
    interrupted,
    local,
    location,
    stay_offline,
    this_share,
    verify_settings,
)
from cxrgen.config import RunConfig, default_cache_dir
from cxrgen.errors import CxrgenError
from cxrgen.pins import DEFAULT_MODEL, DEFAULT_TEXT_ENCODER

_IGNORED = "Accepted so that a generate command line works unchanged; plan ignores it."


def generate(
    manifest: ManifestArg,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder or object-store URL such as "
                                               "s3://bucket/prefix (default: a folder beside the manifest, named "
                                               "after it).")] = None,
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
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU; on CUDA bfloat16, or float16 on GPUs older than "
                                       "compute capability 8.0), float32 (no TF32), bfloat16, float16 (or fp32, "
                                       "bf16, fp16).")] = "auto",
    image_format: Annotated[str, typer.Option(help="jpg or png (lossless).")] = "jpg",
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality, 1-95.")] = 95,
    file_names: Annotated[str, typer.Option(help="index: images/00000/00000042.jpg (safe for every loader); "
                                            "id: images/00000/<image_id>.jpg (an id such as test-3 then "
                                            "reads as a split to datasets' imagefolder).")] = "index",
    batch_size: BatchSize = 0, decode_batch_size: DecodeBatch = 0, device: Device = "auto",
    workers: Workers = 1, channels_last: ChannelsLast = False, compile: Compile = False,
    cache_dir: CacheDir = None, shard: Shard = None, shards: Shards = None, rank_wait: RankWait = None,
    verify: Verify = False, min_score: MinScore = None, max_attempts: MaxAttempts = None,
    verify_negatives: VerifyNegatives = False, keep_rejected: KeepRejected = False,
    verifier_weights: VerifierWeights = None, label_map: LabelMap = None,
    engine: Engine = "local", ray_address: RayAddress = None, ray_workers: RayWorkers = "auto",
    ray_gpus_per_worker: RayGpus = None,
    quiet: Quiet = False, offline: Offline = False, verbose: Verbose = False,
) -> None:
    """Generate one image per (row, sample) of MANIFEST into OUT, with metadata.parquet and run.json.

    Running it again with the same manifest and settings resumes an interrupted run. With --verify, an image
    whose row has positive labels is made again (next attempt's seed) until a classifier confirms each of them.
    Exit codes: 0 the run is complete; 1 it failed (resumable); 2 bad input, nothing written; 3 this rank's
    share is done but other ranks stopped with images left (resume); 130/143 stopped by SIGINT/SIGTERM
    (resumable).

    Example: cxrgen generate manifests/demo.csv --out demo_out --steps 50 --batch-size 8
    """
    try:
        from cxrgen.runs.generate import generate as run_generate

        # beside the manifest, named after it; a manifest without a suffix must not be its own output folder
        out = out or default_out(manifest)
        config = RunConfig(
            manifest=str(manifest.resolve()), out=location(out), manifest_format=manifest_format,
            prompt_column=prompt_column, allow_empty_prompt=allow_empty_prompt, model=model,
            text_encoder=text_encoder, cache_dir=str(cache_dir or default_cache_dir(os.environ)),
            num_images=num_images, guidance_scale=guidance_scale, negative_prompt=negative_prompt, seed=seed,
            steps=steps, scheduler=scheduler, batch_size=batch_size, decode_batch_size=decode_batch_size,
            device=device, dtype=dtype, channels_last=channels_last, compile=compile, image_format=image_format,
            jpeg_quality=jpeg_quality, file_names=file_names, workers=workers, quiet=quiet, verbose=verbose,
            offline=stay_offline(offline, verbose), engine=engine, ray_address=ray_address or "",
            ray_workers=ray_workers, ray_gpus_per_worker=ray_gpus_per_worker,
            **({} if rank_wait is None else {"rank_wait": rank_wait}),
            **verify_settings(verify, min_score, max_attempts, verify_negatives, keep_rejected, verifier_weights,
                              label_map),
        )
        share = this_share(shard, shards, config.out)
        result = run_generate(config, rank=share)
    except CxrgenError as exc:
        fail(exc)
    except KeyboardInterrupt:  # Ctrl-C while models load or metadata merges: nothing is lost
        interrupted(out)
    exit_for(result, share)


def resume(
    out: Annotated[str, typer.Argument(metavar="OUT", help="Output folder or s3:// URL of an earlier run (holds "
                                       "run.json).")],
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per UNet call; 0 picks one "
                                                      "for the device. [default: the saved value]")] = None,
    decode_batch_size: Annotated[Optional[int], typer.Option("--decode-batch-size", help="Latents per decoder "
                                                             "call; 0 = 1 on CPU, 8 on CUDA. [default: the saved "
                                                             "value]")] = None,
    device: Annotated[Optional[str], typer.Option("--device", "--devices", help="auto, cpu, cuda, cuda:N or a list "
                                                  "cuda:0,cuda:2. [default: the saved value]")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Worker processes on this machine. "
                                                   "[default: the saved value]")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", parser=local("--cache-dir"),
                                                      help="Bundle download cache. [default: the "
                                                      "saved value]")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Re-read, checksum and decode every recorded image "
                                         "first and remake damaged ones (slow on big runs; by default one "
                                         "file-size check each).")] = False,
    shard: Shard = None, shards: Shards = None, rank_wait: RankWait = None,
    engine: Annotated[Optional[str], typer.Option("--engine", help="local or ray. [default: the saved value]")] = None,
    ray_address: RayAddress = None,
    ray_workers: Annotated[Optional[str], typer.Option("--ray-workers", help="auto, N or MIN-MAX. [default: the "
                                                       "saved value]")] = None,
    ray_gpus_per_worker: RayGpus = None, quiet: Quiet = False, offline: Offline = False, verbose: Verbose = False,
) -> None:
    """Finish an interrupted run with the settings saved in OUT/run.json.

    Every option left out keeps its saved value; only speed options can be given, because the others
    change pixels. Refuses when the manifest or a pixel-changing setting differs from the saved run.
    Exit codes as for generate (3: this rank's share is done, other ranks stopped with images left).

    Example: cxrgen resume demo_out --batch-size 8
    """
    try:
        from cxrgen.runs.generate import resume as run_resume

        share = this_share(shard, shards, location(out))
        result = run_resume(location(out), rank=share, batch_size=batch_size,
                            decode_batch_size=decode_batch_size, device=device, workers=workers,
                            cache_dir=str(cache_dir.resolve()) if cache_dir else None, rank_wait=rank_wait,
                            verify=verify, quiet=quiet, verbose=verbose, offline=stay_offline(offline, verbose),
                            engine=engine, ray_address=ray_address, ray_workers=ray_workers,
                            ray_gpus_per_worker=ray_gpus_per_worker)
    except CxrgenError as exc:
        fail(exc)
    except KeyboardInterrupt:
        interrupted(out)
    exit_for(result, share)


def status(
    out: RunOut,
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
        from cxrgen.files import resume_command
        from cxrgen.runs.state import inspect_run

        out = location(out)
        report = inspect_run(out, verify=verify)
        if finalize and report.remaining == 0 and not report.finalized:
            from cxrgen.runs.generate import finalize_run

            finalize_run(out)
            report = inspect_run(out, verify=verify)
        elif finalize and report.remaining > 0:
            typer.echo(f"cannot finalize: {report.remaining} image(s) are not done yet; make them with "
                       f"`{resume_command(report.out)}` (it writes metadata.parquet at the end)", err=True)
    except CxrgenError as exc:
        fail(exc)
    typer.echo(f"run:       {report.out}")
    if report.demo:
        typer.echo("model:     DEMO (random weights): every image of this run is noise, not a chest X-ray")
    typer.echo(f"planned:   {report.planned}")
    typer.echo(f"done:      {report.done}")
    typer.echo(f"remaining: {report.remaining}")
    typer.echo(f"metadata:  {_metadata_state(report)}")
    typer.echo(f"checked:   {report.checked} recorded file(s), " + ("each re-read, checksummed and decoded"
                                                                      if report.verified else
                                                                      "size only (--verify re-reads and decodes)"))
    for label, names in (("recorded but missing or unreadable", report.missing_files),
                         ("files with no record", report.orphaned_files), ("temporary files", report.temp_files)):
        if names:
            typer.echo(f"{label}: {len(names)} (e.g. {names[0]})")
    if report.verification is not None:
        from cxrgen.runs.verify_stats import stats_lines

        for line in stats_lines(report.verification):
            typer.echo(line)
    if not report.complete:
        typer.echo(f"resume with: {resume_command(report.out)}")
        raise typer.Exit(1)


def _metadata_state(report) -> str:
    if report.finalized:
        return "complete"
    if report.metadata_rows == report.planned and report.remaining:
        return f"written, but {report.remaining} image(s) are missing or damaged (resume remakes them and merges again)"
    if report.metadata_rows == report.planned:
        return "written, but the dataset card README.md is missing (resume writes it)"
    return "not written yet"


def plan(
    manifest: ManifestArg,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder or URL generate would use "
                                               "(default: beside the manifest, named after it).")] = None,
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
    model: Annotated[str, typer.Option(help="Bundle the run would use (folder or NAME[@VERSION]): the estimate "
                                       "says when its architecture is not the real model's. Nothing is loaded or "
                                       "downloaded.")] = DEFAULT_MODEL,
    jpeg_quality: Annotated[int, typer.Option(hidden=True, help=_IGNORED)] = 95,
    file_names: Annotated[str, typer.Option(hidden=True, help=_IGNORED)] = "index",
    decode_batch_size: Annotated[int, typer.Option("--decode-batch-size", hidden=True, help=_IGNORED)] = 0,
    channels_last: Annotated[bool, typer.Option("--channels-last", hidden=True, help=_IGNORED)] = False,
    compile: Annotated[bool, typer.Option("--compile", hidden=True, help=_IGNORED)] = False,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", hidden=True, parser=local("--cache-dir"),
                                                      help=_IGNORED)] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", hidden=True, help=_IGNORED)] = None,
    shards: Annotated[Optional[int], typer.Option("--shards", hidden=True, help=_IGNORED)] = None,
    rank_wait: Annotated[Optional[float], typer.Option("--rank-wait", hidden=True, help=_IGNORED)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", hidden=True, help=_IGNORED)] = False,
    verify: Annotated[bool, typer.Option("--verify", hidden=True, help=_IGNORED)] = False,
    min_score: Annotated[Optional[float], typer.Option("--min-score", hidden=True, help=_IGNORED)] = None,
    max_attempts: Annotated[Optional[int], typer.Option("--max-attempts", hidden=True, help=_IGNORED)] = None,
    verify_negatives: Annotated[bool, typer.Option("--verify-negatives", hidden=True, help=_IGNORED)] = False,
    keep_rejected: Annotated[bool, typer.Option("--keep-rejected", hidden=True, help=_IGNORED)] = False,
    verifier_weights: Annotated[Optional[str], typer.Option("--verifier-weights", hidden=True, help=_IGNORED)] = None,
    label_map: Annotated[Optional[Path], typer.Option("--label-map", hidden=True, help=_IGNORED)] = None,
    engine: Annotated[str, typer.Option("--engine", hidden=True, help=_IGNORED)] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", hidden=True, help=_IGNORED)] = None,
    ray_workers: Annotated[str, typer.Option("--ray-workers", hidden=True, help=_IGNORED)] = "auto",
    ray_gpus_per_worker: Annotated[Optional[float], typer.Option("--ray-gpus-per-worker", hidden=True,
                                                                 help=_IGNORED)] = None,
) -> None:
    """Dry run of generate: rows, images, images per label value, truncated and duplicate prompts, and a run-time
    estimate. Takes generate's options; writes nothing, loads no model, needs no torch.

    Example: cxrgen plan aug.csv --steps 50 --device cuda
    """
    try:
        from cxrgen.manifests.plan import plan_run

        out = out or default_out(manifest)
        config = RunConfig(
            manifest=str(manifest), out=location(out), manifest_format=manifest_format,
            prompt_column=prompt_column, allow_empty_prompt=allow_empty_prompt, model=model,
            text_encoder=text_encoder, num_images=num_images, guidance_scale=guidance_scale, negative_prompt=negative_prompt, seed=seed,
            steps=steps, scheduler=scheduler, batch_size=batch_size, device=device, dtype=dtype,
            image_format=image_format, workers=workers)
        report = plan_run(config)
    except CxrgenError as exc:
        fail(exc)
    for line in report.lines(show_all):
        typer.echo(line)
