"""The runnable examples under docs/examples/ run as documented (CPU, tiny models)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


def _reuse_example_episode(*args: str) -> tuple[float, int]:
    """Run docs/examples/torchrl_reuse.py; it must exit 0 and print the episode's return and
    its number of agent steps."""
    out = _run_reuse_example(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    match = re.search(r"^return (-?\d+\.\d+) over (\d+) steps$", out.stdout, re.MULTILINE)
    assert match, out.stdout
    return float(match.group(1)), int(match.group(2))


@pytest.mark.slow
def test_torchrl_reuse_example_plans_an_episode_without_a_checkpoint():
    """No checkpoint: it fits a tiny world model and plans one cartpole episode of 1 simulated
    second with torchrl's CEMPlanner: 100 control steps at action repeat 2, 50 plans."""
    total, steps = _reuse_example_episode()
    assert steps == 50
    assert 0.0 <= total <= 100.0  # cartpole's reward is in [0, 1] per control step


@pytest.mark.slow
def test_torchrl_reuse_example_plans_with_a_checkpoint_in_the_runs_episodes(tmp_path):
    """With a checkpoint it plays the run's task with the run's episode length and rendering
    (it used the task's 1000 control steps whatever the run had trained on)."""
    from tests.tiny_run import write_tiny_dreamer_run

    write_tiny_dreamer_run(tmp_path, time_limit=0.1)  # cartpole: 10 control steps, 5 plans
    total, steps = _reuse_example_episode(str(tmp_path))
    assert steps == 5 and 0.0 <= total <= 10.0


def _run_reuse_example(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "docs/examples/torchrl_reuse.py", *args],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_torchrl_reuse_example_has_a_help():
    """--help used to be taken for a checkpoint path (a CheckpointError traceback)."""
    out = _run_reuse_example("--help")
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
    assert out.stdout.startswith("usage: torchrl_reuse.py [-h] [checkpoint]")
    assert "fit a tiny world model first" in " ".join(out.stdout.split())


def test_torchrl_reuse_example_refuses_a_missing_or_foreign_checkpoint_in_one_sentence(tmp_path):
    """A file without a run's configuration used to end in a KeyError traceback."""
    from aefrl.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "checkpoint.pt", {"format": 1})  # another program's
    for path, message in [
        (tmp_path / "none", f"error: no checkpoint at {tmp_path / 'none'} (expected a run "),
        (tmp_path, "error: not an aefrl training checkpoint (missing 'run_config'); "),
    ]:
        out = _run_reuse_example(str(path))
        assert out.returncode == 2 and out.stdout == "", out.stderr[-2000:]
        assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr


def test_plan_cost_writes_its_tables(tmp_path, monkeypatch):
    """docs/examples/plan_cost.py at toy budgets: the JSON and markdown docs/reuse.md cites."""
    import functools
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("plan_cost", ROOT / "docs/examples/plan_cost.py")
    plan_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_cost)
    monkeypatch.setattr(plan_cost, "SIZES", {"smoke": plan_cost.SIZES["smoke"]})
    tiny = dict(horizon=2, candidates=8, top_k=2, iterations=2)
    monkeypatch.setattr(plan_cost, "PLANS", {"CEM tiny": dict(method="cem", **tiny)})
    monkeypatch.setattr(
        plan_cost,
        "rollout_overhead",
        functools.partial(plan_cost.rollout_overhead, candidates=8, horizon=2, reps=2),
    )
    out = tmp_path / "plan_cost.json"
    plan_cost.main(out)
    result = json.loads(out.read_text())
    (row,) = result["plan_seconds"]
    assert row["world_model"] == "smoke" and len(row["times_s"]) == 5
    assert 0 < row["min_s"] <= row["median_s"]
    assert set(result["rollout_ms_per_step"]) == {
        "networks only",
        "env.rollout",
        "env.rollout, TensorDictModules in the step",
    }
    assert result["machine"]["cores"] >= 1 and result["load_average"]["end"]
    assert "| smoke | CEM tiny |" in out.with_suffix(".md").read_text()


def _latent_sac(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "docs/examples/latent_sac.py", *args],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_latent_sac_example_trains_torchrls_sac_on_the_latents(tmp_path):
    """docs/examples/latent_sac.py: torchrl's Collector, replay and SACLoss on
    LatentObservation's features, without a checkpoint (an untrained tiny model, 50-step
    episodes) and with a run's (its own 5-step episodes); prints the returns it got."""
    from tests.tiny_run import write_tiny_dreamer_run

    # Three collections of 64 steps, the first of uniform random actions; 64 updates after
    # each, once the replay holds those 64 rows.
    out = _latent_sac("--steps", "150")
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^192 steps, 192 SAC updates$", out.stdout, re.MULTILINE), out.stdout
    assert re.search(r"^train return \d+\.\d+ over 3 episodes$", out.stdout, re.MULTILINE)
    assert re.search(r"^eval return \d+\.\d+ over 50 steps$", out.stdout, re.MULTILINE)
    write_tiny_dreamer_run(tmp_path, time_limit=0.1)
    out = _latent_sac(str(tmp_path), "--steps", "64")
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^eval return \d+\.\d+ over 5 steps$", out.stdout, re.MULTILINE)
    out = _latent_sac(str(tmp_path / "none"))
    assert out.returncode == 2 and out.stderr.startswith("error: no checkpoint at "), out.stderr
