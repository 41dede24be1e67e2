"""The evaluation's figures: FID and KID (torchmetrics), MS-SSIM between pairs (torchmetrics) and label adherence
(scikit-learn). The label map that ties manifest label columns to the classifier's pathologies is
cxrgen.model.label_map, shared with `cxrgen generate --verify`; its names are re-exported here."""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import torch

from cxrgen.model.classifier import FEATURES
from cxrgen.model.label_map import (  # noqa: F401 - one map for evaluate and --verify
    ALIASES,
    label_state,
    map_columns,
    normalize_name,
    read_label_map,
)

FID_UNBIASED_AT = 1024  # below this many images on either side FID is biased upwards (and the report says so)
KID_SUBSET_SIZE = 1000  # torchmetrics' default; smaller sets use all their images per subset
KID_SUBSETS = 100  # torchmetrics' default
PAIR_SEED = 0  # pairs and KID subsets are drawn from fixed seeds, so re-running gives the same figures
MS_SSIM_BATCH = 64  # pairs per MS-SSIM call (64 was the fastest on the 2-core CPU; ~0.5 GB of temporaries)
# DenseNet-121's features2 are averages of batch-normalised, ReLU'd activations: a trained network gives values of
# order 1 to 10. Values beyond this come from weights that are not a working classifier (or a broken input).
FEATURE_LIMIT = 1e4


# ---------------------------------------------------------------------------------------------- FID / KID

class PrecomputedFeatures(torch.nn.Module):
    """torchmetrics' feature-extractor slot, given the DenseNet features2 vectors the image pass already made.

    The features come from the same forward pass as the scores, so nothing runs twice and the real set's
    features can be cached; torchmetrics then does the statistics.
    """

    num_features = FEATURES  # read by FrechetInceptionDistance instead of probing with a dummy image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(synthetic: np.ndarray, real: np.ndarray) -> dict:
    """FID and KID (mean, std over subsets) between two (N, 1024) feature arrays; None where a side has < 2 rows."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    result = {"fid": None, "kid_mean": None, "kid_std": None, "kid_subset_size": None, "kid_subsets": None}
    if len(synthetic) < 2 or len(real) < 2:
        return result
    fake_t, real_t = torch.from_numpy(synthetic).double(), torch.from_numpy(real).double()
    fid = FrechetInceptionDistance(feature=PrecomputedFeatures())
    fid.update(real_t, real=True)
    fid.update(fake_t, real=False)
    subset_size = min(KID_SUBSET_SIZE, len(synthetic), len(real))
    with warnings.catch_warnings():  # "KID keeps every feature in memory": it is what we want
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=PrecomputedFeatures(), subsets=KID_SUBSETS, subset_size=subset_size)
    kid.update(real_t, real=True)
    kid.update(fake_t, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws subsets from torch's global generator: seed a copy
        torch.manual_seed(PAIR_SEED)
        kid_mean, kid_std = kid.compute()
    result.update(fid=float(fid.compute()), kid_mean=float(kid_mean), kid_std=float(kid_std),
                  kid_subset_size=subset_size, kid_subsets=KID_SUBSETS)
    return result


def not_meaningful(synthetic: np.ndarray, real: np.ndarray, figures: dict) -> dict[str, str]:
    """Why FID or KID (keys "fid", "kid") cannot be figures of these features: {} when both are plausible.

    Each is checked against what its definition allows for these very features, so only a numerical failure or
    absurd features are flagged, never a large but real distance:
    - FID = |mu_s - mu_r|^2 + Tr S_s + Tr S_r - 2 Tr sqrt(S_s S_r) lies in [|mu_s - mu_r|^2, |mu_s - mu_r|^2 +
      Tr S_s + Tr S_r] (the last term is between 0 and Tr S_s + Tr S_r); a small tolerance covers the matrix
      square root's rounding.
    - KID is the unbiased MMD^2 of the kernel k(x, y) = (x.y / d + 1)^3 over subsets of m images: at least
      -(max k(x, x) + max k(y, y)) / (m - 1) (reached only by identical sets), at most (sqrt(max k(x, x)) +
      sqrt(max k(y, y)))^2 (1 + 2 / (m - 1)).
    - features beyond FEATURE_LIMIT make both meaningless whatever their values.
    """
    reasons: dict[str, str] = {}
    fid, kid, m = figures.get("fid"), figures.get("kid_mean"), figures.get("kid_subset_size")
    if fid is None and kid is None:
        return reasons
    biggest = float(max(np.abs(synthetic).max(), np.abs(real).max()))
    if not math.isfinite(biggest) or biggest > FEATURE_LIMIT:
        why = (f"the classifier's features reach {biggest:.3g}, far beyond a trained DenseNet-121's (order 1 to 10, "
               f"at most {FEATURE_LIMIT:g}): its weights are not a working classifier")
        return {name: why for name, value in (("fid", fid), ("kid", kid)) if value is not None}
    s, r = synthetic.astype(np.float64), real.astype(np.float64)
    if fid is not None:
        gap = float(((s.mean(0) - r.mean(0)) ** 2).sum())
        traces = float(s.var(0, ddof=1).sum() + r.var(0, ddof=1).sum())
        low, high = gap - 1e-3 * traces - 1e-9, (gap + traces) * (1 + 1e-6) + 1e-9
        if not (math.isfinite(fid) and low <= fid <= high):
            reasons["fid"] = (f"FID {fid:.4g} is outside the range its definition allows for these features "
                              f"[{max(gap, 0.0):.4g}, {gap + traces:.4g}]: a numerical failure")
    if kid is not None and m:
        d = s.shape[1]
        kxx, kyy = (((s * s).sum(1) / d + 1) ** 3).max(), (((r * r).sum(1) / d + 1) ** 3).max()
        low = -(kxx + kyy) / (m - 1) * (1 + 1e-6)
        high = (math.sqrt(kxx) + math.sqrt(kyy)) ** 2 * (1 + 2 / (m - 1)) * (1 + 1e-6)
        if not (math.isfinite(kid) and low <= kid <= high):
            reasons["kid"] = (f"KID {kid:.4g} is outside the range its unbiased estimate can take for these features "
                              f"[{low:.4g}, {high:.4g}]: a numerical failure")
    return reasons


# ---------------------------------------------------------------------------------------------- MS-SSIM

def random_pairs(n: int, max_pairs: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Distinct unordered pairs of n items: all when there are at most max_pairs, else max_pairs drawn at random."""
    if n * (n - 1) // 2 <= max_pairs:
        return list(itertools.combinations(range(n), 2))
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < max_pairs:
        i, j = (int(v) for v in rng.integers(n, size=2))
        if i != j:
            chosen.add((min(i, j), max(i, j)))
    return sorted(chosen)


def group_pairs(groups: list[list[int]], max_pairs: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pairs within each group (groups of one give none): all, or max_pairs drawn uniformly over all such pairs."""
    groups = [g for g in groups if len(g) >= 2]
    counts = np.array([len(g) * (len(g) - 1) // 2 for g in groups], dtype=np.float64)
    if counts.sum() <= max_pairs:
        return [pair for g in groups for pair in itertools.combinations(g, 2)]
    chosen: set[tuple[int, int]] = set()
    weights = counts / counts.sum()  # a group's share of all within-group pairs
    while len(chosen) < max_pairs:
        group = groups[int(rng.choice(len(groups), p=weights))]
        i, j = (group[int(k)] for k in rng.choice(len(group), size=2, replace=False))
        chosen.add((min(i, j), max(i, j)))
    return sorted(chosen)


def ms_ssim_values(images: dict[int, np.ndarray], pairs: list[tuple[int, int]]) -> np.ndarray:
    """MS-SSIM (data range 1, grayscale) of each pair of uint8 images; pairs naming a missing image are skipped."""
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure as ms_ssim,
    )

    usable = [(i, j) for i, j in pairs if i in images and j in images]
    values = []
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on oneDNN TF32 when the flag is switched
        # oneDNN's kernel for a one-channel 11 x 11 window is ~1.6x slower than ATen's own on CPU (measured)
        with torch.backends.mkldnn.flags(enabled=False):
            for start in range(0, len(usable), MS_SSIM_BATCH):
                chunk = usable[start:start + MS_SSIM_BATCH]
                a = torch.from_numpy(np.stack([images[i] for i, _ in chunk]))[:, None].float() / 255.0
                b = torch.from_numpy(np.stack([images[j] for _, j in chunk]))[:, None].float() / 255.0
                values.append(ms_ssim(a, b, data_range=1.0, reduction="none").double().numpy())
    return np.concatenate(values) if values else np.zeros(0)


def adherence(states: list[bool | None], scores: np.ndarray, min_score: float) -> dict:
    """AUROC (scikit-learn), positives' median score and agreement for one finding; NaN scores are left out."""
    from sklearn.metrics import roc_auc_score

    keep = [i for i, s in enumerate(states) if s is not None and np.isfinite(scores[i])]
    y = np.array([states[i] for i in keep], dtype=bool)
    s = scores[keep]
    pos = s[y]
    entry = {"n_pos": int(y.sum()), "n_neg": int((~y).sum()), "auroc": None,
             "median_pos_score": float(np.median(pos)) if len(pos) else None,
             "agreement": float(np.mean(pos >= min_score)) if len(pos) else None}
    if entry["n_pos"] and entry["n_neg"]:
        entry["auroc"] = float(roc_auc_score(y, s))
    return entry
