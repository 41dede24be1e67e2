"""`cxrgen plan`: what `cxrgen generate` would do with a manifest and settings, without torch and without writing.

Rows, images, images per label value, prompts longer than 77 CLIP tokens, duplicate prompts, and a run-time
estimate from the benchmark figures in docs/performance.md.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cxrgen.config import RunConfig, is_url, split_ref
from cxrgen.manifests.tokens import MAX_TOKENS, load_counter
from cxrgen.manifests.workitems import load_plan
from cxrgen.pins import DEFAULT_MODEL

# docs/performance.md, "CPU figures": a 2-core AMD EPYC, float32, 4 steps, batch 4, real architecture.
# 0.0371 images/s = 26.95 s per image, of which the UNet (4 steps x 2 guidance rows) is ~42 of ~48 CPU seconds;
# the decoder (~5) and the text encoder (~1) are paid once per image whatever the steps.
CPU_SECONDS_PER_IMAGE_AT_4_STEPS = 1 / 0.0371
CPU_STEP_SECONDS = CPU_SECONDS_PER_IMAGE_AT_4_STEPS * 42 / 48 / 4
CPU_IMAGE_SECONDS = CPU_SECONDS_PER_IMAGE_AT_4_STEPS * 6 / 48
CPU_LOAD_SECONDS = 7.6
# docs/performance.md, "GPU figures: pending": no GPU run has been measured yet. The work per image is
# 0.6393 x steps + 0.304 TFLOP; the issue-5 target is >= 10 images/s at 50 steps on one H100/H200.
GPU_TFLOP_PER_STEP, GPU_TFLOP_PER_IMAGE = 0.6393, 0.304
GPU_TARGET_IMAGES_PER_S, GPU_TARGET_STEPS = 10.0, 50
# The architecture those figures are for (../shared/REFERENCE.md): another bundle takes another time.
REAL_UNET_CHANNELS, REAL_LATENT = [256, 512, 768], (3, 64, 64)
SHOWN = 20  # truncated or duplicate prompts listed without --show-all
VALUES_SHOWN = 12  # label values listed per column


@dataclass
class PlanReport:
    """Everything `cxrgen plan` reports; lines() formats it."""

    manifest: str
    out: str
    rows: int
    empty_rows: int  # rows with num_images 0
    images: int
    distinct_prompts: int
    tokenizer: str
    longest: int  # most tokens of any prompt
    truncated: list[tuple[int, int, str]]  # (row, tokens, prompt) of prompts over 77 tokens
    truncated_negative: list[tuple[int, int, str]]  # the same for negative prompts
    duplicates: list[tuple[str, list[int]]]  # (prompt, rows) of prompts on more than one row
    label_values: dict[str, list[tuple[str, int]]]  # column -> (value, images), most images first
    estimate: list[str] = field(default_factory=list)
    out_state: str = "new folder"

    def lines(self, show_all: bool = False) -> list[str]:
        """The report as text lines."""
        limit = None if show_all else SHOWN
        out = [f"manifest:    {self.manifest}",
               f"rows:        {self.rows:,}" + (f" ({self.empty_rows:,} with num_images 0)" if self.empty_rows else ""),
               f"images:      {self.images:,} from {self.distinct_prompts:,} distinct prompt(s)",
               f"output:      {self.out} ({self.out_state})",
               f"tokens:      longest prompt {self.longest} of {MAX_TOKENS} (tokenizer: {self.tokenizer})",
               f"truncated:   {len(self.truncated):,} prompt(s) over {MAX_TOKENS} tokens; the model sees only "
               f"the first {MAX_TOKENS}" if self.truncated else "truncated:   none"]
        for row, tokens, prompt in self.truncated[:limit]:
            out.append(f"  row {row}: {tokens} tokens: {_short(prompt)}")
        for row, tokens, prompt in self.truncated_negative[:limit]:
            out.append(f"  row {row}, negative_prompt: {tokens} tokens: {_short(prompt)}")
        out.append(f"duplicates:  {len(self.duplicates):,} prompt(s) on more than one row" if self.duplicates
                   else "duplicates:  none")
        for prompt, rows in self.duplicates[:limit]:
            out.append(f"  rows {', '.join(map(str, rows[:10]))}{' ...' if len(rows) > 10 else ''}: {_short(prompt)}")
        hidden = max(len(self.truncated), len(self.duplicates)) - SHOWN
        if not show_all and hidden > 0:
            out.append(f"  (lists cut at {SHOWN}; --show-all lists every one)")
        if self.label_values:
            out.append("images per label value:")
            for column, values in self.label_values.items():
                if len(values) <= VALUES_SHOWN:  # a class column: every value, in value order
                    shown = ", ".join(f"{value}: {count:,}" for value, count in sorted(values))
                else:  # ids, template ids, free text: how many, and the commonest
                    shown = f"{len(values):,} distinct values; most images: " + \
                        ", ".join(f"{value}: {count:,}" for value, count in values[:3])
                out.append(f"  {column}: {shown}")
        out += [("estimate:    " if i == 0 else "             ") + line for i, line in enumerate(self.estimate)]
        return out


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def plan_run(config: RunConfig) -> PlanReport:
    """Read and plan the manifest exactly as generate would, count tokens, and estimate the run time."""
    manifest, plan = load_plan(config)
    counter = load_counter(config.text_encoder, option="--text-encoder")
    images = Counter(item.row for item in plan)
    prompts = [row.prompt for row in manifest.rows]
    counts = dict(zip(dict.fromkeys(prompts), counter.counts(list(dict.fromkeys(prompts)))))
    truncated = [(r.number, counts[r.prompt], r.prompt) for r in manifest.rows
                 if images[r.number] and counts[r.prompt] > MAX_TOKENS]
    negatives = {(r.number, r.negative_prompt if r.negative_prompt is not None else config.negative_prompt)
                 for r in manifest.rows if images[r.number]}
    truncated_negative = sorted((n, counter.count(p), p) for n, p in negatives if p and counter.count(p) > MAX_TOKENS)
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for row in manifest.rows:
        if images[row.number]:
            by_prompt[row.prompt].append(row.number)
    duplicates = [(p, rows) for p, rows in by_prompt.items() if len(rows) > 1]
    out = Path(config.out)
    state = "object-store prefix: plan does not contact the store; generate checks it" if is_url(config.out) else \
        "holds a run: generate resumes it if the settings match" if (out / "run.json").is_file() else \
        "exists and is not empty: generate refuses it" if out.is_dir() and any(out.iterdir()) else "new folder"
    return PlanReport(
        manifest=manifest.path, out=config.out if is_url(config.out) else str(out), rows=len(manifest.rows),
        empty_rows=sum(1 for r in manifest.rows if not images[r.number]), images=len(plan),
        distinct_prompts=len(by_prompt), tokenizer=counter.source,
        longest=max((counts[p] for p in by_prompt), default=0), truncated=truncated,
        truncated_negative=truncated_negative, duplicates=duplicates,
        label_values=_label_values(manifest, images), estimate=estimate(config, len(plan)), out_state=state)


def _label_values(manifest, images: Counter) -> dict[str, list[tuple[str, int]]]:
    """Images per value of every label column, most images first (blank cells show as (blank))."""
    result = {}
    weights = [images[row.number] for row in manifest.rows]
    for column in manifest.labels.column_names:
        tally: Counter = Counter()
        for value, weight in zip(manifest.labels.column(column).to_pylist(), weights):
            if weight:
                tally[_value_text(value)] += weight
        result[column] = sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))
    return result


def _value_text(value) -> str:
    if value is None:
        return "(blank)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def estimate(config: RunConfig, images: int) -> list[str]:
    """Run-time lines for the chosen device, from the benchmark figures (docs/performance.md)."""
    devices = [d.strip() for d in config.device.split(",") if d.strip()]
    lines = []
    if any(d == "cpu" or d == "auto" for d in devices):
        seconds = images * (CPU_STEP_SECONDS * config.steps + CPU_IMAGE_SECONDS) + CPU_LOAD_SECONDS
        lines.append(f"cpu: ~{_duration(seconds)} for {images:,} image(s) at {config.steps} steps on a CPU like the "
                     "benchmark's (2-core AMD EPYC, float32; docs/performance.md); more cores help roughly in "
                     "proportion, extra --workers on the same cores do not")
    if any(d.startswith("cuda") or d == "auto" for d in devices):
        gpus = len(devices) if devices[0].startswith("cuda") and "," in config.device else 1
        rate = GPU_TARGET_IMAGES_PER_S * (GPU_TFLOP_PER_STEP * GPU_TARGET_STEPS + GPU_TFLOP_PER_IMAGE) \
            / (GPU_TFLOP_PER_STEP * config.steps + GPU_TFLOP_PER_IMAGE)
        work = images * (GPU_TFLOP_PER_STEP * config.steps + GPU_TFLOP_PER_IMAGE)
        lines.append(f"cuda: no GPU run is measured yet (docs/performance.md); at the target of "
                     f"{GPU_TARGET_IMAGES_PER_S:g} images/s at {GPU_TARGET_STEPS} steps per H100/H200, "
                     f"~{_duration(images / rate / gpus)} on {gpus} GPU{'s' if gpus > 1 else ''} "
                     f"({work:,.0f} TFLOP of work)")
    if config.device == "auto":
        lines.append("(--device auto uses every visible GPU, else the CPU; plan does not import torch to find out)")
    note = architecture_note(config.model)
    return lines + ([note] if note else [])


def architecture_note(model: str) -> str | None:
    """None when the estimate's architecture is the bundle's; else the line saying the estimate is not for it."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        name = split_ref(model)[0]
        return None if name == DEFAULT_MODEL else \
            f"(these times are for {DEFAULT_MODEL}'s architecture; {model} is another bundle, which plan does not read)"
    try:  # plain JSON, as cxrgen.model.bundle reads it (that module needs torch; plan must not)
        config = json.loads((folder / "configs" / "inference.json").read_text(encoding="utf-8"))
        meta_path = folder / "configs" / "metadata.json"
        demo = meta_path.is_file() and json.loads(meta_path.read_text(encoding="utf-8")).get("cxrgen_demo") is True
        unet = config["diffusion_def"]
        channels = unet.get("channels", unet.get("num_channels"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"(these times are for the real architecture; {folder} has no readable configs/inference.json)"
    found = re.search(r"randn\(\s*\(\s*1\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)", str(config.get("noise", "")))
    latent = tuple(int(v) for v in found.groups()) if found else REAL_LATENT
    if channels == REAL_UNET_CHANNELS and latent == REAL_LATENT:
        return None
    what = "the demo model (random weights), which takes seconds" if demo else "another architecture"
    return (f"(these times are for the real architecture: UNet channels {REAL_UNET_CHANNELS}, latent "
            f"{'x'.join(map(str, REAL_LATENT))}; the bundle {folder} is {what}: UNet channels {channels}, latent "
            f"{'x'.join(map(str, latent))})")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
