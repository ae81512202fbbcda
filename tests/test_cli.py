"""End-to-end through the real CLI (scripts/train.py) on a real DMC task, exp=smoke."""

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from aefrl.checkpoint import load_checkpoint
from aefrl.provenance import cpu_model, read_run_records
from tests.forked_script import ForkedScript

ROOT = Path(__file__).resolve().parents[1]
# PYTHONPATH: the scripts import this tree's aefrl even where another tree is installed
# editable (a copy of the repository under test).
ENV = {
    **os.environ,
    "OMP_WAIT_POLICY": "PASSIVE",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


def train(*args, timeout=300, env=ENV):
    return subprocess.run(
        [sys.executable, "scripts/train.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def forked_train():
    """``train`` for command lines that stop before training: each runs in a process forked
    from one that imported scripts/train.py once (tests/forked_script.py), ~4 s of imports
    saved per line; ``test_forked_and_fresh_processes_report_bad_input_alike`` checks it."""
    server = ForkedScript("scripts/train.py", env=ENV)
    yield server.run
    server.close()


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
    (record,) = read_run_records(run_dir)  # where and how the run was trained
    assert record["frames"] == 0 and record["cpu"] == cpu_model()
    assert record["command"].endswith(
        f"scripts/train.py exp=smoke obs_model={obs_model} run_dir={run_dir}"
    )
    # Evaluation is separate from training: the checkpoint alone gives returns and a video.
    out = subprocess.run(
        [sys.executable, "scripts/eval.py", str(run_dir), "--episodes", "2"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step=" in out.stderr  # the bar counts the steps of the episode under way
    result = json.loads((run_dir / "eval.json").read_text())
    assert len(result["returns"]) == 2 and result["obs_model"] == obs_model
    assert result["render"] == "fast"  # the run's own (exp=smoke) pixels, not faithful ones
    # The critic's calibration: G_0 is each episode's return discounted by the agent's γ.
    critic, gamma = result["critic"], 0.997
    assert critic["gamma"] == gamma and all(map(math.isfinite, critic["value_first"]))
    for g0, ret, length in zip(critic["return_to_go_first"], result["returns"], result["lengths"]):
        assert gamma ** (length - 1) * ret - 1e-6 <= g0 <= ret + 1e-6  # DMC rewards are >= 0
    assert (run_dir / "eval.gif").stat().st_size > 0


@pytest.mark.slow
def test_a_resume_makes_a_final_evaluation_the_run_did_not_record(tmp_path):
    """Through the CLI: a run whose final evaluation is not recorded (as if killed during it)
    is resumed to make it, not to "nothing to train"; once recorded, nothing is left."""
    run_dir = tmp_path / "run"
    out = train("exp=smoke", "loop.total_frames=430", f"run_dir={run_dir}")  # ends between evals
    assert out.returncode == 0, out.stderr[-2000:]
    record = run_dir / "final_evaluation.json"
    assert json.loads(record.read_text()) == {"frames": 430, "made": ["eval", "report"]}
    record.unlink()
    out = train(f"resume={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stopped during its final evaluation at 430 frames; making it" in out.stdout
    assert json.loads(record.read_text())["made"] == ["eval", "report"]
    assert load_checkpoint(run_dir)["counters"]["frames"] == 430  # nothing trained
    out = train(f"resume={run_dir}")
    assert out.returncode == 0 and "nothing to train" in out.stdout, out.stderr[-2000:]


def _resume_interrupted_in_setup(monkeypatch, run_dir: Path, *overrides: str) -> None:
    """``train.py resume=run_dir *overrides`` in this process, with a Ctrl-C in its setup whose
    exception Python dropped (when it appends its provenance record, which it then skips): the
    setup runs to its end (logger, trainer, checkpoint loaded) and the run stops before its
    loop."""
    import random

    import numpy as np
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    script = _train_script()
    monkeypatch.setitem(script._SETUP_SIGNAL, "signum", None)

    def dropped_ctrl_c(*args):
        script._SETUP_SIGNAL["signum"] = signal.SIGINT

    monkeypatch.setattr(script, "append_run_record", dropped_ctrl_c)
    line = [f"resume={run_dir}", *overrides]
    # the run's own settings and seeds, not this process's
    saved = torch.get_num_threads(), random.getstate(), np.random.get_state(), torch.get_rng_state()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=line, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        try:
            with pytest.raises(KeyboardInterrupt):
                script.train(cfg)
        finally:
            torch.set_num_threads(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])
            torch.set_rng_state(saved[3])
            lock = script._HELD_LOCKS.pop(run_dir, None)
            if lock is not None:
                lock.close()  # as this process's exit would
            HydraConfig.instance().cfg = None  # no Hydra job for the tests after this one


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, monkeypatch, forked_train):
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
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]  # saved, but not finished: the shell's SIGINT code
    assert "saving a checkpoint" in err and "stopped by SIGINT" in out
    frames = load_checkpoint(run_dir)["counters"]["frames"]
    assert 0 < frames < 100000

    # A resume that changes loop.total_frames, interrupted in its setup, leaves the run as its
    # checkpoint has it: run_config.yaml kept the new value, which the next resume did not use,
    # and TensorBoard a config text with it at the resume's start (counted below).
    saved_config = (run_dir / "run_config.yaml").read_text()
    _resume_interrupted_in_setup(monkeypatch, run_dir, f"loop.total_frames={frames + 100}")
    assert (run_dir / "run_config.yaml").read_text() == saved_config

    # As if it had trained on a GPU with CUDA graphs: without one it resumes with device=cpu
    # and graphs off (auto), and says so.
    from aefrl.checkpoint import save_checkpoint

    state = load_checkpoint(run_dir)
    state["run_config"]["device"] = "cuda"
    state["run_config"]["loop"]["cuda_graph"] = True
    save_checkpoint(run_dir / "checkpoint.pt", state)
    no_gpu = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # also where the suite runs on a GPU machine
    out = forked_train(f"resume={run_dir}", env=no_gpu)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "device=cuda was asked for but CUDA is not available; use cpu" in out.stderr
    out = forked_train(f"resume={run_dir}", "device=cpu", env=no_gpu)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "loop.cuda_graph=true needs a CUDA device, but device is cpu" in out.stderr
    assert "(a resume may set loop.cuda_graph on the command line)" in out.stderr
    out = forked_train(f"resume={run_dir}", "device=gpu")
    assert out.returncode == 2 and "device=gpu is not a device" in out.stderr, out.stderr

    out = train(
        f"resume={run_dir / 'checkpoint.pt'}",  # the run's checkpoint stands for its directory
        f"loop.total_frames={frames + 100}",
        "loop.checkpoint_every=7",
        "threads=1",
        "logger.eval_video=false",
        "device=cpu",
        "loop.cuda_graph=auto",
        "logger.video_fps=7",
        # the rest of the run's own command line, repeated: accepted
        *("exp=smoke", f"run_dir={run_dir}", "loop.eval_every=0", "loop.report_every=0"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    state = load_checkpoint(run_dir)
    assert state["counters"]["frames"] >= frames + 100
    assert state["run_config"]["loop"]["total_frames"] == frames + 100
    assert state["run_config"]["loop"]["checkpoint_every"] == 7
    assert state["run_config"]["threads"] == 1
    assert state["run_config"]["logger"]["eval_video"] is False
    assert state["run_config"]["device"] == "cpu"
    assert state["run_config"]["loop"]["cuda_graph"] == "auto"
    assert state["run_config"]["logger"]["video_fps"] == 7
    saved = OmegaConf.load(run_dir / "run_config.yaml")  # rewritten with the changed keys
    assert saved.loop.total_frames == frames + 100 and saved.threads == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("config/text_summary")  # at the start, and with the first
    # checkpoint that holds the changed keys
    assert len(texts) == 2 and texts[0].step == 0
    assert frames < texts[1].step <= state["counters"]["frames"]
    assert f'"total_frames": {frames + 100}' in texts[1].tensor_proto.string_val[0].decode()
    first, resumed = read_run_records(run_dir)  # one record per start, resumes included
    assert first["frames"] == 0 and resumed["frames"] == frames
    assert f"resume={run_dir}" in resumed["command"]

    # A resume with nothing left to train says so and writes nothing: no record, no event
    # file, the checkpoint untouched.
    files = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    out = forked_train(f"resume={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nothing to train" in out.stdout and "nothing was written" in out.stdout
    # The keys a resume may change are checked first: -1 frames was "nothing to train", exit 0.
    for bad in ("loop.total_frames=-1", "loop.checkpoint_every=2.5", "threads=1.5"):
        out = forked_train(f"resume={run_dir}", bad)
        assert out.returncode == 2 and "must be a whole number" in out.stderr, out.stderr[-2000:]
    out = forked_train(f"resume={run_dir}", "logger.eval_video=2")
    assert out.returncode == 2 and "eval_video" in out.stderr, out.stderr[-2000:]
    out = forked_train(f"resume={run_dir}", "logger.video_fps=0.001", "loop.total_frames=100000")
    assert out.returncode == 2 and "video_fps must be >= 0.004" in out.stderr, out.stderr[-2000:]
    # Other settings cannot change: a resume would have dropped them (it used to, with a line).
    out = forked_train(f"resume={run_dir}", "seed=5", "obs_model=vae", "loop.eval_every=0")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "seed=5 (the run's: 0)" in out.stderr and "obs_model=vae (the run's: aef)" in out.stderr
    # loop.eval_every=0 is the run's own value: only the others are named
    assert sorted(re.findall(r"(\S+)=\S+ \(the run's", out.stderr)) == ["obs_model", "seed"]
    # a preset set back to the default is a change too; the run's own preset is not
    out = forked_train(f"resume={run_dir}", "exp=default")
    assert out.returncode == 2 and "exp=default (the run's: smoke)" in out.stderr, out.stderr
    out = forked_train(f"resume={run_dir}", "exp=smoke")
    assert out.returncode == 0 and "nothing to train" in out.stdout, out.stderr[-2000:]
    # a resumable key inside a dict is applied, not dropped ("nothing to train" said 400)
    out = forked_train(f"resume={run_dir}", "loop={total_frames: 1, eval_every: 0}")
    assert out.returncode == 0 and "loop.total_frames=1;" in out.stdout, out.stdout[-2000:]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == files


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "signum"),
    [
        ("train", signal.SIGINT),
        ("eval", signal.SIGINT),
        ("world_model_report", signal.SIGINT),
        ("train", signal.SIGTERM),
    ],
)
def test_a_signal_while_importing_is_one_sentence_and_the_shells_code(tmp_path, script, signum):
    """The imports take seconds (torch, torchrl, mujoco); a Ctrl-C there was an ImportError or
    KeyboardInterrupt traceback of dozens of frames, a SIGTERM a silent death (exit -15)."""
    args = [f"run_dir={tmp_path / 'run'}", "exp=smoke"] if script == "train" else [str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, f"scripts/{script}.py", *args],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.0)  # past the interpreter's start, well inside the imports
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert err.strip() == "interrupted while starting: nothing was written"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["env.task=walker-walk,walker-wlk"], "env.task 'walker-wlk' is not a DMC task"),
        (["agent.actor_loss.gamma=0.9,1.5"], "agent.actor_loss.gamma must lie in (0, 1], got 1.5"),
        (["env.render=fast,pretty"], "env.render must be one of faithful, fast, got 'pretty'"),
        # only the combination of the two sweeps' last values is too short to update (each
        # value with the other sweep's first passes)
        (
            ["loop.train_ratio=64,1", "loop.total_frames=3000,200"],
            "loop.train_ratio=1 makes 0.0156 updates per agent step",
        ),
    ],
)
def test_a_sweep_checks_every_jobs_values_before_the_first_trains(
    args, message, tmp_path, forked_train
):
    """Only unknown keys, kinds and unread settings were checked for every job: job 0 trained
    to the end, then job 1 stopped on its unknown task (README: "before the first one
    trains")."""
    out = forked_train("-m", "exp=smoke", *args, f"run_dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr == f"error: {out.stderr[7:].strip()}\n" and message in out.stderr
    assert list(tmp_path.iterdir()) == []  # no job's run_dir (run-j0, ...)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["env.task=walker-wlak"], "did you mean walker-walk?"),  # the closest tasks
        (["loop.train_ratio=-1"], "train_ratio must be > 0"),
        (["resume=/nonexistent/run"], "cannot resume from /nonexistent/run: it does not exist"),
        (["resume=pyproject.toml"], "resume takes a run directory or the checkpoint.pt in one"),
        (["device=cuda:7"] if not os.path.exists("/dev/nvidia0") else ["device=tpu"], "device"),
        (["device=cpu", "loop.cuda_graph=true"], "loop.cuda_graph=true needs a CUDA device"),
        (["loop.cuda_graph=sometimes"], "loop.cuda_graph must be auto, true or false"),
        # checked before Hydra composes (aefrl/overrides.py); Hydra's own reports are multi-line
        (["obs_model=flow"], "obs_model is one of aef, aef_partition, vae"),
        (["loop.total_frames=abc"], "loop.total_frames takes a number"),
        (["loop.total_frame=100"], "did you mean loop.total_frames?"),
        # checked in setup, before they crashed the first report or silently went wrong
        (["logger.video_fps=0.001"], "logger.video_fps must be >= 0.004 (a GIF frame lasts"),
        (["logger.eval_video=maybe"], "logger.eval_video takes true or false"),
        (["threads=1.5"], "threads must be a whole number >= 0"),
        (["replay.batch_size=2.5"], "replay.batch_size must be a whole number, got 2.5"),
        (["logger.log_every=100.5"], "logger.log_every must be a whole number, got 100.5"),
        (["replay.capacity=inf"], "replay.capacity must be a finite number, got inf"),
        # passed `not value > 0` checks: a crash deep in a sampler, or 0 updates and exit 0
        (["agent.lr.model=inf"], "agent.lr.model must be a finite number, got inf"),
        (["loop.train_ratio=inf"], "loop.train_ratio must be a finite number, got inf"),
        (["agent.wm_loss.loss_scales.reward=nan"], "loss_scales.reward must be a finite number"),
        # an inverse temperature: negative weighted the worst plans most, nan crashed the physics
        (
            ["agent=planner", "agent.planner.method=mppi", "agent.planner.temperature=-1"],
            "agent.planner.temperature must be a finite number > 0 (in float32: 1.18e-38 to "
            "3.4e38), got -1",
        ),
        (["seed=-1"], "seed must be a whole number in [0, 2**32 - 1], got -1"),
        (["replay.storage=ram"], "replay.storage must be one of auto, memory, device, disk"),
        (["replay.seq_len=1"], "replay.seq_len must be >= 2, got 1"),
        (["env.image_size=63"], "env.image_size must be 4 times a power of two"),
        (["agent.value_loss.slow_reg=-1"], "agent.value_loss.slow_reg must be >= 0, got -1"),
        (["replay.capacity=1e9"], "replay.capacity=1000000000 needs 11444 GiB of RAM"),
        (["replay.capacity=10"], "replay.capacity=10 gives each of the 1 env streams 10 rows"),
        # was accepted: the model had 4 latents, run_config.yaml recorded 4.5
        (["obs_model.latent_dim=4.5"], "obs_model.latent_dim must be an integer >= 1, got 4.5"),
        # these named a partial key (lr.model, gamma, render, ...) or none
        (["agent.lr.model=-1"], "agent.lr.model must be > 0, got -1"),
        (["agent.actor_loss.gamma=2"], "agent.actor_loss.gamma must lie in (0, 1], got 2"),
        (["obs_model=vae", "agent.wm_loss.free_nats=-1"], "agent.wm_loss.free_nats must be >= 0"),
        (["env.render=pretty"], "env.render must be one of faithful, fast, got 'pretty'."),
        (["agent.autocast=fp16"], "agent.autocast must be one of none, bf16, got 'fp16'"),
        (
            ["agent.actor_loss.gradient=sgd"],
            "agent.actor_loss.gradient must be one of backprop, reinforce, got 'sgd'",
        ),
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
        # were a TypeError / KeyError traceback with exit code 1
        (["loop=5"], "loop is a group of settings, not a value"),
        (["~seed"], "~seed deletes a setting, which the run needs"),
        # ran to the end with 0 updates and exit code 0
        (["loop.prefill_steps=1000"], "the run would end before its first update"),
        # a 46-line traceback from the allocator (1.3 TB of conv weights)
        (["agent.world_model.depth=100000"], "the agent's networks do not fit in"),
        # the kernel's out-of-memory kill, exit 137, while the weights were initialised
        (["agent.world_model.hidden=10000000"], "do not fit in RAM at these sizes: 10,3"),
        # was a ~930-character list of every task
        (
            ["env.task=walker-fly"],
            "env.task 'walker-fly' is not a DMC task (walker tasks: walker-run, walker-stand, "
            "walker-walk); did you mean walker-walk?",
        ),
    ],
)
def test_bad_input_is_one_sentence_and_exit_code_2(args, message, tmp_path, forked_train):
    run_dir = tmp_path / "never-created"
    out = forked_train("exp=smoke", *args, f"run_dir={run_dir}")
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()  # else the corrected command would find a run's leftovers


@pytest.mark.parametrize(
    "args",
    [
        ["obs_model=flow"],  # refused before Hydra composes; not slow: fast runs check it too
        pytest.param(["replay.batch_size=2.5"], marks=pytest.mark.slow),  # in the run's setup
        pytest.param(  # a sweep's second job
            ["-m", "seed=0,1", "agent.actor_loss.gamma=0.9,1.5"], marks=pytest.mark.slow
        ),
        pytest.param(["--version"], marks=pytest.mark.slow),  # the script's own answer, exit 0
    ],
)
def test_forked_and_fresh_processes_report_bad_input_alike(args, tmp_path, forked_train):
    """The bad-input tests run their command lines in forked processes (tests/forked_script.py);
    a fresh interpreter gives the same exit code, stdout and stderr."""
    line = ["exp=smoke", *args, f"run_dir={tmp_path / 'run'}"]
    fresh, forked = train(*line), forked_train(*line)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode,
        fresh.stdout,
        fresh.stderr,
    )
    assert fresh.returncode == (0 if args == ["--version"] else 2), fresh.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no run_dir, nor a sweep job's run-j<N>


# The script run as __main__ with torch's import refused: what it does before the heavy imports.
_WITHOUT_TORCH = """
import runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported")

sys.meta_path.insert(0, NoTorch())
sys.argv = ["scripts/train.py", *sys.argv[1:]]
runpy.run_path("scripts/train.py", run_name="__main__")
"""


@pytest.mark.parametrize(
    ("args", "code", "stream", "expected"),
    [
        (["sed=1"], 2, "stderr", "error: sed is not a setting: no such key in configs/; did you"),
        (["obs_model=vea"], 2, "stderr", "error: obs_model=vea is not a choice"),
        (["seed=zero"], 2, "stderr", "error: seed takes a number (default 0), got 'zero'"),
        (["--version"], 0, "stdout", "aefrl "),
    ],
)
def test_a_single_runs_mistyped_setting_is_refused_before_torch_is_imported(
    args, code, stream, expected
):
    """A typo waited ~4 s for torch, torchrl and dm-control to import before its one sentence.
    Sweeps (-m) are checked after the imports, with their values."""
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == code, out.stderr[-2000:]
    assert getattr(out, stream).startswith(expected), out.stderr[-2000:]
    # A good command line goes on to the imports, which the blocker refuses here.
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, "seed=1"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "torch imported" in out.stderr


@pytest.mark.slow
def test_corrupt_checkpoint_and_occupied_run_dir_are_refused(tmp_path, forked_train):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    out = forked_train(f"resume={run_dir}")
    assert out.returncode == 2 and "unreadable" in out.stderr and "Traceback" not in out.stderr
    out = forked_train("exp=smoke", f"run_dir={run_dir}")  # a new run there would overwrite it
    assert out.returncode == 2 and f"run_dir {run_dir} already holds a run" in out.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == b"not a checkpoint"
    for bad, message in [
        (run_dir / "checkpoint.pt", "is a file; run_dir takes a directory"),
        (run_dir / "checkpoint.pt" / "sub", "cannot create run_dir"),
    ]:
        out = forked_train("exp=smoke", f"run_dir={bad}")
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


# --- scripts/train.py's setup, without a run --------------------------------------------------
def _train_script():
    from tests.tiny_run import load_script

    return load_script("train")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"run_dir": None, "resume": None}, "run_dir takes a directory path, got null"),
        ({"run_dir": "", "resume": None}, 'run_dir takes a directory path, got ""'),
        ({"run_dir": "x", "resume": True}, "resume takes a directory path, got true"),
        ({"run_dir": "x", "resume": ""}, 'resume takes a directory path, got ""'),
    ],
)
def test_run_paths_of_the_wrong_kind_are_one_sentence(settings, message):
    """run_dir=null and resume=5 were TypeError tracebacks; run_dir='' trained in the working
    directory (the repository, run from its root)."""
    from omegaconf import OmegaConf

    script = _train_script()
    with pytest.raises(script.UserError, match=re.escape(message)):
        script.run_dir_of(OmegaConf.create(settings))
    # A number is a folder's name.
    assert script.run_dir_of(OmegaConf.create({"run_dir": 5, "resume": None})) == Path("5")
    assert script.run_dir_of(OmegaConf.create({"run_dir": "x", "resume": 7})) == Path("7")


def test_a_run_dir_with_an_earlier_runs_logs_but_no_checkpoint_is_refused(tmp_path):
    """A run killed before its first checkpoint leaves run_config.yaml and tb/: a new run there
    would interleave its logs with the old ones."""
    from omegaconf import OmegaConf

    script = _train_script()
    cfg = OmegaConf.create({"resume": None, "run_dir": str(tmp_path)})
    assert script.run_configuration(cfg)[1] == tmp_path  # an empty directory is fine
    (tmp_path / "tb").mkdir()
    with pytest.raises(script.UserError, match="holds an earlier run's tb but no checkpoint"):
        script.run_configuration(cfg)
    # A disk replay's files alone (a run killed before its first checkpoint, its logs deleted
    # as the message said): the new run's replay refused them with a traceback in its loop.
    (tmp_path / "tb").rmdir()
    (tmp_path / "replay").mkdir()
    (tmp_path / ".checkpoint.pt.tmp").write_bytes(b"")  # a first save cut short
    message = "holds an earlier run's replay and .checkpoint.pt.tmp but no checkpoint"
    with pytest.raises(script.UserError, match=re.escape(message)):
        script.run_configuration(cfg)


def test_each_job_of_a_sweep_gets_its_own_run_dir(tmp_path):
    """Hydra resolves ${now:} once per process: the jobs of a -m sweep over a key the default
    path does not name shared one run_dir, and every job after the first was refused (so did
    those of a sweep given one run_dir). Each job now appends its number."""
    script = _train_script()
    default = "runs/walker-walk/dreamer-aef/s0-20261206-054823"
    assert script.sweep_job_run_dir(default, None) == default  # no Hydra (tests, library use)
    assert script.sweep_job_run_dir(default, (False, 0, ["seed=1"])) == default  # a single run
    assert script.sweep_job_run_dir(default, (True, 3, ["loop.train_ratio=64"])) == default + "-j3"
    assert script.sweep_job_run_dir("mine", (True, 3, ["run_dir=mine"])) == "mine-j3"
    # A real sweep, run where its default runs/ folder lands (the working directory); -m
    # after an override (Hydra's parser wants it first: its usage block, exit 2).
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/train.py"), "exp=smoke", "-m",
         "loop.train_ratio=4,8", "loop.eval_every=0", "loop.report_every=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "runs/walker-walk/dreamer-aef").iterdir())
    assert [r[-3:] for r in runs] == ["-j0", "-j1"], runs
    assert all(
        (tmp_path / "runs/walker-walk/dreamer-aef" / r / "checkpoint.pt").exists() for r in runs
    )


def test_a_ctrl_c_in_setup_says_what_was_kept(tmp_path):
    """It promised an intact checkpoint and resume=<run_dir> even where none existed."""
    from omegaconf import OmegaConf

    script = _train_script()
    new = OmegaConf.create({"resume": None, "run_dir": str(tmp_path / "new")})
    assert "nothing was kept" in script.interrupted_message(new)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint.pt").write_bytes(b"")
    for resume in (tmp_path / "old", tmp_path / "old" / "checkpoint.pt"):
        cfg = OmegaConf.create({"resume": str(resume), "run_dir": None})
        assert f"resume={tmp_path / 'old'} continues" in script.interrupted_message(cfg)


def test_resuming_a_checkpoint_of_another_format_or_without_its_parts_is_refused(tmp_path):
    from omegaconf import OmegaConf

    from aefrl.checkpoint import CheckpointError, save_checkpoint

    script = _train_script()
    cfg = OmegaConf.create({"resume": str(tmp_path), "run_dir": None})
    save_checkpoint(tmp_path / "checkpoint.pt", {"format": 1})
    with pytest.raises(CheckpointError, match="lacks run_config"):
        script.run_configuration(cfg)
    save_checkpoint(tmp_path / "checkpoint.pt", {"format": 99, "run_config": {}})
    with pytest.raises(CheckpointError, match="has format 99"):
        script.run_configuration(cfg)


def test_a_resumed_run_keeps_the_actor_gradient_it_started_with():
    """Runs from before agent.actor_loss.actor_input_grad existed trained through the actor's
    input; a resume must not switch them to the new default (sg of the input)."""
    script = _train_script()
    old = {"agent": {"name": "dreamer", "actor_loss": {"horizon": 15}}}
    assert script.fill_legacy_defaults(old)["agent"]["actor_loss"]["actor_input_grad"] is True
    null = {"agent": {"name": "dreamer", "actor_loss": None}}  # null: that time's defaults
    assert script.fill_legacy_defaults(null)["agent"]["actor_loss"] == {"actor_input_grad": True}
    new = {"agent": {"name": "dreamer", "actor_loss": {"actor_input_grad": False}}}
    assert script.fill_legacy_defaults(new)["agent"]["actor_loss"]["actor_input_grad"] is False
    planner = {"agent": {"name": "planner", "planner": {}}}
    assert script.fill_legacy_defaults(planner) == {"agent": {"name": "planner", "planner": {}}}
    # A new run gets the config file's default, which the agent accepts.
    default = OmegaConf.load(ROOT / "configs/agent/dreamer.yaml")
    assert default.actor_loss.actor_input_grad is False


def test_value_errors_are_user_errors_in_setup_only(monkeypatch, tmp_path):
    """A ValueError while building the run is bad configuration (one sentence, exit 2); one
    raised by training itself is a bug and keeps its traceback."""
    from omegaconf import OmegaConf

    script = _train_script()
    cfg = OmegaConf.create({"resume": None, "run_dir": str(tmp_path / "run")})

    def bad_setup(cfg):
        raise ValueError("conv depth must be an integer >= 1, got 0")

    monkeypatch.setattr(script, "build_run", bad_setup)
    with pytest.raises(script.UserError, match="conv depth"):
        script.train(cfg)

    class Failing:
        def __init__(self):
            self.counters = {"frames": 0}
            self.logger = type("L", (), {"close": lambda self: None})()

        def run(self, **kwargs):
            raise ValueError("Expected parameter loc to satisfy the constraint Real()")

    env = type("E", (), {"close": lambda self: None})()
    monkeypatch.setattr(script, "build_run", lambda cfg: (Failing(), env, Path("r"), False))
    with pytest.raises(ValueError, match="constraint Real"):
        script.train(cfg)


def test_a_crash_in_the_loop_keeps_the_logs_that_explain_it(tmp_path, capsys, monkeypatch):
    """A run that crashed after training for a while (a NaN, out of memory) before its first
    checkpoint lost its TensorBoard logs with the rest of its files; only a Ctrl-C or a setup
    failure removes them now."""
    from omegaconf import OmegaConf

    script = _train_script()

    class Crashing:
        def __init__(self, iterations):
            self.counters = {"frames": 0, "iterations": iterations}
            self.logger = type("L", (), {"close": lambda self: None})()

        def run(self, **kwargs):
            raise RuntimeError("loss is nan")

    env = type("E", (), {"close": lambda self: None})()
    for iterations in (0, 40):
        run_dir = tmp_path / str(iterations)
        (run_dir / "tb").mkdir(parents=True)
        (run_dir / "replay").mkdir()  # a disk replay: useless without a checkpoint
        (run_dir / "run_config.yaml").write_text("seed: 0\n")

        def built(cfg, d=run_dir, n=iterations):  # what build_run registers
            script._HELD_LOCKS[d] = script.lock_run_dir(d, new_run=False)
            script._COUNTERS[d] = (trainer := Crashing(n)).counters
            return trainer, env, d, False

        monkeypatch.setattr(script, "build_run", built)
        with pytest.raises(RuntimeError, match="loss is nan"):
            script.train(OmegaConf.create({"resume": None, "run_dir": str(run_dir)}))
        left = sorted(p.name for p in run_dir.iterdir())
        err = capsys.readouterr().err
        if iterations:
            assert left == [".lock", "run_config.yaml", "tb"]
            assert "crashed before its first checkpoint; its logs stay in" in err
        else:  # it crashed before its first iteration: nothing to explain, start again
            assert left == [] and "removed run_config.yaml, tb, replay" in err
        assert run_dir not in script._COUNTERS  # dropped after each run (Hydra sweeps)


def test_a_sweep_job_stopped_in_setup_removes_its_own_numbered_run_dir(tmp_path, monkeypatch):
    """train() looked for the unnumbered run_dir, so a sweep job's leftovers stayed (and its
    message said that nothing was kept)."""
    from omegaconf import OmegaConf

    script = _train_script()
    monkeypatch.setattr(script, "hydra_job", lambda: (True, 1, ["loop.train_ratio=64"]))
    cfg = OmegaConf.create({"resume": None, "run_dir": str(tmp_path / "run")})
    job_dir = tmp_path / "run-j1"

    def stopped(cfg):  # what build_run writes and registers, then a Ctrl-C
        (job_dir / "tb").mkdir(parents=True)
        (job_dir / "run_config.yaml").write_text("seed: 0\n")
        script._HELD_LOCKS[job_dir] = script.lock_run_dir(job_dir, new_run=False)
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "build_run", stopped)
    with pytest.raises(KeyboardInterrupt):
        script.train(cfg)
    assert sorted(p.name for p in job_dir.iterdir()) == []
    assert "nothing was kept" in script.interrupted_message(cfg)


def test_ctrl_c_outside_the_loop_is_one_sentence_and_exit_130(monkeypatch, capsys, tmp_path):
    """During setup (or a second Ctrl-C, which aborts) there is no traceback, only what the
    user can do."""
    from omegaconf import OmegaConf

    script = _train_script()
    cfg = OmegaConf.create({"resume": None, "run_dir": str(tmp_path / "run")})

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "build_run", interrupted)
    assert script.run_cli(cfg) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted before the run's first checkpoint: nothing was kept")
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setattr(script, "build_run", lambda cfg: (_ for _ in ()).throw(ValueError("x")))
    assert script.run_cli(cfg) == 2


@pytest.mark.slow
def test_sigterm_in_setup_removes_what_setup_wrote_and_exits_143(tmp_path):
    """SIGTERM between setup's first file (run_config.yaml) and the loop's own handler killed
    the process with its run_config.yaml, provenance.jsonl and .lock left behind, and the same
    command then refused the run_dir. Sent as soon as the file appears: in setup (everything
    removed) or, if the loop got there first, in the loop (a checkpoint); either way 143."""
    run_dir = tmp_path / "run"
    args = ["exp=smoke", f"run_dir={run_dir}", "loop.total_frames=100000"]
    proc = subprocess.Popen(
        [sys.executable, "scripts/train.py", *args],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (run_dir / "run_config.yaml").exists() and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    if not (run_dir / "checkpoint.pt").exists():
        assert sorted(p.name for p in run_dir.iterdir()) == [], err[-2000:]
        out = train(*args, "loop.total_frames=300")  # the run_dir is not refused
        assert out.returncode == 0, out.stderr[-2000:]


def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing_behind(
    tmp_path, capsys, monkeypatch
):
    """A Ctrl-C that aborts a new run before its first checkpoint (in the loop, or in setup
    after its files were written) removed nothing, so the same command then refused the
    directory for its run_config.yaml; a run with a checkpoint keeps everything."""
    from omegaconf import OmegaConf

    script = _train_script()

    class Interrupted:
        def __init__(self):
            self.counters = {"frames": 0}
            self.logger = type("L", (), {"close": lambda self: None})()

        def run(self, **kwargs):
            raise KeyboardInterrupt

    env = type("E", (), {"close": lambda self: None})()
    for checkpointed in (False, True):
        run_dir = tmp_path / str(checkpointed)
        (run_dir / "tb").mkdir(parents=True)
        (run_dir / "replay").mkdir()
        (run_dir / "run_config.yaml").write_text("seed: 0\n")
        (run_dir / "provenance.jsonl").write_text("{}\n")
        if checkpointed:
            (run_dir / "checkpoint.pt").write_bytes(b"")

        def built(cfg, d=run_dir):  # as build_run does once the files are there: hold the dir
            script._HELD_LOCKS[d] = script.lock_run_dir(d, new_run=False)
            return Interrupted(), env, d, False

        monkeypatch.setattr(script, "build_run", built)
        cfg = OmegaConf.create({"resume": None, "run_dir": str(run_dir)})
        with pytest.raises(KeyboardInterrupt):
            script.train(cfg)
        left = sorted(p.name for p in run_dir.iterdir())
        if checkpointed:
            kept = ["checkpoint.pt", "provenance.jsonl", "replay", "run_config.yaml", "tb"]
            assert left == [".lock", *kept]  # the lock file stays with the run (empty)
        else:
            assert left == []
            assert (
                "removed run_config.yaml, tb, replay, provenance.jsonl" in capsys.readouterr().err
            )

    def interrupted_setup(cfg):  # after the run's files, before the loop
        (Path(cfg.run_dir) / "tb").mkdir(parents=True)
        script._HELD_LOCKS[Path(cfg.run_dir)] = script.lock_run_dir(Path(cfg.run_dir), True)
        (Path(cfg.run_dir) / "run_config.yaml").write_text("seed: 0\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "build_run", interrupted_setup)
    cfg = OmegaConf.create({"resume": None, "run_dir": str(tmp_path / "setup")})
    with pytest.raises(KeyboardInterrupt):
        script.train(cfg)
    assert not list((tmp_path / "setup").iterdir())

    def crashed_setup(cfg):  # a crash, not an interrupt: the corrected command must run too
        (Path(cfg.run_dir) / "tb").mkdir(parents=True)
        script._HELD_LOCKS[Path(cfg.run_dir)] = script.lock_run_dir(Path(cfg.run_dir), True)
        raise RuntimeError("can't allocate memory")

    monkeypatch.setattr(script, "build_run", crashed_setup)
    cfg = OmegaConf.create({"resume": None, "run_dir": str(tmp_path / "crash")})
    with pytest.raises(RuntimeError):
        script.train(cfg)
    assert not list((tmp_path / "crash").iterdir())

    # A run_dir this process does not hold is another run's: an error in this one (here the
    # lock refused) must not remove that run's files.
    other = tmp_path / "other"
    (other / "tb").mkdir(parents=True)
    (other / "run_config.yaml").write_text("seed: 0\n")

    def refused(cfg):
        raise script.UserError("run_dir is in use by another training process")

    monkeypatch.setattr(script, "build_run", refused)
    with pytest.raises(script.UserError):
        script.train(OmegaConf.create({"resume": None, "run_dir": str(other)}))
    assert sorted(p.name for p in other.iterdir()) == ["run_config.yaml", "tb"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_whose_exception_setup_dropped_still_stops_the_run(tmp_path, monkeypatch, signum):
    """Python drops an exception raised inside some callbacks (an import lock's): one Ctrl-C
    in ~55 during setup was lost so, and the run trained on. The handler remembers the signal;
    a setup that finishes after one stops there, as if it had been interrupted."""
    script = _train_script()
    monkeypatch.setitem(script._SETUP_SIGNAL, "signum", None)
    closed, ran = [], []
    env = SimpleNamespace(close=lambda: closed.append("env"))
    trainer = SimpleNamespace(
        logger=SimpleNamespace(close=lambda: closed.append("logger")),
        run=lambda **kwargs: ran.append(True),
        counters={"iterations": 0},
    )

    def setup_with_a_dropped_signal(cfg):
        run_dir = Path(cfg.run_dir)
        (run_dir / "tb").mkdir(parents=True)
        script._HELD_LOCKS[run_dir] = script.lock_run_dir(run_dir, new_run=True)
        (run_dir / "run_config.yaml").write_text("seed: 0\n")
        with contextlib.suppress(KeyboardInterrupt):  # as Python inside an import lock's callback
            script._on_signal(signum, None)
        return trainer, env, run_dir, False

    monkeypatch.setattr(script, "build_run", setup_with_a_dropped_signal)
    cfg = OmegaConf.create({"resume": None, "run_dir": str(tmp_path / "run")})
    assert script.run_cli(cfg) == 128 + signum
    assert not ran and sorted(closed) == ["env", "logger"]
    assert not list((tmp_path / "run").iterdir())  # the unstarted run removed, as on Ctrl-C

    monkeypatch.setitem(script._SETUP_SIGNAL, "signum", None)  # no signal: the run trains
    monkeypatch.setattr(script, "build_run", lambda cfg: (trainer, env, tmp_path, False))
    trainer.run = lambda **kwargs: ran.append(True) or {"frames": 1}
    trainer.stop_signal = None
    assert script.run_cli(cfg) == 0 and ran == [True]

    # One dropped after that check, before the loop's own handler: the loop stops as on Ctrl-C.
    def run(on_iteration):
        script._SETUP_SIGNAL["signum"] = signum
        for _ in range(3):
            on_iteration(trainer)
        return {"frames": 1}

    stops = []
    trainer.run = run
    trainer.request_stop = lambda s: stops.append(s) or setattr(trainer, "stop_signal", s)
    assert script.run_cli(cfg) == 128 + signum and stops == [signum]


def test_setup_handles_both_signals():
    """The handler __main__ installs before Hydra runs: the remembering one, for both."""
    script = _train_script()
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        script.handle_signals_in_setup()
        assert signal.getsignal(signal.SIGINT) is script._on_signal
        assert signal.getsignal(signal.SIGTERM) is script._on_signal
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_run_dir_in_use_is_not_called_an_earlier_runs_leftovers(tmp_path):
    """A second run on a live run's run_dir was told to delete that run's files (its
    run_config.yaml and tb, "but no checkpoint.pt"), which would wipe the live run."""
    from omegaconf import OmegaConf

    from aefrl.run_dir import lock_run_dir, run_dir_in_use

    script = _train_script()
    assert not run_dir_in_use(tmp_path)  # no lock file
    (tmp_path / ".lock").mkdir()  # unreadable as a lock: not taken for "not in use"
    with pytest.raises(script.UserError, match=r"cannot tell whether run_dir .*; choose another"):
        run_dir_in_use(tmp_path)
    (tmp_path / ".lock").rmdir()
    held = lock_run_dir(tmp_path, new_run=True)
    (tmp_path / "run_config.yaml").write_text("seed: 0\n")
    (tmp_path / "tb").mkdir()
    assert run_dir_in_use(tmp_path)
    cfg = OmegaConf.create({"resume": None, "run_dir": str(tmp_path)})
    with pytest.raises(script.UserError, match="is in use by another training process; wait"):
        script.run_configuration(cfg)
    held.close()  # it stopped before its first checkpoint: now they are leftovers
    assert not run_dir_in_use(tmp_path)
    with pytest.raises(script.UserError, match=r"holds an earlier run's run_config\.yaml and tb"):
        script.run_configuration(cfg)


def test_help_says_what_the_script_does_and_lists_the_groups():
    out = train("--help", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("train.py: train a Dreamer-style agent")
    assert "obs_model: aef, aef_partition, vae" in out.stdout
    assert "agent/planner_exp is chosen by exp" in out.stdout


def test_a_resumes_settings_error_says_when_the_resume_may_change_the_key():
    """A saved value that a later check refuses (a run from before logger.video_fps had a
    minimum) read as a run that cannot be resumed; the keys a resume may change say so."""
    script = _train_script()
    fps = "logger.video_fps must be >= 0.004 (a GIF frame lasts at most 327 s), got 0.001"
    assert (
        script.resume_hint(fps) == f"{fps} (a resume may set logger.video_fps on the command line)"
    )
    graphs = "loop.cuda_graph=true needs a CUDA device, but device is cpu"
    assert script.resume_hint(graphs).endswith(
        "(a resume may set loop.cuda_graph on the command line)"
    )
    seed = "seed must be a whole number in [0, 2**32 - 1], got -1"
    assert script.resume_hint(seed) == seed  # not a key a resume may change: no way out offered
