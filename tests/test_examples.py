"""The runnable examples under docs/examples/ run as documented (CPU, tiny models)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_torchrl_reuse_example_plans_an_episode_without_a_checkpoint():
    """No checkpoint: it fits a tiny world model, plans one (short) cartpole episode with
    torchrl's CEMPlanner, exits 0 and prints the return."""
    out = subprocess.run(
        [sys.executable, "docs/examples/torchrl_reuse.py"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    match = re.search(r"^return (-?\d+\.\d+)$", out.stdout, re.MULTILINE)
    assert match, out.stdout
    assert 0.0 <= float(match.group(1)) <= 50.0  # at most 1 per physics step: 100 of them
