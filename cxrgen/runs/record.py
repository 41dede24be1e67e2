"""run.json: what a run records about itself when it starts (settings, resolved devices and model, versions)."""
from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

from cxrgen import __version__
from cxrgen.config import RunConfig
from cxrgen.manifests.reader import Manifest
from cxrgen.runs.workers import Rank


def run_record(config: RunConfig, manifest: Manifest, settings: dict, bundle, devices: list[str],
              rank: Rank | None = None, verification: dict | None = None) -> dict:
    """What run.json holds: the config, the pixel settings compared on resume, what was resolved, versions."""
    data = {
        "cxrgen_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "settings": settings,
        "resolved": {
            "devices": devices, "bundle_root": str(bundle.spec.root), "model_name": bundle.spec.name,
            "model_version": bundle.spec.version, "height": bundle.spec.image_size[0],
            "width": bundle.spec.image_size[1], "latent_shape": list(bundle.spec.latent_shape),
            "demo": bundle.spec.demo,  # random weights: every output says its images are noise
        },
        "manifest": {"path": manifest.path, "sha256": manifest.sha256, "rows": len(manifest.rows)},
        "versions": library_versions(("torch", "monai", "transformers", "pyarrow", "pandas", "pillow", "numpy")),
        # an array job's split (count, and how task numbers map to shards): reruns of a task keep their shard
        "shards": rank.split if rank is not None and rank.shard is not None else None,
    }
    if verification is not None:  # the verifier's file and what the plan asks of it (status, card, gallery)
        data["verification"] = verification
    return data


def library_versions(names: tuple[str, ...], **known: str) -> dict:
    """Installed versions of `names` (None where one is missing), after `known` and the Python version."""
    found = {**known, "python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
