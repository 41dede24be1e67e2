"""What the commands share: option spellings (Annotated aliases), the error-to-exit-code boundary, shares of a plan.

Environment variables (HF_HUB_OFFLINE, CXRGEN_HOME, array-job and launcher variables) are read here, at the
boundary, and passed down as plain values.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrgen.config import offline_from_env
from cxrgen.errors import CxrgenError
from cxrgen.files import refuse_url
from cxrgen.runs.workers import rank_from_env


def local(what: str):
    """The parser of a path argument or option: a local Path, or the one-line refusal of a URL (exit 2).

    Typer would fold `s3://bucket/run` into the local path `s3:/bucket/run` before any command sees it, so the
    text as typed is checked here, by the same function the library uses (cxrgen.files.refuse_url).
    """
    def parse(value) -> Path:
        if isinstance(value, Path):
            return value
        try:
            refuse_url(value, what)
        except CxrgenError as exc:
            fail(exc)
        return Path(value)

    return parse

# Options shared by generate and resume: speed options, which never change which images exist or their
# seeds (float rounding of batched kernels aside: docs/generating.md, "What a resume gives").
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per UNet call; 0: 4 on CPU, on a GPU sized "
                                        "from its free memory by the process using it, then from its first batch.")]
DecodeBatch = Annotated[int, typer.Option("--decode-batch-size", help="Latents per decoder call; 0 = 1 on CPU, "
                                          "8 on CUDA.")]
Device = Annotated[str, typer.Option("--device", "--devices", help="auto (every visible GPU, else CPU), cpu, "
                                     "cuda (every visible GPU; under torchrun/srun this rank's, LOCAL_RANK), "
                                     "cuda:N, or a list such as cuda:0,cuda:2 (one worker per device).")]
Workers = Annotated[int, typer.Option("--workers", help="Worker processes on this machine (CPU: N processes).")]
ChannelsLast = Annotated[bool, typer.Option("--channels-last", help="channels_last UNet; not shown to be faster "
                                            "yet: measure it (benchmarks/gpu_check.py reports its ratio).")]
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
# Where the batches run (--engine ray: docs on clusters); speed and placement only, like the options above.
Engine = Annotated[str, typer.Option("--engine", help="local (this machine's processes, torchrun/Slurm ranks, "
                                     "array jobs) or ray (a pool of Ray actors that each hold the models; "
                                     'pip install "cxrgen[ray]").')]
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray-address", envvar="RAY_ADDRESS", show_envvar=True, help="Ray cluster to join with --engine ray: HOST:PORT "
    "of the head node, ray://HOST:PORT or auto; default: $RAY_ADDRESS, else a Ray started on this machine.")]
RayWorkers = Annotated[str, typer.Option("--ray-workers", help="Ray actors: auto (one per GPU of the cluster, else "
                                         "one per node), N, or MIN-MAX for a pool Ray grows and shrinks.")]
RayGpus = Annotated[Optional[float], typer.Option(
    "--ray-gpus-per-worker", help="GPUs per Ray actor: 1 when the cluster has GPUs (else 0: CPU actors); 0.5 puts "
    "two actors on each GPU. Say 1 on an autoscaling cluster that starts without GPU nodes.")]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", parser=local("--cache-dir"),
                                                  help="Bundle download cache "
                                                  "(default: $CXRGEN_HOME or ~/.cache/cxrgen).")]
# What generate and plan (its dry run) spell the same way: the manifest and the per-row defaults.
ManifestArg = Annotated[Path, typer.Argument(metavar="MANIFEST", parser=local("MANIFEST"),
                                             help="CSV, TSV or Parquet file with a prompt "
                                             "column.")]
ManifestFormat = Annotated[str, typer.Option(help="auto, csv, tsv or parquet.")]
PromptColumn = Annotated[str, typer.Option(help="Column holding the report sentence.")]
AllowEmptyPrompt = Annotated[bool, typer.Option("--allow-empty-prompt", help="Blank prompts make unconditional "
                                                "samples.")]
NumImages = Annotated[int, typer.Option(help="Images per row (column num_images overrides).")]
GuidanceScale = Annotated[float, typer.Option(help="Classifier-free guidance (column overrides).")]
NegativePrompt = Annotated[str, typer.Option(help="Unconditional prompt (column overrides).")]
Seed = Annotated[int, typer.Option(help="Base seed of the run (column seed overrides).")]
FinishedOut = Annotated[str, typer.Argument(metavar="OUT", help="Output folder or s3:// URL of a finished run "
                                            "(holds metadata.parquet).")]
# A run location: a local folder, or an object-store URL (a str: typer's Path would fold s3:// into s3:/).
RunOut = Annotated[str, typer.Argument(metavar="OUT", help="Output folder or s3:// URL of a run.")]
Offline = Annotated[bool, typer.Option("--offline", help="Never touch the network (also HF_HUB_OFFLINE=1): models "
                                       "must be staged with `cxrgen download` or given as folders.")]
Verbose = Annotated[bool, typer.Option("--verbose", help="Let MONAI, transformers and huggingface_hub print their "
                                       "own log lines.")]
# generate --verify and its settings (resume keeps the run's: they decide which attempt of an image is kept)
Verify = Annotated[bool, typer.Option(
    "--verify", help="Score every image whose row has a positive label with a torchxrayvision classifier (needs "
    "the evaluate extra) and make it again with the next attempt's seed until each positive label reaches "
    "--min-score; rows without one are made once, unverified.")]
MinScore = Annotated[Optional[float], typer.Option(
    "--min-score", help="With --verify: calibrated score every positive label must reach (0.5 = the classifier's "
    "operating point), from 0 to 1. [default: 0.5]")]
MaxAttempts = Annotated[Optional[int], typer.Option(
    "--max-attempts", help="With --verify: attempts per image at most; when all are rejected the best one is kept "
    "with verified = false. [default: 8]")]
VerifyNegatives = Annotated[bool, typer.Option(
    "--verify-negatives", help="With --verify: findings labelled 0 must also stay below --min-score (rows whose "
    "labels are all 0 are verified too).")]
KeepRejected = Annotated[bool, typer.Option(
    "--keep-rejected", help="With --verify: write rejected attempts to OUT/rejected/ with their own "
    "metadata.parquet (for studying failure modes).")]
VerifierWeights = Annotated[Optional[str], typer.Option(
    "--verifier-weights", help="With --verify: a torchxrayvision DenseNet release (chex, nih, pc, all, ...) or its "
    "release file. Only the findings it was trained on are verified. [default: densenet121-res224-chex, trained "
    "without MIMIC-CXR; stage it with `cxrgen download --verifier`]")]
LabelMap = Annotated[Optional[Path], typer.Option(
    "--label-map", help="With --verify: JSON object label column -> classifier pathology (as cxrgen evaluate's); "
    "extends or overrides the built-in map.")]


def verify_settings(verify: bool, min_score: float | None, max_attempts: int | None, verify_negatives: bool,
                    keep_rejected: bool, verifier_weights: str | None, label_map: Path | None) -> dict:
    """RunConfig's --verify fields; an option of --verify given without it is an input error, not ignored."""
    from cxrgen.errors import InputError

    values = {"min_score": min_score, "max_attempts": max_attempts, "verify_negatives": verify_negatives or None,
              "keep_rejected": keep_rejected or None, "verifier_weights": verifier_weights,
              "label_map": str(label_map) if label_map is not None else None}
    given = {k: v for k, v in values.items() if v is not None}
    if given and not verify:
        raise InputError(f"{', '.join('--' + k.replace('_', '-') for k in given)} only apply with --verify; add "
                         "--verify, or leave them out")
    return {"verify_labels": verify, **given}


def location(text: str | Path) -> str:
    """A run location from the command line: a URL as typed (refused at once, exit 2, when no store can take it),
    a local path made absolute."""
    from cxrgen.config import is_url

    if not is_url(str(text)):
        return str(Path(text).expanduser().resolve())
    from cxrgen.storage.open import parse_url

    try:
        parse_url(str(text))
    except CxrgenError as exc:
        fail(exc)
    return str(text)


def default_out(manifest: Path) -> Path:
    """generate's output folder when -o is not given: beside the manifest, named after it (never the manifest)."""
    return manifest.with_suffix("") if manifest.suffix else manifest.with_name(manifest.name + "_out")


def stay_offline(offline: bool, verbose: bool) -> bool:
    """Whether to stay offline (--offline or HF_HUB_OFFLINE, read here at the boundary); quiets library logs."""
    from cxrgen.hub.download import quiet_library_logs

    quiet_library_logs(verbose)
    return offline or offline_from_env(os.environ)


def fail(exc: CxrgenError) -> None:
    # one line even when the message quotes a multi-line value (a wrapped spreadsheet header, say)
    typer.echo(f"cxrgen: error: {' '.join(str(exc).splitlines())}", err=True)
    raise typer.Exit(exc.exit_code)


def interrupted(out) -> None:
    from cxrgen.files import resume_command

    if out is not None and _recorded(out):
        typer.echo(f"cxrgen: interrupted; finished images are kept: `{resume_command(out)}` continues", err=True)
    else:  # stopped before the run was recorded: there is nothing to resume yet
        typer.echo("cxrgen: interrupted before the run started; nothing was recorded: run the same "
                   "`cxrgen generate` command again", err=True)
    raise typer.Exit(130)


def _recorded(out) -> bool:
    """Whether OUT holds run.json (asked of the store: a URL's run lives in a bucket)."""
    from cxrgen.storage.open import open_store

    try:
        return open_store(location(out)).read_bytes("run.json") is not None
    except CxrgenError:
        return False


def exit_for(result, share) -> None:
    """Exit 3 when images are missing that nobody is making (never a silent 0 on an incomplete run).

    A shard of an array job whose own images are all done exits 0 even while other shards' images are
    missing: schedulers retry or fail array tasks that exit non-zero, and the other shards come later.
    """
    from cxrgen.errors import INCOMPLETE_EXIT_CODE

    shard_done = share is not None and share.shard is not None and result.share_complete
    if not (result.complete or shard_done):
        raise typer.Exit(INCOMPLETE_EXIT_CODE)


def this_share(shard: Optional[str], shards: Optional[int], out: str):
    """This process's part of the plan from --shard, an array job's variables, the split recorded in OUT and
    launcher ranks."""
    from cxrgen.runs.state import recorded_split
    from cxrgen.runs.workers import parse_shard, resolve_shard, shard_from_env, share_of

    request = parse_shard(shard) if shard else shard_from_env(os.environ, shards)
    chosen, split = resolve_shard(request, recorded_split(out) if request is not None else None)
    return share_of(chosen, rank_from_env(os.environ), split)
