"""The chest X-ray classifier of `cxrgen evaluate` and `cxrgen generate --verify`: torchxrayvision's DenseNet-121.

Finds or downloads a release file (the evaluator's `densenet121-res224-all`, the verifier's default
`densenet121-res224-chex`, or another torchxrayvision DenseNet release), loads it without running code from the
file (an allow-list of classes), preprocesses images exactly as torchxrayvision expects, and returns the 1024-d
`features2` vector and the calibrated scores of the pathologies the release was trained on, from one forward pass.
"""
from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxrgen.errors import InputError, first_line
from cxrgen.extras import import_quietly
from cxrgen.files import file_digest
from cxrgen.hub.sources import Source
from cxrgen.pins import (
    EVALUATOR_FILE,
    EVALUATOR_RELEASE,
    EVALUATOR_SIZE,
    KNOWN_SHA256,
    VERIFIER_RELEASE,
)

RELEASE = EVALUATOR_RELEASE  # torchxrayvision's name of the weights trained on every dataset
INPUT_SIZE = 224  # the release's input_resolution
FEATURES = 1024  # width of DenseNet-121's features2 output
DENSENET_PREFIX = "densenet121-res224-"  # torchxrayvision's DenseNet-121 releases at 224 px (the others differ)


def _xrv():
    return import_quietly("torchxrayvision")


def release_info(release: str = RELEASE) -> dict:
    """URL, file name, pathology labels and op_threshs calibration of a release, as torchxrayvision lists them.

    Labels are "" where the release's output is untrained (a pathology outside its training set).
    """
    entry = _xrv().models.model_urls[release]
    url = entry["weights_url"]
    return {"url": url, "file_name": url.rsplit("/", 1)[-1], "labels": list(entry["labels"]),
            "op_threshs": list(entry["op_threshs"])}


def resolve_weights(weights: str | Path | None, cache_dir: str | Path, source: Source | None = None, *,
                    offline: bool = False, progress: bool = True) -> Path:
    """The weight file: --evaluator-weights itself, else $CXRGEN_HOME/torchxrayvision/<release file>, fetched once.

    The fetch is `cxrgen download --evaluator`'s: the hub's copy through huggingface_hub when it is the release,
    else the GitHub release through a resumable .part file; under the cache's lock (many evaluations started at
    once download once), checked against the release's sha256 and recorded as verified.
    """
    from cxrgen.hub.components import evaluator_component

    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InputError(f"--evaluator-weights {weights}: no such file; give the torchxrayvision {RELEASE} "
                             "release file (.pt)")
        return path.resolve()
    info = release_info()
    return _fetch(evaluator_component(info["url"], cache_dir), info, source, offline, progress,
                  "evaluator weights", "--evaluator-weights FILE")


def releases() -> list[str]:
    """torchxrayvision's DenseNet-121 releases at 224 px (densenet121-res224-*), the ones cxrgen can load."""
    return sorted(name for name in _xrv().models.model_urls if name.startswith(DENSENET_PREFIX))


def release_of_file(path: Path) -> str | None:
    """The DenseNet release whose published file name `path` carries; None for any other name."""
    return next((name for name in releases() if release_info(name)["file_name"] == Path(path).name), None)


def resolve_verifier(weights: str, cache_dir: str | Path, source: Source | None = None, *, offline: bool = False,
                     progress: bool = True) -> tuple[str, Path]:
    """(release, weight file) of --verifier-weights: "" for the pinned default, a release name (its file fetched
    once into $CXRGEN_HOME/verifiers/<release>/, as `cxrgen download --verifier` stages it) or a file.

    A file is known by the name its release publishes it under (the name says which pathologies its outputs
    were trained on and how they are calibrated); a renamed file is refused rather than guessed at.
    """
    from cxrgen.hub.components import verifier_component

    value = str(weights or VERIFIER_RELEASE)
    known = releases()
    name = next((n for n in (value, DENSENET_PREFIX + value) if n in known), None)
    if name is not None:
        info = release_info(name)
        return name, _fetch(verifier_component(info["url"], cache_dir, name), info, source, offline, progress,
                            "verifier weights", "--verifier-weights FILE")
    path = Path(value).expanduser()
    if not path.is_file():
        raise InputError(f"--verifier-weights {value}: no such file and no torchxrayvision release of that name; give "
                         f"a release ({', '.join(n[len(DENSENET_PREFIX):] for n in known)}, with or without the "
                         f"{DENSENET_PREFIX} prefix) or a release file (.pt)")
    release = release_of_file(path)
    if release is None:
        example = release_info(VERIFIER_RELEASE)["file_name"]
        raise InputError(f"--verifier-weights {value}: cannot tell which torchxrayvision release this file is (its "
                         f"name is none of theirs, e.g. {example}); keep the file name its release publishes, or "
                         "give the release's name instead of the file")
    return release, path.resolve()


def _fetch(component, info: dict, source: Source | None, offline: bool, progress: bool, what: str,
           flag: str) -> Path:
    """The component's release file, staged (fetched once, under the cache's lock) unless already there."""
    from cxrgen.hub.components import Unavailable, offline_error
    from cxrgen.hub.download import stage

    dest = component.folder / info["file_name"]
    if dest.is_file():  # staged by `cxrgen download`, or placed there by hand
        return dest.resolve()
    if offline:
        raise offline_error(component)
    try:
        stage(component, source, progress=progress)
    except Unavailable as exc:  # offline, HTTP error, proxy: all end in the same advice
        raise InputError(f"cannot download the {what} {info['url']} ({exc.reasons}); download that file "
                         f"on a connected machine and place it at {dest}, or pass {flag}") from None
    return dest.resolve()


def weights_identity(path: Path, sha256: str) -> dict:
    """The weight file actually used, and whether it is torchxrayvision's published release file.

    The published file is recognised by its sha256 (pins.KNOWN_SHA256; its name is reported, but a renamed
    copy of the same bytes is the same file). Where no digest is published for the release's file name, a file
    of that name "cannot be checked" (None) and a file of another name is not the release.
    """
    info = release_info()
    name, size = info["file_name"], path.stat().st_size
    want = KNOWN_SHA256.get(name)
    if want is not None:
        published = sha256 == want
        reason = "its sha256 is the published release's" if published else \
            f"its sha256 differs from the published release's ({want})" + \
            (f" and its size ({size:,} bytes) from the release's {EVALUATOR_SIZE:,}"
             if name == EVALUATOR_FILE and size != EVALUATOR_SIZE else "")
    elif path.name != name:
        published, reason = False, f"its name is not the release file's ({name}) and no digest is published"
    else:
        published, reason = None, "no sha256 of the release is known to cxrgen, so it cannot be checked"
    return {"file_name": path.name, "size": size, "sha256": sha256, "published_release": published,
            "release_file": name, "release_sha256": want, "check": reason}


def allowed_classes() -> list[type]:
    """Every class the release's pickled whole model may name: DenseNet parts of torch, torchvision, torchxrayvision."""
    import torchvision.models.densenet as tv_densenet

    xrv_models = _xrv().models
    nn = torch.nn
    return [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear,
            nn.Sequential, nn.Dropout,
            tv_densenet.DenseNet, tv_densenet._DenseLayer, tv_densenet._DenseBlock, tv_densenet._Transition,
            xrv_models.DenseNet, xrv_models._DenseLayer, xrv_models._DenseBlock, xrv_models._Transition]


# torch names a refused global in several wordings ("Unsupported global: GLOBAL x.Y was not an allowed global by
# default", "Trying to load unsupported GLOBAL posix.system whose module posix is blocked")
_FOREIGN = re.compile(r"GLOBAL ([\w.]+)")


def _unpickling_reason(exc: BaseException) -> str:
    """The line of torch's weights-only error that says what was wrong, without its advice to retry unsafely."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))
              and "weights_only" not in line]
    return (useful[0] if useful else type(exc).__name__)[:200]


def _read_weights(path: Path, unsafe_pickle: bool, release: str = RELEASE,
                  unsafe_hint: str = "--evaluator-unsafe-pickle loads it as torchxrayvision itself does"):
    """What the file holds: torch.load(weights_only=True) under the allow-list, or plain torch.load if asked."""
    if unsafe_pickle:  # the user's explicit choice: runs code from the file, as torchxrayvision's own loader does
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means: not a usable model file
            raise InputError(f"{path} is not a torchxrayvision model file ({first_line(exc, with_type=True, limit=160)}); give the {release} "
                             "release file") from None
    try:
        with torch.serialization.safe_globals(allowed_classes()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = _FOREIGN.search(str(exc))
        if match:
            raise InputError(f"{path} refers to {match.group(1)}, which is not on cxrgen's allow-list of "
                             "torch/torchvision/torchxrayvision classes, so it was not loaded; if you trust the file, "
                             f"{unsafe_hint} (this runs code from the file)") from None
        raise InputError(f"{path} is not a torchxrayvision model file ({_unpickling_reason(exc)}); give the "
                         f"{release} release file") from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, text file, wrong magic number
        raise InputError(f"{path} is not a torchxrayvision model file ({first_line(exc, with_type=True, limit=160)}); give the {release} "
                         "release file") from None


@dataclass
class Evaluator:
    """The loaded classifier, ready for inference, and where its weights came from."""

    model: torch.nn.Module
    pathologies: list[str]  # classifier outputs kept (empty names dropped), in score-column order
    columns: list[int]  # their indices among the model's outputs
    op_threshs: torch.Tensor  # the release's calibration: a score of 0.5 is the operating point
    device: torch.device
    weights: Path
    sha256: str

    def forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """features2 (B, 1024) and calibrated scores (B, len(pathologies)) of preprocessed images, one pass."""
        if self.device.type == "cuda":  # a copy from pinned memory runs asynchronously; from pageable memory it cannot
            batch = batch.pin_memory()
        x = batch.to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # about 2x faster convolutions on CPU
        with torch.inference_mode():
            features = self.model.features2(x)
            # What DenseNet.forward does after features2: sigmoid, then op_norm so 0.5 is the operating point.
            probs = torch.sigmoid(self.model.classifier(features))
            scores = _xrv().models.op_norm(probs, self.op_threshs)
        return features.float().cpu().numpy(), scores[:, self.columns].float().cpu().numpy()


def load_evaluator(weights: Path, device: str = "cpu", unsafe_pickle: bool = False, release: str = RELEASE,
                   unsafe_hint: str | None = None) -> Evaluator:
    """Build torchxrayvision's DenseNet and load the weight file into it after checking every key and shape.

    release: the torchxrayvision release the file is (its calibration and which outputs are trained).
    """
    xrv = _xrv()
    info = release_info(release)
    loaded = _read_weights(weights, unsafe_pickle, release, *([unsafe_hint] if unsafe_hint else []))
    # Everything the file holds is untrusted here too: a module that contains itself (state_dict() recurses
    # without end) or whose state_dict is not a method must end in the one-line refusal, not a traceback.
    try:
        # a bare state dict of the same network is accepted too
        state = loaded.state_dict() if isinstance(loaded, torch.nn.Module) else loaded
        tensors = isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())
        state = dict(state) if tensors else None
    except Exception as exc:  # noqa: BLE001 - RecursionError, TypeError, ...: not a usable model
        raise InputError(f"{weights} holds a {type(loaded).__name__} whose weights cannot be read "
                         f"({first_line(exc, with_type=True, limit=160)}); give the {release} release file") from None
    if state is None:
        raise InputError(f"{weights} holds a {type(loaded).__name__}, not a torchxrayvision model; give the {release} "
                         "release file")
    # torchxrayvision itself sets the calibration from its table after loading; a saved copy is ignored.
    state.pop("op_threshs", None)
    model = xrv.models.DenseNet(weights=None, num_classes=len(info["labels"]))
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise InputError(f"{weights} is not a torchxrayvision {release} model: it lacks {key}; give the release "
                             "file or one saved in its format")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise InputError(f"{weights} is not a torchxrayvision {release} model: {key} has shape "
                             f"{tuple(state[key].shape)}, expected {tuple(tensor.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise InputError(f"{weights} is not a torchxrayvision {release} model: unexpected entry {extra[0]}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:  # e.g. a tensor of a dtype that cannot be copied into the network
        raise InputError(f"{weights} is not a torchxrayvision {release} model: "
                         f"{first_line(exc, with_type=True, limit=160)}") from None
    torch_device = torch.device(device)
    model = model.eval().requires_grad_(False).to(torch_device)
    if torch_device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    columns = [i for i, name in enumerate(info["labels"]) if name]  # older tables leave unused outputs unnamed
    return Evaluator(model=model, pathologies=[info["labels"][i] for i in columns], columns=columns,
                     op_threshs=torch.tensor(info["op_threshs"], dtype=torch.float32, device=torch_device),
                     device=torch_device, weights=weights, sha256=file_digest(weights, "sha256"))


# ---------------------------------------------------------------------------------------------- images

BLANK_STD = 2.0  # gray levels: below this standard deviation an image is near-constant ("blank")
SATURATED_SHARE = 0.5  # more than this share of pixels at 0 or 255 makes an image "saturated"


@dataclass
class Prepared:
    """One image after decoding: the evaluator's input and what the verdict and MS-SSIM need."""

    flags: list[str]  # "unreadable", "blank", "saturated"
    tensor: torch.Tensor | None  # (1, 224, 224) float32 in [-1024, 1024]; None when unreadable
    small: np.ndarray | None  # the same crop as uint8 (224, 224), for MS-SSIM; kept only when asked


def decode_gray(path: Path) -> np.ndarray:
    """An image file as a 2-D uint8 array: 16-bit files scaled to 8 bits, colour converted to gray."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # Keep the full 16-bit range instead of PIL's clipping to 255.
            return (np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).round().astype(np.uint8)
        return np.asarray(image.convert("L"))


def prepare(path: Path, keep_small: bool = False) -> Prepared:
    """Decode and preprocess one file; an unreadable file is flagged, never raised."""
    try:
        pixels = decode_gray(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return Prepared(["unreadable"], None, None)
    flags = []
    if float(pixels.std()) < BLANK_STD:
        flags.append("blank")
    if np.count_nonzero((pixels == 0) | (pixels == 255)) > SATURATED_SHARE * pixels.size:
        flags.append("saturated")
    image = preprocess(pixels)
    # numpy, not torch, on these threads: a torch op here would start a second OpenMP team beside the network's
    small = np.clip(np.rint((image[0] / 1024.0 + 1.0) * 127.5), 0, 255).astype(np.uint8) if keep_small else None
    return Prepared(flags, torch.from_numpy(image), small)


def preprocess(pixels: np.ndarray) -> np.ndarray:
    """torchxrayvision's pipeline: 8-bit -> [-1024, 1024], one channel, centre crop, 224 x 224 (skimage resize)."""
    datasets = _xrv().datasets
    image = datasets.normalize(pixels, 255)[None, :, :]
    image = datasets.XRayCenterCrop()(image)
    image = datasets.XRayResizer(INPUT_SIZE)(image)
    return np.ascontiguousarray(image, dtype=np.float32)
