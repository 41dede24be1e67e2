#!/usr/bin/env python
"""What `cxrgen generate --verify` costs: the classifier pass's share of the run's time, against a plain run.

Builds, in a work folder, the bundle's architecture with random weights (benchmarks/fake_model.py; --tiny: toy
sizes), torchxrayvision's DenseNet-121 with random weights saved under the default verifier's release file name,
and a manifest of N distinct prompts, each labelled positive for Pneumothorax. Then, in this one process and
interleaved, per repetition:

  plain    cxrgen.runs.generate.generate on the manifest into a fresh folder
  verify   the same with --verify --min-score 0: every image is scored (decode of its encoded file, preprocessing,
           DenseNet forward) and accepted at its first attempt, so both runs make exactly the same images

and reports the medians:

  classifier_s          time inside the verifier's scoring (the classifier pass), summed over the run
  classifier_fraction   classifier_s / the verify run's batch loop: the pass's share of the generation time
  overhead              verify loop / plain loop - 1: what the pass adds once overlapped with the next batch
  retry_cost            images made / images kept, as the run reports it (1.0 here: acceptance 100 %)

The last line printed is one JSON object.

    python benchmarks/verify.py                      # CPU: real architecture, 4 steps, 4 images, 2 repetitions
    python benchmarks/verify.py --device cuda        # 50 steps, 64 images, bf16 autocast
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is local; never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_model  # noqa: E402
import torch  # noqa: E402

RELEASE = "densenet121-res224-chex"


def log(message: str) -> None:
    print(f"[verify-bench] {message}", file=sys.stderr, flush=True)


def build_verifier(folder: Path, seed: int = 0) -> Path:
    """DenseNet-121 with the release's 18 outputs and random weights, pickled whole under the release's file name."""
    with warnings.catch_warnings():
        import torchxrayvision as xrv
    entry = xrv.models.model_urls[RELEASE]
    torch.manual_seed(seed)
    model = xrv.models.DenseNet(weights=None, num_classes=len(entry["labels"])).eval()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / entry["weights_url"].rsplit("/", 1)[-1]
    torch.save(model, path)
    return path


class ClassifierClock:
    """Sums the seconds spent in cxrgen's verifier scoring (wrapped for the benchmark's process only)."""

    def __init__(self):
        from cxrgen.runs import verify_loop

        self.seconds, self.images, self._real = 0.0, 0, verify_loop.Verifier.score
        clock = self

        def score(verifier, files):
            started = time.perf_counter()
            try:
                return clock._real(verifier, files)
            finally:
                if verifier.stream is not None:
                    verifier.stream.synchronize()
                clock.seconds += time.perf_counter() - started
                clock.images += len(files)

        verify_loop.Verifier.score = score

    def reset(self) -> None:
        self.seconds, self.images = 0.0, 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 4 on CPU, 50 on CUDA)")
    parser.add_argument("--images", type=int, default=None, help="images per run (default: 4 on CPU, 64 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=0, help="cxrgen --batch-size (0: the engine's default)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of the pair of runs")
    parser.add_argument("--workdir", default=None, help="keep model files here between calls (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="toy architecture (smoke test only; figures mean nothing)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from cxrgen.config import RunConfig
    from cxrgen.runs.generate import generate
    from cxrgen.runs.state import inspect_run

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (50 if cuda else 4)
    images = args.images or (64 if cuda else 4)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cxrgen-verify-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    kind = "tiny" if args.tiny else "real"
    bundle, text = work / f"bundle-{kind}", work / f"text-{kind}"
    if not (work / f".built-{kind}").is_file():
        fake_model.build_bundle(bundle, tiny=args.tiny)
        fake_model.build_text_encoder(text, tiny=args.tiny)
        (work / f".built-{kind}").write_text("ok\n")
    weights = build_verifier(work / "verifier")
    manifest = work / "manifest.csv"
    prompts = fake_model.report_prompts(images)
    manifest.write_text("prompt,Pneumothorax\n" + "".join(f'"{p}",1\n' for p in prompts))
    clock = ClassifierClock()
    base = dict(manifest=str(manifest), model=str(bundle), text_encoder=str(text), steps=steps,
                batch_size=args.batch_size, device=str(device), quiet=True, cache_dir=str(work / "cache"))
    plain_s, verify_s, classifier_s, costs = [], [], [], []
    for repeat in range(args.repeats):
        for mode in ("plain", "verify"):
            out = work / "runs" / f"{mode}-{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            extra = dict(verify_labels=True, min_score=0.0, verifier_weights=str(weights)) if mode == "verify" else {}
            clock.reset()
            result = generate(RunConfig(out=str(out), **base, **extra), log=lambda message: None)
            if result.written != images:
                raise RuntimeError(f"{mode}: wrote {result.written} image(s), expected {images}")
            if mode == "plain":
                plain_s.append(result.seconds)
            else:
                verify_s.append(result.seconds)
                classifier_s.append(clock.seconds)
                costs.append(inspect_run(out).verification["cost"])
                if clock.images != images:
                    raise RuntimeError(f"the verifier scored {clock.images} image(s), expected {images}")
            log(f"repeat {repeat} {mode}: batch loop {result.seconds:.2f} s"
                + (f", classifier {clock.seconds:.2f} s" if mode == "verify" else ""))
    plain, verified, classifier = (statistics.median(v) for v in (plain_s, verify_s, classifier_s))
    report = {
        "benchmark": "verify", "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else
        platform.processor() or platform.machine(), "architecture": kind, "steps": steps, "images": images,
        "batch_size": args.batch_size, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "plain_loop_s": round(plain, 3), "verify_loop_s": round(verified, 3), "classifier_s": round(classifier, 3),
        "classifier_fraction": round(classifier / verified, 4) if verified > 0 else None,
        "overhead": round(verified / plain - 1.0, 4) if plain > 0 else None,
        "classifier_images_per_s": round(images / classifier, 2) if classifier > 0 else None,
        "retry_cost": statistics.median(costs),
    }
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"classifier pass: {100 * (report['classifier_fraction'] or 0):.2f}% of the verified run's batch loop "
          f"({classifier:.2f} s of {verified:.2f} s); plain loop {plain:.2f} s, overhead "
          f"{100 * (report['overhead'] or 0):+.1f}%")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
