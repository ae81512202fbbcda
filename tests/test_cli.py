"""End-to-end through the real CLI (scripts/train.py) on a real DMC task, exp=smoke."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aefrl.checkpoint import load_checkpoint

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
@pytest.mark.parametrize("obs_model", ["vae", "aef"])
def test_smoke_run_writes_events_and_checkpoint(tmp_path, obs_model):
    run_dir = tmp_path / "run"
    out = train("exp=smoke", f"obs_model={obs_model}", f"run_dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    state = load_checkpoint(run_dir)
    assert state["counters"]["frames"] >= 400 and state["counters"]["updates"] > 0
    assert state["run_config"]["obs_model"]["kind"] == obs_model
    assert (run_dir / "run_config.yaml").exists()
    # Evaluation is separate from training: the checkpoint alone gives returns and a video.
    out = subprocess.run(
        [sys.executable, "scripts/eval.py", str(run_dir), "--episodes", "2", "--render", "fast"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((run_dir / "eval.json").read_text())
    assert len(result["returns"]) == 2 and result["obs_model"] == obs_model
    assert (run_dir / "eval.gif").stat().st_size > 0


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "scripts/train.py",
            "exp=smoke",
            f"run_dir={run_dir}",
            "loop.total_frames=100000",
            "loop.checkpoint_every=0",
            "loop.eval_every=0",
            "loop.report_every=0",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:  # wait until the loop runs
        if line.startswith("run directory"):
            break
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "saving a checkpoint" in err
    frames = load_checkpoint(run_dir)["counters"]["frames"]
    assert 0 < frames < 100000

    out = train(
        f"resume={run_dir}",
        f"loop.total_frames={frames + 100}",
        "loop.checkpoint_every=7",
        "seed=5",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ignoring 'seed=5'" in out.stdout
    state = load_checkpoint(run_dir)
    assert state["counters"]["frames"] >= frames + 100
    assert state["run_config"]["loop"]["total_frames"] == frames + 100
    assert state["run_config"]["loop"]["checkpoint_every"] == 7
    assert state["run_config"]["seed"] != 5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["env.task=walker-wlak"], "walker-walk"),  # the sentence lists the valid tasks
        (["loop.train_ratio=-1"], "train_ratio must be > 0"),
        (["resume=/nonexistent/run"], "cannot resume from /nonexistent/run"),
        (["device=cuda:7"] if not os.path.exists("/dev/nvidia0") else ["device=tpu"], "device"),
        (["device=cpu", "loop.cuda_graph=true"], "loop.cuda_graph=true needs a CUDA device"),
        (["loop.cuda_graph=sometimes"], "loop.cuda_graph must be auto, true or false"),
        # checked before Hydra composes (aefrl/overrides.py); Hydra's own reports are multi-line
        (["obs_model=flow"], "obs_model is one of aef, aef_partition, vae"),
        (["loop.total_frames=abc"], "loop.total_frames takes a number"),
        (["loop.total_frame=100"], "did you mean loop.total_frames?"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_code_2(args, message):
    out = train("exp=smoke", *args, "run_dir=/tmp/aefrl-never-created")
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_corrupt_checkpoint_and_occupied_run_dir_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    out = train(f"resume={run_dir}")
    assert out.returncode == 2 and "unreadable" in out.stderr and "Traceback" not in out.stderr
    out = train("exp=smoke", f"run_dir={run_dir}")  # a new run there would overwrite it
    assert out.returncode == 2 and f"run_dir {run_dir} already holds a run" in out.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == b"not a checkpoint"
