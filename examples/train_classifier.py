"""Does a cxrgen dataset help a classifier? Train DenseNet-121 (multi-label) on real chest X-rays alone and on
real + synthetic images, then compare per-finding AUROC on held-out real images.

    python examples/train_classifier.py --real train.csv --synthetic aug_out --epochs 5 --image-size 224

--real is a CSV/Parquet table with a path column (relative to --image-root or the table's folder) and one column
per finding holding 1, 0, -1 or blank (CheXpert / MIMIC-CXR-JPG style; -1 and blank count as 0 unless
--uncertain ones). --synthetic is a finished `cxrgen generate` output folder; its label columns are the
manifest's (from `cxrgen manifest from-labels`: one 0/1 column per finding). --only-accepted keeps only the
images `cxrgen evaluate` accepted (OUT/quality/scores.parquet); --only-verified only those `cxrgen generate
--verify` confirmed (metadata column verified). Held out: --test TABLE, or a --holdout
share of the real rows (by --group-column, e.g. a patient id, when given). No weights are downloaded unless
you pass --pretrained (torchvision's ImageNet weights). Both settings start from the same seeded weights and
train --epochs over their own training set; --max-steps caps each (equal steps: a fairer comparison).

This file is also the reference for reading a cxrgen dataset: see load_synthetic().
Needs: torch, torchvision, scikit-learn, datasets>=3.4, pandas, pillow.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

# The 14 CheXpert / MIMIC-CXR findings: label columns with these names (any case, _ or space) are used.
CHEXPERT_14 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
               "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
               "Pneumothorax", "Support Devices")


def normalize(name: str) -> str:
    """`Pleural_Effusion`, `pleural effusion` and `Pleural Effusion` are the same column."""
    return " ".join(str(name).replace("_", " ").lower().split())


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", required=True, type=Path, help="CSV/Parquet: path column + finding columns")
    parser.add_argument("--synthetic", type=Path, help="a finished cxrgen output folder (holds metadata.parquet)")
    parser.add_argument("--test", type=Path, help="held-out real table (default: --holdout of --real)")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of --real held out when no --test")
    parser.add_argument("--group-column", help="keep rows with the same value (a patient id) on one side")
    parser.add_argument("--path-column", default="path", help="column with the image path (any case)")
    parser.add_argument("--image-root", type=Path, help="folder the paths are relative to (default: the table's "
                        "folder; CheXpert's train.csv: the folder holding CheXpert-v1.0-small/)")
    parser.add_argument("--findings", help="comma-separated finding columns (default: those of the 14 CheXpert "
                        "findings present in the real table and the synthetic labels)")
    parser.add_argument("--uncertain", choices=("zeros", "ones"), default="zeros", help="-1 counts as 0 or 1")
    parser.add_argument("--only-accepted", action="store_true", help="only images cxrgen evaluate accepted")
    parser.add_argument("--only-verified", action="store_true", help="only images cxrgen generate --verify confirmed")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=0, help="stop each training after N steps (0: no limit)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--pretrained", action="store_true", help="start from torchvision's ImageNet weights "
                        "(downloaded once by torchvision)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", help="Hugging Face datasets cache (default: theirs)")
    parser.add_argument("--report", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data

def read_real(table: Path, path_column: str, root: Path | None = None) -> pd.DataFrame:
    """A real label table with an absolute `__path` column (relative paths: to `root`, else the table's folder)."""
    frame = pd.read_parquet(table) if table.suffix.lower() in (".parquet", ".pq") else \
        pd.read_csv(table, sep="\t" if table.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
    column = next((c for c in frame.columns if normalize(c) == normalize(path_column)), None)
    if column is None:
        raise SystemExit(f"{table}: no column {path_column!r}; name the image path column with --path-column")
    root = root or table.parent
    frame["__path"] = [str(p) if Path(p).is_absolute() else str(root / p) for p in frame[column]]
    return frame


def load_synthetic(out: Path, only_accepted: bool = False, cache_dir: str | None = None, only_verified: bool = False):
    """A cxrgen output folder as a Hugging Face dataset: the images plus every metadata.parquet column.

    The folder's dataset card (OUT/README.md) pins its one `train` split, so `quality/`, `preview/` or an
    image id such as `test-3` never becomes a split of its own.
    """
    import datasets

    if not (out / "README.md").is_file():
        raise SystemExit(f"{out}: no dataset card (README.md); finish the run first, or add the card to a run "
                         f"finished by an older cxrgen: cxrgen resume {out}")
    dataset = datasets.load_dataset(str(out), split="train", cache_dir=cache_dir)
    if only_accepted:
        scores = out / "quality" / "scores.parquet"
        if not scores.is_file():
            raise SystemExit(f"--only-accepted: {scores} does not exist; run `cxrgen evaluate {out}` first")
        table = pd.read_parquet(scores, columns=["image_id", "accepted"])
        accepted = set(table.loc[table["accepted"].astype(bool), "image_id"])
        dataset = dataset.filter(lambda ids: [i in accepted for i in ids], input_columns="image_id", batched=True)
    if only_verified:
        if "verified" not in dataset.column_names or not any(v is not None for v in dataset["verified"]):
            raise SystemExit(f"--only-verified: {out} was not made with `cxrgen generate --verify`")
        # True: confirmed; False: every attempt was rejected (the best kept); None: the row had no positive label
        dataset = dataset.filter(lambda flags: [v is True for v in flags], input_columns="verified", batched=True)
    return dataset


def labels_of(values, uncertain: str) -> np.ndarray:
    """1 / 0 per cell: 1 and true are positive; -1 is `uncertain`; 0, false and blank are negative."""
    result = []
    for value in values:
        text = str(value).strip().lower()
        if text in ("1", "1.0", "true"):
            result.append(1.0)
        elif text in ("-1", "-1.0"):
            result.append(1.0 if uncertain == "ones" else 0.0)
        else:
            result.append(0.0)
    return np.array(result, dtype=np.float32)


class Images(torch.utils.data.Dataset):
    """(image tensor, label vector) from real files and/or a synthetic dataset, resized, 3 channels."""

    def __init__(self, real_paths: list[str], real_labels: np.ndarray, synthetic=None,
                 synthetic_labels: np.ndarray | None = None, size: int = 224, imagenet: bool = False):
        self.real_paths, self.real_labels = real_paths, real_labels
        self.synthetic, self.synthetic_labels = synthetic, synthetic_labels
        self.size, self.imagenet = size, imagenet

    def __len__(self) -> int:
        return len(self.real_paths) + (len(self.synthetic) if self.synthetic is not None else 0)

    def __getitem__(self, index: int):
        if index < len(self.real_paths):
            with Image.open(self.real_paths[index]) as image:
                pixels, label = self._tensor(image), self.real_labels[index]
        else:
            k = index - len(self.real_paths)
            pixels, label = self._tensor(self.synthetic[k]["image"]), self.synthetic_labels[k]
        return pixels, torch.from_numpy(label)

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        gray = image.convert("L").resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None].repeat(3, 1, 1)
        if self.imagenet:  # the statistics the pretrained weights expect
            mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
            std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
            return (x - mean) / std
        return (x - 0.5) / 0.5


# ------------------------------------------------------------------------------------------------ model

def make_model(classes: int, pretrained: bool) -> torch.nn.Module:
    """torchvision's DenseNet-121 with a new multi-label head; no download unless pretrained."""
    from torchvision.models import DenseNet121_Weights, densenet121

    model = densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1 if pretrained else None)
    model.classifier = torch.nn.Linear(model.classifier.in_features, classes)
    return model


def train(data: Images, classes: int, args, device: torch.device) -> tuple[torch.nn.Module, int]:
    """Train from the same seeded start for --epochs (at most --max-steps); returns the model and its steps."""
    torch.manual_seed(args.seed)
    model = make_model(classes, args.pretrained).to(device)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         generator=torch.Generator().manual_seed(args.seed), drop_last=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    steps = 0
    model.train()
    for _ in range(args.epochs):
        for pixels, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(pixels.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            steps += 1
            if args.max_steps and steps >= args.max_steps:
                return model, steps
    return model, steps


@torch.no_grad()
def auroc(model: torch.nn.Module, data: Images, findings: list[str], args, device) -> dict[str, float | None]:
    """Per-finding AUROC on the held-out set (None where it holds only positives or only negatives)."""
    from sklearn.metrics import roc_auc_score

    model.eval()
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.workers)
    scores, truth = [], []
    for pixels, labels in loader:
        scores.append(torch.sigmoid(model(pixels.to(device))).float().cpu().numpy())
        truth.append(labels.numpy())
    scores, truth = np.concatenate(scores), np.concatenate(truth)
    result = {}
    for i, finding in enumerate(findings):
        both = 0 < truth[:, i].sum() < len(truth)
        result[finding] = float(roc_auc_score(truth[:, i], scores[:, i])) if both else None
    return result


# ------------------------------------------------------------------------------------------------ main

def split(frame: pd.DataFrame, share: float, group: str | None, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) rows of the real table; whole groups (patients) go to one side."""
    keys = frame[group].astype(str) if group else pd.Series(range(len(frame)), index=frame.index).astype(str)
    unique = sorted(set(keys))
    random.Random(seed).shuffle(unique)
    held = set(unique[:max(1, math.ceil(share * len(unique)))])
    test = keys.isin(held)
    return frame[~test], frame[test]


def main(argv=None) -> dict:
    """Run both trainings and return {"findings", "settings": {name: {"auroc", "mean_auroc", ...}}}."""
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    real = read_real(args.real, args.path_column, args.image_root)
    if args.test:
        train_real, test_real = real, read_real(args.test, args.path_column, args.image_root)
    else:
        train_real, test_real = split(real, args.holdout, args.group_column, args.seed)
    synthetic = load_synthetic(args.synthetic, args.only_accepted, args.cache_dir, args.only_verified) \
        if args.synthetic else None

    real_columns = {normalize(c): c for c in real.columns}
    synthetic_columns = {normalize(c): c for c in synthetic.column_names} if synthetic is not None else None
    wanted = [normalize(f) for f in args.findings.split(",")] if args.findings else \
        [normalize(f) for f in CHEXPERT_14 if normalize(f) in real_columns and
         (synthetic_columns is None or normalize(f) in synthetic_columns)]
    for name in wanted:
        if name not in real_columns or (synthetic_columns is not None and name not in synthetic_columns):
            raise SystemExit(f"finding {name!r} is not a column of both the real table and the synthetic labels")
    if not wanted:
        raise SystemExit("no finding column in common; name them with --findings")
    findings = [real_columns[n] for n in wanted]

    def matrix(frame: pd.DataFrame) -> np.ndarray:
        return np.stack([labels_of(frame[real_columns[n]], args.uncertain) for n in wanted], axis=1)

    imagenet = args.pretrained
    test = Images(list(test_real["__path"]), matrix(test_real), size=args.image_size, imagenet=imagenet)
    settings = {"real_only": Images(list(train_real["__path"]), matrix(train_real), size=args.image_size,
                                    imagenet=imagenet)}
    if synthetic is not None:
        synthetic_labels = np.stack([labels_of(synthetic[synthetic_columns[n]], args.uncertain) for n in wanted],
                                    axis=1)
        settings["real_plus_synthetic"] = Images(list(train_real["__path"]), matrix(train_real), synthetic,
                                                 synthetic_labels, size=args.image_size, imagenet=imagenet)
    results = {"findings": findings, "test_images": len(test), "settings": {}}
    for name, data in settings.items():
        model, steps = train(data, len(findings), args, device)
        scores = auroc(model, test, findings, args, device)
        defined = [v for v in scores.values() if v is not None]
        results["settings"][name] = {"train_images": len(data), "steps": steps, "auroc": scores,
                                     "mean_auroc": float(np.mean(defined)) if defined else None}
    _print(results)
    if args.report:
        args.report.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _print(results: dict) -> None:
    names = list(results["settings"])
    print(f"held-out real images: {results['test_images']}")
    print(f"{'finding':<28}" + "".join(f"{n:>22}" for n in names))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for finding in results["findings"]:
        print(f"{finding:<28}" + "".join(f"{fmt(results['settings'][n]['auroc'][finding]):>22}" for n in names))
    print(f"{'mean':<28}" + "".join(f"{fmt(results['settings'][n]['mean_auroc']):>22}" for n in names))
    print(f"{'train images / steps':<28}" + "".join(
        f"{str(results['settings'][n]['train_images']) + ' / ' + str(results['settings'][n]['steps']):>22}"
        for n in names))


if __name__ == "__main__":
    main(sys.argv[1:])
