"""Fixtures of the benchmarks' smoke tests: run a script of benchmarks/ offline with toy sizes, get its lines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture()
def run_benchmark():
    """run_benchmark(script, *args, timeout=900, check=True) -> (the last line as JSON, every stdout line,
    the process); check: the script must exit 0 (its stderr's end is the failure message)."""
    def run(script: str, *args, timeout: int = 900, check: bool = True):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=timeout)
        if check:
            assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.strip().splitlines()
        return json.loads(lines[-1]), lines, proc

    return run
