"""The optional extras: which import names each needs, and one-line advice when one is missing."""
from __future__ import annotations

import importlib
import warnings

from cxrgen.errors import InputError

EXTRA_HINT = 'pip install "cxrgen[evaluate]"'
# Modules of the `evaluate` extra, by import name (what pip calls them differs only for scikit-learn).
EXTRA_MODULES = ("torchxrayvision", "torchmetrics", "sklearn", "matplotlib")


def require_extra(purpose: str = "cxrgen evaluate") -> None:
    """Import the evaluate extra's modules, or say in one line which install command fixes it.

    purpose: what needs them, as the message names it (`cxrgen evaluate`, `--verify`).
    """
    for name in EXTRA_MODULES:
        try:
            import_quietly(name)
        except ImportError as exc:
            raise InputError(f"{purpose} needs {name}, which is not installed ({exc}); install the "
                             f"evaluation extra with `{EXTRA_HINT}`") from None
        except Exception as exc:  # noqa: BLE001 - e.g. a torchvision built for another torch fails with RuntimeError
            raise InputError(f"cannot import {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                             f"install the evaluation extra with `{EXTRA_HINT}` and a torchvision built for your "
                             "torch (e.g. pip install torch==2.14.1 torchvision==0.29.1)") from None


def import_quietly(name: str):
    # torchxrayvision switches every warning of the process off when imported; keep the caller's filters.
    with warnings.catch_warnings():
        return importlib.import_module(name)
