"""report.md and its PNG plots in OUT/quality/: what a person reads after `cxrgen evaluate`."""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Callable

import numpy as np

from cxrgen.markdown import md_code, md_text
from cxrgen.runs.journal import EVAL_DIR

Write = Callable[[Path, bytes], None]  # an atomic writer (evaluate's, so errors read the same)
_PLOT = re.compile(r"(score_\d+_.*|ms_ssim)\.png")  # the report's plots, as write_report names them


def write_report(folder: Path, summary: dict, scores: np.ndarray, states: dict, columns: dict,
                 ms_ssim: dict, write: Write) -> Path:
    """Write the plots and report.md into folder (a new, empty one: evaluate builds OUT/quality/ aside)."""
    plots: list[str] = []
    if any(v is not None and len(v) for v in ms_ssim.values()):
        write(folder / "ms_ssim.png", _ms_ssim_plot(ms_ssim))
        plots.append("ms_ssim.png")
    finding_plots = {}
    for number, (column, finding) in enumerate(summary["findings"].items()):
        name = f"score_{number:02d}_{_slug(column)}.png"
        write(folder / name, _score_plot(column, finding, states[column], scores[:, columns[finding["pathology"]]],
                                         summary["min_score"]))
        finding_plots[column] = name
        plots.append(name)
    path = folder / "report.md"
    write(path, _markdown(summary, finding_plots, "ms_ssim.png" in plots).encode("utf-8"))
    return path


def is_plot(name: str) -> bool:
    """Whether a file name is one of the report's plots (removed when a later evaluation lacks it)."""
    return bool(_PLOT.fullmatch(name))


def _slug(text: str) -> str:
    return (re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "column")[:40]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _figure():
    # The object API with the Agg canvas: no pyplot, so no global backend or window state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _ms_ssim_plot(ms_ssim: dict) -> bytes:
    figure, ax = _figure()
    bins = np.linspace(0.0, 1.0, 41)
    for (name, values), color in zip(ms_ssim.items(), ("tab:blue", "tab:orange", "tab:green")):
        if values is not None and len(values):
            label = f"{name.replace('_', ' ')}: mean {values.mean():.3f} ({len(values)} pairs)"
            ax.hist(values, bins=bins, histtype="step", linewidth=2, color=color, label=label, density=True)
    ax.set_xlabel("MS-SSIM between two images (lower = more different)")
    ax.set_ylabel("density")
    ax.set_title("Diversity: MS-SSIM of image pairs")
    ax.legend(loc="upper left", fontsize=8)
    return _png(figure)


def _score_plot(column: str, finding: dict, states: list, scores: np.ndarray, min_score: float) -> bytes:
    figure, ax = _figure()
    bins = np.linspace(0.0, 1.0, 21)
    for wanted, name, color in ((False, "negative", "tab:blue"), (True, "positive", "tab:red")):
        values = np.array([s for s, st in zip(scores, states) if st is wanted and np.isfinite(s)])
        if len(values):
            ax.hist(values, bins=bins, alpha=0.55, color=color, label=f"{name} label ({len(values)})")
    ax.axvline(min_score, color="black", linestyle="--", linewidth=1, label=f"--min-score {min_score:g}")
    auroc = "n/a" if finding["auroc"] is None else f"{finding['auroc']:.3f}"
    # label text is plain text: a column named "x $\\frac$ y" must not reach matplotlib's mathtext parser
    ax.set_title(f"{column} -> {finding['pathology']} (AUROC {auroc})", parse_math=False)
    ax.set_xlabel(f"classifier score for {finding['pathology']} (0.5 = operating point)", parse_math=False)
    ax.set_ylabel("images")
    ax.legend(loc="upper center", fontsize=8)
    return _png(figure)


def _withheld(entry: dict) -> str:
    return f"not meaningful: {entry['reason']}"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _verifier_note(s: dict) -> list[str]:
    """What the report must say about a run made with `cxrgen generate --verify`."""
    v = s.get("verifier")
    if v is None:
        return []
    if v["is_evaluator"]:
        return [f"**The evaluator is the verifier.** This run was made with `cxrgen generate --verify` judged by these "
                f"very weights (`{v['weights_file']}`, sha256 `{v['sha256'][:16]}...`, threshold {v['min_score']:g}): "
                "every verified image already passed this classifier, so the label adherence below is circular, not "
                "evidence. Evaluate with weights trained on other data (the default `densenet121-res224-all`, or "
                "`--evaluator-weights FILE`) for an independent figure.", ""]
    return [f"This run was made with `cxrgen generate --verify`, judged by other weights than this evaluation's "
            f"(`{v['release']}`, `{v['weights_file']}`, sha256 `{v['sha256'][:16]}...`, threshold "
            f"{v['min_score']:g}); the label adherence below is that of a second classifier.", ""]


def _markdown(s: dict, finding_plots: dict, has_ms_ssim_plot: bool) -> str:
    # every name from the manifest, the label map or the file system is escaped (cxrgen.markdown): viewers render HTML
    weights = s["evaluator"]
    verdict = {True: "**the published release**", False: "**not the published release**",
               None: "**not checked against the release**"}[weights["published_release"]]
    lines = ["# Evaluation of a cxrgen run", ""]
    if s.get("demo_model"):
        lines += ["> **Demo model: every image of this run is noise.** The figures below only show that the "
                  "evaluation runs; they say nothing about any model of chest X-rays.", ""]
    lines += [f"Run: {md_code(s['out'])}. {s['n_images']} images, {s['n_accepted']} accepted. Research use only.", "",
              f"Classifier: torchxrayvision {md_code(weights['release'])}, from the weight file "
              f"{md_code(weights['file_name'])} ({weights['size']:,} bytes, sha256 `{weights['sha256']}`, at "
              f"{md_code(weights['weights'])}): {verdict} ({md_text(weights['check'])}). Every score and figure below "
              "comes from this file."
              + ("" if weights["published_release"] else " Figures from another file are not comparable with "
                 "figures from the published classifier."), ""]
    lines += _verifier_note(s)
    # 1. fidelity
    lines += ["## Fidelity (against real images)", ""]
    absurd = s.get("not_meaningful", {})
    if s["n_real"] is None:
        lines += ["Not measured: run `cxrgen evaluate OUT --real DIR` with a folder of real chest X-rays.", ""]
    else:
        fid = _withheld(absurd["fid"]) if "fid" in absurd else _fmt(s["fid"])
        kid = _withheld(absurd["kid"]) if "kid" in absurd else f"{_fmt(s['kid_mean'])} ± {_fmt(s['kid_std'])}"
        lines += ["| figure | value | meaning |", "|---|---|---|",
                  f"| FID | {fid} | Fréchet distance between the DenseNet feature distributions of the "
                  "synthetic and real sets; 0 = same distribution, lower is better |",
                  f"| KID | {kid} | kernel (polynomial MMD) distance, unbiased "
                  f"at small sizes; mean ± std over {s['kid_subsets']} subsets of {s['kid_subset_size']} |",
                  f"| real images | {s['n_real']} of {s['n_real_files']} | unreadable real files skipped: "
                  f"{s['n_real_unreadable']} |", ""]
        if absurd:
            lines += ["**Not meaningful** figures are withheld: their computed values lie outside what their definition "
                      "allows for these features (see `not_meaningful` in summary.json), so they are no measurement "
                      "of the images.", ""]
        if s["fid_biased"] and not absurd:
            lines += ["**FID is biased at this size**: a side has fewer than 1,024 images, so FID is inflated and "
                      "only comparable with FIDs of sets of the same size; KID is the better guide here.", ""]
    # 2. diversity
    lines += ["## Diversity (MS-SSIM)", "",
              "Mean MS-SSIM between image pairs (data range 1, on the classifier's 224 x 224 input). Lower means more "
              "diverse. Pairs of the same prompt that score close to 1 mean the prompt yields near-copies.", "",
              "| pairs | mean MS-SSIM | pairs used |", "|---|---|---|",
              f"| same prompt | {_fmt(s['ms_ssim_within_prompt'])} | {_fmt(s['ms_ssim_within_prompt_pairs'])} |",
              f"| random synthetic | {_fmt(s['ms_ssim_random'])} | {_fmt(s['ms_ssim_random_pairs'])} |",
              f"| random real (reference) | {_fmt(s['ms_ssim_real'])} | {_fmt(s['ms_ssim_real_pairs'])} |", ""]
    if has_ms_ssim_plot:
        lines += ["![MS-SSIM histograms](ms_ssim.png)", ""]
    # 3. label adherence
    lines += ["## Label adherence", "",
              f"For each label column mapped to a classifier pathology: AUROC of the calibrated score separating "
              f"images labelled positive (1/true) from negative (0/false) ones (0.5 = chance), the positives' median "
              f"score, and agreement = share of positives scoring at least {s['min_score']:g}. -1 (uncertain) and "
              "blank labels are left out.", ""]
    if s["findings"]:
        lines += ["| column | pathology | positives | negatives | AUROC | median positive score | agreement |",
                  "|---|---|---|---|---|---|---|"]
        for column, f in s["findings"].items():
            lines.append(f"| {md_text(column)} | {md_text(f['pathology'])} | {f['n_pos']} | {f['n_neg']} | "
                         f"{_fmt(f['auroc'])} | {_fmt(f['median_pos_score'])} | {_fmt(f['agreement'])} |")
        lines += ["", "AUROC needs at least one positive and one negative image; n/a otherwise.", ""]
        for column, name in finding_plots.items():
            lines += [f"### {md_text(column)}", "", f"![scores of {md_text(column)}]({name})", ""]
    else:
        lines += ["No label column is mapped to a classifier pathology.", ""]
    if s["not_evaluated"]:
        lines += [f"Not evaluated (no classifier pathology mapped; add them with `--label-map`): "
                  f"{', '.join(md_text(c) for c in s['not_evaluated'])}.", ""]
    if s.get("findings_real"):
        lines += ["Reference on the real set's own labels (how well the classifier reads real images):", "",
                  "| column | pathology | positives | negatives | AUROC | agreement |", "|---|---|---|---|---|---|"]
        for column, f in s["findings_real"].items():
            lines.append(f"| {md_text(column)} | {md_text(f['pathology'])} | {f['n_pos']} | {f['n_neg']} | "
                         f"{_fmt(f['auroc'])} | {_fmt(f['agreement'])} |")
        lines.append("")
    # 4. verdicts
    lines += ["## Per-image verdict", "", "| flag | images | meaning |", "|---|---|---|"]
    meanings = {"unreadable": "the file does not decode", "blank": "near-constant image",
                "saturated": "most pixels at 0 or 255",
                "label_missing": f"a positive label scores below {s['min_score']:g}"}
    lines += [f"| {flag} | {count} | {meanings[flag]} |" for flag, count in s["n_flagged"].items()]
    lines += ["", f"**{s['n_accepted']} of {s['n_images']} images are accepted** (no flag). Keep only them when loading "
              "the dataset:", "", "```python", "import pandas as pd",
              f"meta = pd.read_parquet({str(Path(s['out']) / 'metadata.parquet')!r})",
              f"scores = pd.read_parquet({str(Path(s['out']) / EVAL_DIR / 'scores.parquet')!r})",
              'train = meta.merge(scores[["image_id", "accepted"]], on="image_id").query("accepted")', "```", "",
              "Per-image scores and flags: `scores.parquet`; every figure: `summary.json`.", ""]
    return "\n".join(lines)
