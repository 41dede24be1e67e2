"""Test material for `cxrgen evaluate`: a random-weight evaluator in the release file's format, fake finished runs
and synthetic 64 x 64 radiograph-like images (all built at test time; nothing is downloaded)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

with warnings.catch_warnings():  # torchxrayvision switches warnings off process-wide when imported
    import torchxrayvision as xrv

RELEASE = xrv.models.model_urls["densenet121-res224-all"]
RELEASE_FILE = RELEASE["weights_url"].rsplit("/", 1)[-1]


class Foreign(torch.nn.Module):
    """A class outside the evaluator's allow-list (stands for anything a pickle could name)."""

    def forward(self, x):
        return x


def build_model(seed: int = 0):
    """torchxrayvision's DenseNet with the release's architecture, pathologies and op_threshs, random weights.

    BatchNorm statistics are fitted on a few random smooth images (as training would fit them on radiographs),
    so activations stay in range and the calibrated scores spread over (0, 1) instead of saturating.
    """
    torch.manual_seed(seed)
    model = xrv.models.DenseNet(weights=None, num_classes=len(RELEASE["labels"]),
                                op_threshs=torch.tensor(RELEASE["op_threshs"]))
    model.pathologies = list(RELEASE["labels"])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the fitting batches
    generator = np.random.default_rng(seed)
    # 96 px instead of 224: per-channel statistics come out alike, at a fraction of the cost
    batch = torch.from_numpy((np.stack([radiograph(generator, 96) for _ in range(8)]) / 255.0 * 2 - 1)
                             .astype(np.float32) * 1024)[:, None]
    model.train()
    with torch.no_grad():
        model.features2(batch)
        model.eval()
        # Centre each logit on its operating point and widen it, so calibrated scores fall on both sides of 0.5.
        features = model.features2(batch)
        model.classifier.weight.mul_(1.5 / model.classifier(features).std(0).clamp_min(1e-6)[:, None])
        op = torch.tensor(RELEASE["op_threshs"])
        model.classifier.bias.add_(torch.log(op / (1 - op)) - model.classifier(features).mean(0))
    return model


def save_release(path: Path, seed: int = 0, model=None) -> Path:
    """Pickle the whole model with torch.save, as the release file is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model if model is not None else build_model(seed), path)
    return path


def save_verifier(folder: Path, release: str = "densenet121-res224-chex", seed: int = 0) -> Path:
    """A random-weight model saved under the file name `release` publishes, as `--verifier-weights` takes it (the
    name tells cxrgen which release, hence which outputs are trained and their calibration)."""
    name = xrv.models.model_urls[release]["weights_url"].rsplit("/", 1)[-1]
    return save_release(Path(folder) / name, seed)


def radiograph(rng: np.random.Generator, size: int = 64, brighten: int = 0) -> np.ndarray:
    """A smooth, radiograph-like uint8 image: blurred noise plus a bright blob, never constant or saturated."""
    coarse = rng.random((8, 8))
    image = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                       dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.random(2) * 0.6 + 0.2
    image = 0.5 * image + 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02) + 40
    return np.clip(image + brighten, 1, 254).astype(np.uint8)


def images(count: int, seed: int, brighten: int = 0, size: int = 64) -> list[np.ndarray]:
    """count radiograph-like images from one seed (the same seed gives the same images)."""
    rng = np.random.default_rng(seed)
    return [radiograph(rng, size, brighten) for _ in range(count)]


def write_image(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_run(out: Path, pixels: list, prompts: list[str] | None = None, labels: dict | None = None,
             planned: int | None = None, metadata: bool = True, fmt: str = "png", ids: list[str] | None = None) -> Path:
    """A finished cxrgen run folder made directly: run.json, images/00000/*, metadata.parquet (with label columns).

    An entry of pixels may be bytes: written as they are (an unreadable file, say). ids: the image ids, in plan
    order (default img000_0000, img001_0000, ...: already sorted).
    """
    out.mkdir(parents=True, exist_ok=True)
    ids = ids or [f"img{i:03d}_0000" for i in range(len(pixels))]
    names = [f"images/00000/{image_id}.{fmt}" for image_id in ids]
    for name, image in zip(names, pixels):
        if isinstance(image, bytes):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(image)
        else:
            write_image(out / name, image)
    run = {"cxrgen_version": "0.1.0", "config": {"out": str(out)},
           "settings": {"planned_images": len(pixels) if planned is None else planned}}
    (out / "run.json").write_text(json.dumps(run))
    if metadata:
        columns = {"image_id": ids, "file_name": names,
                   "prompt": prompts if prompts is not None else [f"prompt {i // 2}" for i in range(len(pixels))]}
        table = pa.table({**columns, **(labels or {})})
        pq.write_table(table, out / "metadata.parquet")
    return out


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Independent Fréchet distance between two feature sets (numpy/scipy).

    Tr sqrt(S1 S2) is computed as Tr sqrt(R S2 R) with R = sqrt(S1), both symmetric, so only symmetric
    eigen-decompositions are needed (torchmetrics takes the eigenvalues of the non-symmetric S1 S2 instead).
    """
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = linalg.eigh(s1)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_sqrt = np.sqrt(np.clip(linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def kid_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """Independent unbiased polynomial-kernel MMD^2 over the whole sets (Bińkowski et al.'s KID estimator)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    gamma = 1.0 / x.shape[1]
    kxx = (x @ x.T * gamma + coef) ** degree
    kyy = (y @ y.T * gamma + coef) ** degree
    kxy = (x @ y.T * gamma + coef) ** degree
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.sum() / (m * n))
