"""Find, download and load the MONAI chest X-ray bundle: its configs decide the architecture."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from cxrgen.errors import InputError
from cxrgen.hub.components import bundle_component
from cxrgen.hub.download import stage
from cxrgen.hub.sources import Source
from cxrgen.model.checkpoint import load_into, md5sum, read_state_dict

SCALE_FACTOR = 0.3  # latent scaling of the bundle's sampler (scripts/sampler.py)
_CLASSES = {"AutoencoderKL": "autoencoder_def", "DiffusionModelUNet": "diffusion_def"}
_SCHEDULES = {"scaled_linear": "scaled_linear_beta", "linear": "linear_beta"}

# Where a named bundle is downloaded from: cxrgen.hub.sources.WebSource (the default; tests point it at a hub on
# 127.0.0.1).
BundleSource = Source


@dataclass(frozen=True)
class BundleSpec:
    """What configs/inference.json and metadata.json say, in MONAI-core terms."""

    root: Path
    name: str
    version: str
    autoencoder_args: dict
    unet_args: dict
    scheduler_args: dict
    latent_shape: tuple[int, int, int]  # (channels, height, width) of one image's latent
    checkpoints: dict = field(default_factory=dict)  # "autoencoder"/"diffusion_model" -> file path
    demo: bool = False  # cxrgen's demo model (configs/metadata.json `cxrgen_demo`): random weights, noise images

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels: the autoencoder upsamples by 2 per extra level."""
        factor = 2 ** (len(self.autoencoder_args["channels"]) - 1)
        return self.latent_shape[1] * factor, self.latent_shape[2] * factor


def resolve_model(model: str, cache_dir: str | Path, source: BundleSource | None = None,
                  expected_md5: dict | None = None, *, offline: bool = False, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> Path:
    """A bundle folder: --model itself, or NAME[@VERSION] staged once in the cache (cxrgen.hub.download)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if "/" in model or "\\" in model or model.startswith("."):
        raise InputError(f"--model {model}: no such bundle folder; give a bundle directory or a bundle name "
                         "such as cxr_image_synthesis_latent_diffusion_model (optionally NAME@VERSION)")
    component = bundle_component(model, cache_dir, expected_md5)
    return stage(component, source, offline=offline, progress=progress, log=log).resolve()


def read_spec(root: str | Path) -> BundleSpec:
    """Parse configs/inference.json of either bundle generation (GenerativeModels or MONAI core)."""
    root = Path(root)
    config_path = root / "configs" / "inference.json"
    config = _read_json(config_path)
    meta = _read_json(root / "configs" / "metadata.json") if (root / "configs" / "metadata.json").is_file() else {}
    nets = {key: _network_args(config, key, config_path) for key in _CLASSES.values()}
    return BundleSpec(
        root=root.resolve(), name=meta.get("name", root.name), version=str(meta.get("version", "unknown")),
        autoencoder_args=nets["autoencoder_def"], unet_args=nets["diffusion_def"],
        scheduler_args=_scheduler_args(config, config_path),
        latent_shape=_latent_shape(config, nets["autoencoder_def"]),
        checkpoints={stem: _checkpoint_file(root, stem) for stem in ("autoencoder", "diffusion_model")},
        demo=meta.get("cxrgen_demo") is True,
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"bundle file {path} is missing; is --model a MONAI bundle folder?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"bundle file {path} is not valid JSON ({exc})") from None


def _network_args(config: dict, key: str, path: Path) -> dict:
    definition = config.get(key)
    if not isinstance(definition, dict) or "_target_" not in definition:
        raise InputError(f"{path}: key {key!r} with a _target_ network is missing")
    args = {k: v for k, v in definition.items() if not k.startswith("_")}
    if "num_channels" in args:  # GenerativeModels spelling (bundle v1.0.0)
        args["channels"] = args.pop("num_channels")
    return args


def _scheduler_args(config: dict, path: Path) -> dict:
    definition = config.get("scheduler")
    if not isinstance(definition, dict):
        raise InputError(f"{path}: key 'scheduler' is missing")
    args = {k: v for k, v in definition.items() if not k.startswith("_")}
    if "beta_schedule" in args:  # diffusers-style spelling of early configs
        args["schedule"] = _SCHEDULES.get(args["beta_schedule"], args.pop("beta_schedule"))
        args.pop("beta_schedule", None)
    return args


def _latent_shape(config: dict, autoencoder_args: dict) -> tuple[int, int, int]:
    """The bundle's noise expression, e.g. torch.randn((1, 3, 64, 64)), gives the latent size."""
    match = re.search(r"randn\(\s*\(\s*1\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)", str(config.get("noise", "")))
    if match:
        return tuple(int(v) for v in match.groups())
    return (int(autoencoder_args.get("latent_channels", 3)), 64, 64)


def _checkpoint_file(root: Path, stem: str) -> Path:
    for suffix in (".safetensors", ".pth", ".pt"):
        path = root / "models" / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise InputError(f"bundle checkpoint {root / 'models' / (stem + '.pth')} is missing; re-download the bundle")


@dataclass
class LoadedBundle:
    """Networks ready for inference, with the md5 of each checkpoint file used."""

    spec: BundleSpec
    autoencoder: torch.nn.Module
    unet: torch.nn.Module
    md5: dict


def load_bundle(spec: BundleSpec) -> LoadedBundle:
    """Build both networks from the spec and load their checkpoints after checking every key."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    nets = {}
    for stem, cls, args in (("autoencoder", AutoencoderKL, spec.autoencoder_args),
                            ("diffusion_model", DiffusionModelUNet, spec.unet_args)):
        try:
            # On the meta device: no memory and no random initialisation (seconds per network at full
            # size, paid by every worker and rank); every tensor comes from the checkpoint below.
            with torch.device("meta"):
                model = cls(**args)
        except (TypeError, ValueError, AssertionError) as exc:
            raise InputError(f"{spec.root / 'configs' / 'inference.json'}: cannot build {cls.__name__} ({exc})") from None
        path = spec.checkpoints[stem]
        load_into(model, read_state_dict(path), path)
        nets[stem] = model.eval().requires_grad_(False)
    md5 = {path.name: md5sum(path) for path in spec.checkpoints.values()}
    return LoadedBundle(spec, nets["autoencoder"], nets["diffusion_model"], md5)
