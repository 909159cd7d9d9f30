"""The serving path loads none of the offline code that builds versions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = ("lightning", "pytorch_lightning", "training", "inference.refresh", "inference.export")


def offline_modules_loaded_by(module: str) -> set[str]:
    """The offline modules in ``sys.modules`` of a fresh interpreter after ``import module``."""
    code = (f"import json, sys, {module}\n"
            f"print(json.dumps([m for m in sys.modules"
            f" if any(m == p or m.startswith(p + '.') for p in {OFFLINE!r})]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", ["inference.pipeline.executor", "inference.service"])
def test_serving_modules_load_no_offline_code(module):
    assert offline_modules_loaded_by(module) == set()


def test_the_check_sees_offline_code():
    assert {"lightning", "training", "inference.refresh"} <= offline_modules_loaded_by("inference.refresh.job")
