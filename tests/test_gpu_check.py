"""The GPU check, rehearsed on this CPU: both parts of scripts/gpu-check.sh run their real commands on the
small configuration, so the 15 minutes of a lent GPU are never spent finding a Python error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from golden_data import model_folders

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("folder", model_folders())
@pytest.mark.parametrize("part", ["1", "2"])
def test_gpu_check_rehearsal_runs_clean(folder, part, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "AVATAR_FORCING_GOLDEN": str(folder)}
    run = subprocess.run(["bash", "scripts/gpu-check.sh", part, "--rehearse"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "== summary" in run.stdout
    results = (tmp_path / "RESULTS.md").read_text()
    assert "Largest number of sessions with every block (p99) inside" in results
    assert "| fast (" in results and "| reference way" in results
    if part == "1":
        assert "collected" in (tmp_path / "tests.log").read_text()
    else:
        assert "compiled" in results
