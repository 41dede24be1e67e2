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
    problem = extra_problem(purpose)
    if problem is not None:
        raise InputError(problem)


def extra_problem(purpose: str = "cxrgen evaluate") -> str | None:
    """Why the evaluate extra cannot be used, with the install command that fixes it; None when it imports."""
    for name in EXTRA_MODULES:
        try:
            import_quietly(name)
        except ImportError as exc:
            return (f"{purpose} needs {name}, which is not installed ({exc}); install the evaluation extra "
                    f"with `{EXTRA_HINT}`")
        except Exception as exc:  # noqa: BLE001 - e.g. a torchvision built for another torch fails with RuntimeError
            return (f"cannot import {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); install the "
                    f"evaluation extra with `{EXTRA_HINT}` and a torchvision built for your torch (e.g. pip install "
                    "torch==2.14.1 torchvision==0.29.1)")
    return None


def import_quietly(name: str):
    # torchxrayvision switches every warning of the process off when imported; keep the caller's filters.
    with warnings.catch_warnings():
        return importlib.import_module(name)
