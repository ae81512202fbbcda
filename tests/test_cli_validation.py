"""scripts/train.py's answer to bad agent, obs_model and env settings: one sentence that names
the full key the user typed, exit code 2, no run directory (exp=smoke, refused in setup)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


def train(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "scripts/train.py", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        # was accepted: the model had 4 latents, run_config.yaml recorded 4.5
        (["obs_model.latent_dim=4.5"], "obs_model.latent_dim must be an integer >= 1, got 4.5"),
        # these named a partial key (lr.model, gamma, render, ...) or none
        (["agent.lr.model=-1"], "agent.lr.model must be > 0, got -1"),
        (["agent.actor_loss.gamma=2"], "agent.actor_loss.gamma must lie in (0, 1], got 2"),
        (["agent.wm_loss.free_nats=-1"], "agent.wm_loss.free_nats must be >= 0, got -1"),
        (["env.render=pretty"], "env.render must be one of faithful, fast, got 'pretty'."),
        (
            ["obs_model.options.sigma_x=foo"],
            "obs_model.options.sigma_x must be one of learned, head, fixed, got 'foo'",
        ),
        (
            ["agent.world_model.conv_style=v2"],
            "agent.world_model.conv_style must be one of v3, v1, got 'v2'",
        ),
        (
            ["agent.world_model=5"],
            "agent.world_model is a group of settings, not a value: set its keys "
            "(agent.world_model.<key>=<value>), got 5",
        ),
        # was a ~930-character list of every task
        (
            ["env.task=walker-fly"],
            "env.task 'walker-fly' is not a DMC task (walker tasks: walker-run, walker-stand, "
            "walker-walk); did you mean walker-walk?",
        ),
    ],
)
def test_bad_settings_are_one_sentence_naming_the_full_key(args, message, tmp_path):
    run_dir = tmp_path / "never-created"
    out = train("exp=smoke", *args, f"run_dir={run_dir}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr == f"error: {message}\n"
    assert not run_dir.exists()
