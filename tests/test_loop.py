"""The training loop on a real DMC task: exact resume, evaluation, reports, checkpoints."""

import dataclasses
import functools
import io
import math
import signal
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensordict import TensorDict
from torchrl.envs import ExcludeTransform, SerialEnv, TransformedEnv

from aefrl import keys
from aefrl import loop as loop_module
from aefrl.bench.subjects import Sizes, random_batch
from aefrl.checkpoint import CheckpointError, load_checkpoint
from aefrl.envs import make_dmc_env
from aefrl.logging import RunLogger
from aefrl.loop import (
    FINAL_EVALUATION,
    LoopConfig,
    Trainer,
    final_evaluation_made,
    final_evaluation_pending,
)
from aefrl.replay import SequenceReplay
from tests.agents.test_dreamer import TINY
from tests.test_collect import EchoAgent, EchoEnv

from agents.dreamer import DreamerAgent  # isort: skip

TASK = "cartpole-swingup"
SCHEDULE = dict(
    total_frames=240,
    prefill_steps=30,
    train_ratio=16,
    batch_size=3,
    seq_len=8,
    log_every=40,
    eval_every=100,
    eval_episodes=1,
    report_every=100,
    report_samples=2,
    checkpoint_every=0,
)


def make_env(seed):
    return make_dmc_env(TASK, seed=seed, render="fast", time_limit=0.4)  # 20 agent steps


def build(run_dir, kind="aef", seed=0):
    torch.manual_seed(seed)
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["world_model"]["obs_model"] = kind
    env = make_env(seed)
    agent = DreamerAgent((3, 64, 64), 1, **cfg)
    replay = SequenceReplay(400, 1, 8, 3, seed=seed)
    logger = RunLogger("tb", log_dir=str(run_dir))
    trainer = Trainer(
        agent,
        env,
        replay,
        logger,
        run_dir,
        LoopConfig(**SCHEDULE),
        make_eval_env=lambda i: make_env(1000 + i),
        seed=seed,
        action_dim=1,
    )
    return trainer


def _params(trainer):
    return trainer.agent.state_dict()


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    full = build(tmp_path / "full")
    counters_full = full.run(progress=False)

    part = build(tmp_path / "part")

    def stop_midway(trainer):  # mid-episode, after training has started and before an eval
        if trainer.counters["iterations"] == 83:
            trainer.request_stop()

    part.run(progress=False, on_iteration=stop_midway)
    assert part.counters["frames"] < SCHEDULE["total_frames"]
    shown = part.last_return  # the progress bar's return, kept across the resume (was nan)
    assert math.isfinite(shown)
    assert part._pending  # stopped between two train/* logs: updates wait in the checkpoint
    assert part._update is not None
    part.load()  # a loaded checkpoint drops the update built on the old optimiser state
    assert part._update is None
    assert not part._stop_requested  # and the stop request: its run() would end at once
    part.env.close()
    resumed = build(tmp_path / "part", seed=123)  # different init and RNG: all must be restored
    resumed.load()
    assert resumed.last_return == shown
    counters = resumed.run(progress=False)

    assert counters == counters_full
    a, b = _params(full), _params(resumed)
    for key, value in a["modules"].items():
        assert torch.equal(value, b["modules"][key]), key
    for name in a["optimizers"]:
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert torch.equal(full.replay.sample()["pixels"], resumed.replay.sample()["pixels"])
    # The logs continue exactly too (all but the wall-clock fps): both halves of the resumed
    # run's event files against the uninterrupted run's.
    for trainer in (full, part, resumed):
        trainer.logger.close()
    logged_full, logged_resumed = _scalars(tmp_path / "full"), _scalars(tmp_path / "part")
    assert any(tag.startswith("train/") for tag in logged_full)
    assert logged_resumed == logged_full


def _scalars(run_dir) -> dict:
    """``{tag: [(step, value), ...]}`` of every scalar in a run's event files; the wall-clock
    measurements (perf/fps, perf/fps_interval, perf/time_*) by their steps only."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()

    def wall_clock(tag: str) -> bool:
        return tag in ("perf/fps", "perf/fps_interval") or tag.startswith("perf/time_")

    return {
        tag: [(e.step, None if wall_clock(tag) else e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


@pytest.mark.slow
def test_loop_writes_evaluations_reports_and_a_final_checkpoint(tmp_path):
    trainer = build(tmp_path, kind="vae")
    counters = trainer.run(progress=False)
    trainer.logger.close()
    end = counters["frames"]
    assert end >= SCHEDULE["total_frames"] and counters["evals"] == 3  # 100, 200 and the end
    assert counters["updates"] > 0 and counters["episodes"] >= 5
    state = load_checkpoint(tmp_path)  # written before the final evaluation, which it lacks
    assert state["counters"] == {**counters, "evals": 2}
    # ... and says it was due; the run directory says it was made
    assert state["final_evaluation_due"] == ["eval", "report"]
    assert not final_evaluation_pending(state, tmp_path)
    made = f'{{"frames": {end}, "made": ["eval", "report"]}}\n'
    assert (tmp_path / FINAL_EVALUATION).read_text() == made
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    expected = {
        "eval/episode_return",
        "eval/critic_value",
        "eval/critic_return_to_go",
        "env/episode_return",
        "train/loss_obs",
        "train/kl",
        "train/action_saturation",
        "heldout/bits_per_dim",
        "heldout/open_loop_mse_h1",
        "heldout/open_loop_ssim_h1",
        "heldout/open_loop_sharpness",
        "perf/fps",
        "perf/fps_interval",
        "train/grad_clipped_model",
    }
    assert expected <= set(tags["scalars"])
    assert "eval/episode_return_std" not in tags["scalars"]  # one episode: no spread (was 0)
    # Where the wall time went between two logs: shares of it, per phase, never above the whole,
    # every phase at every log (0 where it did not run).
    phases = ("collect", "update", "eval", "report", "checkpoint")
    shares = {p: dict((e.step, e.value) for e in acc.Scalars(f"perf/time_{p}")) for p in phases}
    logs = sorted(e.step for e in acc.Scalars("perf/fps"))
    for step in logs:
        parts = [shares[p][step] for p in phases]
        assert all(0 <= x <= 1 for x in parts) and sum(parts) <= 1 + 1e-6, (step, parts)
    # The evaluation at frame 100 falls in the interval logged at 120 (logs every 40 frames).
    assert shares["eval"][120] > 0 and shares["eval"][80] == 0 and shares["eval"][160] == 0
    assert max(shares["update"].values()) > 0.1
    assert "heldout/open_loop_real_imagined_error" in tags["images"]
    # The policy's first evaluation episode as the agent saw it, frame for frame.
    video = acc.Images("eval/first_episode")
    assert [v.step for v in video] == [100, 200, end]
    assert (video[0].width, video[0].height) == (64, 64)
    gif = Image.open(io.BytesIO(video[-1].encoded_image_string))
    assert gif.n_frames == trainer.heldout.shape[1]
    gif.seek(gif.n_frames - 1)
    last = trainer.heldout["pixels"][0, -1].permute(1, 2, 0).numpy()
    shown = np.asarray(gif.convert("RGB")).astype(np.float64)
    assert np.abs(shown - last).mean() < 3  # up to the GIF's 256-colour palette
    # Frames are the x-axis: evaluations and reports land at multiples of their period, and
    # once more where training ended (240 is not a multiple of 100)
    assert [e.step for e in acc.Scalars("eval/episode_return")] == [100, 200, end]
    assert [e.step for e in acc.Scalars("heldout/bits_per_dim")] == [100, 200, end]


def test_cuda_graph_updates_fall_back_to_eager_only_when_allowed(tmp_path, capsys):
    """``loop.cuda_graph=auto`` falls back (one line on stderr) when the capture fails, here
    because the batch is on the CPU; ``true`` (no fallback) raises instead."""
    trainer = build(tmp_path)
    example = random_batch(Sizes(batch=3, seq=8, action_dim=1))
    trainer.config.cuda_graph = True
    assert trainer._make_update(example) == trainer.agent.train_step
    assert "cuda_graph: capturing the update failed" in capsys.readouterr().err
    trainer.config.cuda_graph_fallback = False
    with pytest.raises(ValueError, match="CUDA device"):
        trainer._make_update(example)
    trainer.env.close()


def test_held_out_episode_runs_from_its_first_row_to_its_terminal_row(tmp_path):
    """The held-out data of reports is the first evaluation episode, whole: its reset row and
    every stepped row through the terminal one (the loop stops collecting at that row, so
    there is no next episode's start to drop)."""
    trainer = build(tmp_path)
    trainer.evaluate()
    trainer.env.close()
    trainer.logger.close()
    held = trainer.heldout
    assert held.shape == (1, 21)  # make_env: 20 agent steps per episode, plus the reset row
    assert held["is_first"][0, :, 0].nonzero().flatten().tolist() == [0]
    assert held["reward"][0, -1].abs().sum() > 0  # the terminal row keeps its reward


def test_loop_config_takes_whole_floats_as_counts_and_refuses_fractions():
    """``loop.total_frames=1e6`` on the command line arrives as a float."""
    config = LoopConfig(total_frames=1e6, checkpoint_every=5e3, train_ratio=64)
    assert config.total_frames == 1_000_000 and isinstance(config.total_frames, int)
    assert config.checkpoint_every == 5000 and isinstance(config.checkpoint_every, int)
    assert LoopConfig(train_ratio=0.5).train_ratio == 0.5  # a float field keeps its fraction
    with pytest.raises(ValueError, match=r"total_frames must be a whole number, got 1000\.5"):
        LoopConfig(total_frames=1000.5)
    with pytest.raises(ValueError, match="total_frames must be >= 1, got 0"):
        LoopConfig(total_frames=0.0)


def _prefill_only_trainer(env, tmp_path, total_frames: int, **config) -> Trainer:
    """A run that only collects (random prefill) until ``total_frames``."""
    agent = DreamerAgent((3, 64, 64), 1, **{k: dict(v) for k, v in TINY.items()})
    schedule = dict(SCHEDULE, total_frames=total_frames, prefill_steps=1000, **config)
    return Trainer(
        agent,
        env,
        SequenceReplay(400, 1, 8, 3, seed=0),
        RunLogger("tb", log_dir=str(tmp_path)),
        tmp_path,
        LoopConfig(**{**schedule, "eval_every": 0, "report_every": 0}),
        action_dim=1,
    )


def _prefill_only_counters(env, tmp_path, total_frames: int, **config) -> dict:
    counters = _prefill_only_trainer(env, tmp_path, total_frames, **config).run(progress=False)
    env.close()
    return counters


def test_perf_logs_the_speed_since_the_start_and_since_the_last_log(tmp_path, monkeypatch):
    """``perf/fps`` averages from the start, ``perf/fps_interval`` over the last log period:
    on a clock that slows from 2 to 0.4 frames/s at frame 120 they part there."""
    trainer = _prefill_only_trainer(make_env(0), tmp_path, 240)  # a log every 40 frames

    def clock(frames: int) -> float:
        return frames / 2 if frames <= 120 else 60 + (frames - 120) * 2.5

    fake_time = SimpleNamespace(time=lambda: clock(trainer.counters["frames"]))
    monkeypatch.setattr("aefrl.loop.time", fake_time)
    trainer.run(progress=False)
    trainer.env.close()
    trainer.logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("perf/fps")]
    assert steps[:6] == [40, 80, 120, 160, 200, 240]
    cumulative = [f / clock(f) for f in steps[:6]]
    interval = [2.0, 2.0, 2.0, 0.4, 0.4, 0.4]
    logged = {tag: [e.value for e in acc.Scalars(tag)][:6] for tag in acc.Tags()["scalars"]}
    torch.testing.assert_close(logged["perf/fps"], cumulative, rtol=1e-6, atol=0)  # float32
    torch.testing.assert_close(logged["perf/fps_interval"], interval, rtol=1e-6, atol=0)


def test_frames_count_what_the_env_simulated(tmp_path):
    """0.25 s of cartpole is 25 control steps: at action repeat 2 an episode is 12 full agent
    steps and one cut short, 25 frames, not 13 x 2 = 26."""
    env = make_dmc_env(TASK, render="fast", time_limit=0.25)
    counters = _prefill_only_counters(env, tmp_path, 50)
    assert counters["frames"] == 50 and counters["episodes"] == 2
    assert counters["agent_steps"] == 26


def test_frames_of_an_env_without_a_frame_count_are_steps_times_the_repeat(tmp_path):
    """An env that does not report ``frames`` (any torchrl env but ours) is counted at
    loop.action_repeat frames per agent step."""
    base = make_dmc_env(TASK, render="fast")
    assert keys.FRAMES in base.rand_step(base.reset())["next"].keys(True)
    env = TransformedEnv(base, ExcludeTransform(keys.FRAMES))
    assert keys.FRAMES not in env.rand_step(env.reset())["next"].keys(True)
    counters = _prefill_only_counters(env, tmp_path, 30, action_repeat=3)
    assert counters["agent_steps"] == 10 and counters["frames"] == 30


def test_evaluation_video_can_be_turned_off(tmp_path):
    trainer = build(tmp_path)
    trainer.config.eval_video = False
    assert trainer.evaluate() is not None
    trainer.logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "eval/episode_return" in acc.Tags()["scalars"]  # the evaluation was logged
    assert "eval/first_episode" not in acc.Tags()["images"]  # but not its video


def test_loop_config_refuses_what_would_crash_at_the_first_report():
    with pytest.raises(ValueError, match="eval_video must be true or false, got 'no'"):
        LoopConfig(eval_video="no")
    with pytest.raises(ValueError, match="report_samples must be >= 1, got 0"):
        LoopConfig(report_samples=0)
    for fps in (0, 0.001):  # GIF frames last at most 327 s: 0.001 crashed the first eval
        with pytest.raises(ValueError, match=rf"video_fps must be >= 0.004 .*got {fps}"):
            LoopConfig(video_fps=fps)
    LoopConfig(video_fps=0.004)


def test_with_logging_off_update_metrics_are_not_kept(tmp_path):
    """logger.log_every=0: nothing writes the per-update metrics, so none may pile up (in
    memory, and in every checkpoint)."""
    trainer = build(tmp_path)
    trainer.config.log_every = 0

    def stop_after_updates(t):
        if t.counters["updates"] >= 3:
            t.request_stop()

    trainer.run(progress=False, on_iteration=stop_after_updates)
    trainer.env.close()
    assert trainer.counters["updates"] >= 3 and not trainer._pending


def test_a_second_ctrl_c_during_the_checkpoint_write_aborts_after_it(tmp_path):
    """An exception inside torch.save leaves a half-written temp file (and arrives as a
    RuntimeError): the second Ctrl-C of a stop waits for the write, then aborts."""
    trainer = build(tmp_path)
    write = trainer._write_checkpoint

    def first_ctrl_c(t):
        if t.counters["iterations"] == 40:
            t._on_signal(signal.SIGINT, None)

    def write_with_second_ctrl_c():
        trainer._on_signal(signal.SIGINT, None)  # arrives while the checkpoint is written
        write()

    trainer._write_checkpoint = write_with_second_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        trainer.run(progress=False, on_iteration=first_ctrl_c)
    assert trainer.stop_signal == signal.SIGINT
    assert load_checkpoint(tmp_path)["counters"]["iterations"] == 40  # written in full
    assert not list(tmp_path.glob(".checkpoint.pt.tmp"))
    trainer._stop_requested = True  # outside a write, a second Ctrl-C aborts at once
    with pytest.raises(KeyboardInterrupt):
        trainer._on_signal(signal.SIGINT, None)


def test_the_run_config_file_is_rewritten_with_every_checkpoint(tmp_path):
    """run_config.yaml shows what the checkpoint resumes with: it is written with the
    checkpoint, never before it (a resume interrupted in its setup left the file with its new
    settings next to a checkpoint holding the old), and a failed write is one sentence."""
    from omegaconf import OmegaConf

    trainer = build(tmp_path)
    trainer.run_config = {"loop": {"total_frames": 123}, "seed": 4}
    trainer.run_config_file = tmp_path / "run_config.yaml"
    trainer.run_config_file.write_text("loop:\n  total_frames: 100\n")  # the previous start's
    trainer.config.total_frames = 60

    def before_the_first_checkpoint(t):
        if t._saved_at is None:
            assert OmegaConf.load(t.run_config_file).loop.total_frames == 100

    # TensorBoard's config text: at the start, then at the checkpoint that first holds a change
    # (a resume logged it at its start, where an interrupted setup left it ahead of the run).
    logged = []
    trainer.logger.log_config = lambda conf, step=0: logged.append((step, dict(conf)))
    trainer.run(progress=False, on_iteration=before_the_first_checkpoint)
    assert logged == [(0, trainer.run_config)]  # a new run: once, at its start
    assert load_checkpoint(tmp_path)["run_config"] == trainer.run_config
    assert OmegaConf.to_container(OmegaConf.load(trainer.run_config_file)) == trainer.run_config
    assert not list(tmp_path.glob(".*.tmp"))

    # Only after the checkpoint: a checkpoint that could not be written leaves the file as is.
    write = trainer._write_checkpoint
    trainer._write_checkpoint = lambda: (_ for _ in ()).throw(CheckpointError("disk full"))
    trainer.run_config["seed"] = 6
    with pytest.raises(CheckpointError, match="disk full"):
        trainer.save()
    assert OmegaConf.load(trainer.run_config_file).seed == 4
    trainer._write_checkpoint = write

    trainer.save()  # changed since the last checkpoint (seed 6)
    trainer.save()  # unchanged
    assert logged[1:] == [(trainer.counters["frames"], trainer.run_config)]
    for change in ({}, {"seed": 7}):  # a resume given the run's settings, or a changed one
        logged.clear()
        resumed = build(tmp_path / "resumed")
        resumed.logger.log_config = lambda conf, step=0: logged.append((step, dict(conf)))
        resumed.load(tmp_path / "checkpoint.pt")
        resumed.run_config = {**trainer.run_config, **change}  # what train.py gives a resume
        resumed.save()
        expected = [(resumed.counters["frames"], resumed.run_config)] if change else []
        assert logged == expected

    trainer.run_config_file.unlink()
    trainer.run_config_file.mkdir()  # a directory in the way: the write fails
    trainer.run_config["seed"] = 5
    stopped = r"could not write .*run_config\.yaml: Is a directory; the run stopped after writing"
    with pytest.raises(CheckpointError, match=stopped + r" its checkpoint, and its final eval"):
        trainer.save()  # the run's last (frames = total_frames): no resume continues it
    trainer.config.total_frames = 1000
    with pytest.raises(CheckpointError, match=stopped + r" its checkpoint, and resume=\S+ cont"):
        trainer.save()
    assert load_checkpoint(tmp_path)["run_config"]["seed"] == 5


def _quiet_config(**schedule) -> LoopConfig:
    """A schedule that only collects and trains: no logs, evaluations, reports or periodic
    checkpoints (run() still writes its final one)."""
    off = dict(log_every=0, eval_every=0, report_every=0, checkpoint_every=0)
    return LoopConfig(**{**off, **schedule})


def _replayed_stream(env, tmp_path, iterations: int) -> TensorDict:
    """Runs a random-prefill Trainer on a single ``env`` for ``iterations`` iterations and
    returns what reached its replay: one window spanning the whole stream, ``[iterations]``."""
    replay = SequenceReplay(iterations, 1, iterations, 1, seed=0)
    trainer = Trainer(
        EchoAgent(),
        env,
        replay,
        RunLogger("tb", log_dir=str(tmp_path)),
        tmp_path,
        _quiet_config(total_frames=10_000, prefill_steps=10_000),
        action_dim=1,
    )

    def stop(t):
        if t.counters["iterations"] == iterations:
            t.request_stop()

    trainer.run(progress=False, on_iteration=stop)
    env.close()
    trainer.logger.close()
    assert replay.steps == iterations
    return replay.sample()[0]


def test_time_limits_reach_the_replay_as_truncations_and_terminations_as_terminal(tmp_path):
    """The continue head learns from ``terminated``: a DMC time limit (discount 1) must reach
    the replay as not terminated (the value bootstraps through it), a real termination as
    terminated; either way the next row starts an episode."""
    env = make_dmc_env(TASK, render="fast", image_size=16, time_limit=0.1)  # 5 agent steps
    stream = _replayed_stream(env, tmp_path / "dmc", 13)
    assert stream["is_first"][:, 0].nonzero().flatten().tolist() == [0, 6, 12]
    assert stream["reward"][5].abs().sum() > 0  # the time-limit row itself was stored
    assert not stream["terminated"].any()

    stream = _replayed_stream(EchoEnv(5, terminate=True), tmp_path / "fake", 13)
    assert stream["is_first"][:, 0].nonzero().flatten().tolist() == [0, 6, 12]
    assert stream["terminated"][:, 0].nonzero().flatten().tolist() == [5, 11]


@pytest.mark.parametrize(
    "lengths, prefill_steps, seq_len",
    [
        ((4,), 10, 3),  # training starts at the end of the prefill
        ((4,), 1, 5),  # ... or once the replay holds a window
        ((2, 3, 5), 10, 3),  # three envs resetting at different times
        ((2, 3, 5), 2, 6),
    ],
)
def test_updates_follow_the_train_ratio(tmp_path, lengths, prefill_steps, seq_len):
    """After every iteration the updates so far are the credit of the train ratio,
    floor(steps x train_ratio / (batch_size x seq_len)), where steps counts every env's agent
    step taken in an iteration past the prefill with the replay ready; at most one short, from
    the floating-point carry. 17/6 updates per step is no binary fraction (the carry rounds),
    and over 2 so that a single step miscounted is more than that slack."""
    batch_size, train_ratio = 2, 17.0 * seq_len / 3  # 17/6 updates per agent step
    num_envs = len(lengths)
    if num_envs == 1:
        env = EchoEnv(lengths[0])
    else:
        env = SerialEnv(num_envs, [functools.partial(EchoEnv, n) for n in lengths])
    agent = EchoAgent()
    trainer = Trainer(
        agent,
        env,
        SequenceReplay(10_000, num_envs, seq_len, batch_size, seed=0),
        RunLogger("tb", log_dir=str(tmp_path)),
        tmp_path,
        _quiet_config(
            total_frames=80 * num_envs,  # EchoEnv: 2 frames per step
            prefill_steps=prefill_steps,
            train_ratio=train_ratio,
            batch_size=batch_size,
            seq_len=seq_len,
        ),
        action_dim=1,
    )
    per_step = Fraction(train_ratio) / (batch_size * seq_len)
    taken = []  # env steps of each iteration, read off its rows (reset rows took none)
    credited = []  # ... those the ratio credits

    def check(t):
        stepped = int((~t.collector.obs["is_first"]).sum())
        training = sum(taken) >= prefill_steps and len(taken) + 1 >= seq_len  # rows per env
        taken.append(stepped)
        credited.append(stepped if training else 0)
        expected = math.floor(sum(credited) * per_step)
        assert expected - 1 <= t.counters["updates"] <= expected, (len(taken), expected)
        assert agent.updates == t.counters["updates"]

    counters = trainer.run(progress=False, on_iteration=check)
    env.close()
    trainer.logger.close()
    assert counters["agent_steps"] == sum(taken)
    assert 0 in taken[1:] and (num_envs == 1 or len(set(taken[1:])) > 2)  # resets in between
    assert counters["updates"] >= math.floor(sum(credited) * per_step) - 1 > 0


def test_the_prefill_and_training_have_a_progress_bar_each(tmp_path, monkeypatch):
    """One bar for the whole run took its rate from the prefill's random steps, ~10x faster
    than training, so its ETA was that much too short when training began. The training bar
    starts at the first update's frame, and a resumed run that has trained has that bar only."""
    bars = []

    class Bar:
        def __init__(self, desc, initial, total, **kwargs):
            self.desc, self.initial, self.n, self.closed = desc, initial, initial, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr("aefrl.loop.tqdm", Bar)
    agent, seq_len, prefill = EchoAgent(), 3, 10

    def make(run_dir, total_frames):
        return Trainer(
            agent,
            EchoEnv(4),
            SequenceReplay(10_000, 1, seq_len, 2, seed=0),
            RunLogger("tb", log_dir=str(run_dir)),
            run_dir,
            _quiet_config(
                total_frames=total_frames, prefill_steps=prefill, train_ratio=6.0,
                batch_size=2, seq_len=seq_len,
            ),
            action_dim=1,
        )  # fmt: skip

    first_update = []  # the frame count after the iteration of the first update

    def note_first_update(t):
        if t.counters["updates"] and not first_update:
            first_update.append(t.counters["frames"])

    trainer = make(tmp_path, 40)
    trainer.run(on_iteration=note_first_update)
    assert [b.desc for b in bars] == ["prefill", "train"] and all(b.closed for b in bars)
    assert bars[0].initial == 0 and bars[1].initial == first_update[0] > 2 * prefill
    assert bars[1].n == trainer.counters["frames"] == 40
    bars.clear()  # run on, as a resume with a larger total_frames does (counters restored)
    trainer.config = dataclasses.replace(trainer.config, total_frames=60)
    trainer.run()
    trainer.logger.close()
    assert [(b.desc, b.initial, b.n) for b in bars] == [("train", 40, 60)]


def test_episodes_ending_together_in_parallel_envs_are_logged_as_their_mean(tmp_path):
    """Two envs finishing episodes in one iteration logged two points at one frame count, of
    which TensorBoard shows one (its reservoir keeps the last per step): their mean now, one
    point per step, and the episode count still counts both."""
    env = SerialEnv(2, [functools.partial(EchoEnv, 3), functools.partial(EchoEnv, 3)])
    returns = []  # per iteration: the returns the collector reported

    trainer = Trainer(
        EchoAgent(),
        env,
        SequenceReplay(1000, 2, 2, 1, seed=0),
        RunLogger("tb", log_dir=str(tmp_path)),
        tmp_path,
        _quiet_config(total_frames=48, prefill_steps=100, train_ratio=1.0, batch_size=1,
                      seq_len=2),
        action_dim=1,
    )  # fmt: skip
    step = trainer.collector.step

    def recording(mode):
        rows, stats, stepped = step(mode)
        if stats.returns:
            returns.append((trainer.counters["frames"] + stats.frames, list(stats.returns)))
        return rows, stats, stepped

    trainer.collector.step = recording
    counters = trainer.run(progress=False)
    env.close()
    trainer.logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("env/episode_return")]
    assert all(len(r) == 2 for _, r in returns) and len(returns) >= 3  # both envs, together
    assert logged == [(f, pytest.approx(sum(r) / 2)) for f, r in returns]
    assert counters["episodes"] == 2 * len(returns)
    assert {e.value for e in acc.Scalars("env/episode_length")} == {3.0}


def _trained_weights(run_dir, **schedule) -> dict:
    trainer = build(run_dir, kind="vae")  # the VAE samples even when it evaluates and reports
    trainer.config = LoopConfig(**{**SCHEDULE, **schedule})
    trainer._schedules()
    trainer.run(progress=False)
    trainer.env.close()
    trainer.logger.close()
    return trainer.agent.state_dict()["modules"]


@pytest.mark.slow
def test_evaluations_and_reports_leave_the_training_run_as_it_was(tmp_path):
    """Same seed, with evaluations and reports (held-out and replay-sampled) on and off: the
    same weights. Before they drew from the global generators and the replay's sampler, and
    eval_every changed the trained agent."""
    off = _trained_weights(tmp_path / "off", eval_every=0, report_every=0)
    on = _trained_weights(tmp_path / "on")  # reports on the held-out episode
    replay_reports = _trained_weights(tmp_path / "replay", eval_every=0)  # on replay batches
    for key, value in off.items():
        assert torch.equal(value, on[key]), key
        assert torch.equal(value, replay_reports[key]), key


@pytest.mark.slow
def test_a_stop_in_the_iteration_an_evaluation_falls_due_leaves_it_to_the_resumed_run(tmp_path):
    """The checkpoint comes first (a scheduler's grace period is short), and the evaluation and
    report that fell due are not lost: the resumed run makes them after its first iteration."""
    part = build(tmp_path)
    iterate = part._iteration

    def iteration_with_a_signal(updates_per_step):  # the signal arrives inside the iteration
        iterate(updates_per_step)
        if part.counters["frames"] >= 100 and not part._stop_requested:
            part._on_signal(signal.SIGTERM, None)

    part._iteration = iteration_with_a_signal
    part.run(progress=False)
    part.env.close()
    part.logger.close()
    stopped_at = part.counters["frames"]
    assert 100 <= stopped_at < 200 and part.counters["evals"] == 0
    assert load_checkpoint(tmp_path)["counters"]["frames"] == stopped_at

    resumed = build(tmp_path, seed=5)
    resumed.load()
    steps = {"evaluate": [], "report": []}

    def recorded(method, made):
        def call(**kwargs):
            made.append(resumed.counters["frames"])
            return method(**kwargs)

        return call

    for name, made in steps.items():
        setattr(resumed, name, recorded(getattr(resumed, name), made))
    resumed.run(progress=False)
    resumed.env.close()
    resumed.logger.close()
    end = resumed.counters["frames"]
    for made in steps.values():  # the evaluation and the report that fell due, then the rest
        assert stopped_at <= made[0] <= stopped_at + 2  # one agent step (or a reset) later
        assert made[1:] == [200, end]
    assert resumed.counters["evals"] == 3


def _record_returns(trainer) -> list[float]:
    """The eval returns ``trainer`` logs, in order (a list it appends to)."""
    returns, evaluate = [], trainer.evaluate

    def recorded(**kwargs):
        result = evaluate(**kwargs)
        if result is not None:
            returns.append(result["episode_return"])
        return result

    trainer.evaluate = recorded
    return returns


def test_a_signal_during_an_evaluation_stops_it_and_leaves_it_and_the_report_to_the_resume(
    tmp_path,
):
    """A signal used to wait for the whole evaluation and then the report (a 5-episode one
    takes ~36 s at exp=cpu on the CPU, past a scheduler's grace period): the evaluation now
    stops after its current step, nothing of it is logged, both are due after the resume, and
    the agent trains exactly as without the stop (the later evaluations are the same)."""
    full = build(tmp_path / "full")
    full_returns = _record_returns(full)
    full.run(progress=False)
    full.env.close()
    full.logger.close()

    part = build(tmp_path / "part")
    made = part.make_eval_env
    steps = []

    def eval_env_that_signals(index):  # the signal arrives during the first evaluation
        env = made(index)
        step = env.step

        def stepping(td):
            steps.append(index)
            if len(steps) == 5:
                part._on_signal(signal.SIGINT, None)
            return step(td)

        env.step = stepping
        return env

    part.make_eval_env = eval_env_that_signals
    reported = []
    report = part.report
    part.report = lambda: reported.append(part.counters["frames"]) or report()
    part.run(progress=False)
    part.env.close()
    part.logger.close()
    stopped_at = part.counters["frames"]
    assert 100 <= stopped_at < 102 and part.stop_signal == signal.SIGINT
    assert len(steps) == 5 and reported == [] and part.counters["evals"] == 0
    saved = load_checkpoint(tmp_path / "part")
    assert saved["counters"]["frames"] == stopped_at and saved["heldout"] is None
    assert saved["schedules"] == {"eval": 0, "report": 0}  # both still due
    # (the event files are under tb/: read at the run directory, the tags were always empty)
    tags = EventAccumulator(str(tmp_path / "part" / "tb")).Reload().Tags()["scalars"]
    assert tags and not [t for t in tags if t.startswith(("eval/", "heldout/"))]

    resumed = build(tmp_path / "part", seed=5)
    resumed.load()
    returns = _record_returns(resumed)
    resumed.run(progress=False)
    resumed.env.close()
    resumed.logger.close()
    assert resumed.counters["evals"] == 3 and len(returns) == 3
    assert returns[1:] == full_returns[1:]  # the agent trained exactly as without the stop


def test_a_run_ending_on_a_checkpoint_frame_writes_it_once(tmp_path):
    trainer = _prefill_only_trainer(make_env(0), tmp_path, 80, checkpoint_every=40)
    written = []
    write = trainer._write_checkpoint
    trainer._write_checkpoint = lambda: written.append(trainer.counters["frames"]) or write()
    trainer.run(progress=False)
    trainer.env.close()
    assert written == [40, 80]


@pytest.mark.slow
def test_a_signal_in_the_last_iteration_finishes_the_run(tmp_path):
    """There is no resume after the last frame (it finds nothing to train), so the stop is not
    deferred there: the due evaluation and the final one run, and the run counts as finished
    (it said "stopped before loop.total_frames; resume continues", and lost its last points)."""
    trainer = build(tmp_path)
    iterate = trainer._iteration

    def iteration(updates_per_step):
        iterate(updates_per_step)
        if trainer.counters["frames"] >= SCHEDULE["total_frames"]:
            trainer._on_signal(signal.SIGTERM, None)

    trainer._iteration = iteration
    counters = trainer.run(progress=False)
    trainer.env.close()
    trainer.logger.close()
    assert counters["evals"] == 3 and trainer.stop_signal is None  # 100, 200 and the end
    assert load_checkpoint(tmp_path)["counters"]["frames"] == counters["frames"]


@pytest.mark.slow
def test_a_finished_run_logs_the_updates_since_its_last_log(tmp_path):
    """Updates after the last train/* log of a finished run were kept in its checkpoint and
    never logged; now they are, at its last frame, and the checkpoint no longer carries them."""
    trainer = build(tmp_path)
    trainer.config = LoopConfig(**{**SCHEDULE, "log_every": 100})
    trainer._schedules()
    counters = trainer.run(progress=False)
    trainer.env.close()
    trainer.logger.close()
    end = counters["frames"]
    assert end % 100  # 240 and a few: between two scheduled logs
    assert [step for step, _ in _scalars(tmp_path)["train/loss_obs"]] == [100, 200, end]
    assert not load_checkpoint(tmp_path)["pending_metrics"]


class ScriptedAgent(EchoAgent):
    """EchoAgent with known outputs for the loop to log: update ``n`` returns ``x = n²`` (noting
    the frame count it ran at), its critic values every state at ``critic_value``, and
    ``report`` returns fixed per-horizon curves whose MSE and SSIM differ everywhere."""

    critic_value = 7.0
    horizons = 45

    def __init__(self):
        super().__init__()
        self.trainer = None
        self.updates_at = []  # (frames, x) of every update
        self.actor_loss = SimpleNamespace(gamma=0.9)

    def train_step(self, batch) -> dict:
        super().train_step(batch)
        x = float(self.updates**2)
        self.updates_at.append((self.trainer.counters["frames"], x))
        return {"x": torch.tensor(x)}

    def critic(self, feat):
        return SimpleNamespace(mean=torch.full(feat.shape[:-1], self.critic_value))

    def report(self, batch, num_samples):
        h = torch.arange(1, self.horizons + 1, dtype=torch.float32)
        video = torch.zeros(1, 6, 3, 4, 4, dtype=torch.uint8)
        return {
            "context": 2,
            "video_real": video,
            "video_pred": video,
            "open_loop_mse": 0.01 * h,
            "open_loop_ssim": 1.0 - 0.02 * h,
            "open_loop_sharpness": 0.5,
            "bits_per_dim": 3.25,
            "open_loop_reward_abs_error": 0.1 + 0.003 * h,
            "open_loop_reward_bias": -0.05 * h,
        }


def _scripted_trainer(tmp_path, eval_env=None, **schedule) -> Trainer:
    agent = ScriptedAgent()
    config = dict(total_frames=60, prefill_steps=5, train_ratio=6.0, batch_size=1, seq_len=2)
    config.update(checkpoint_every=0, eval_video=False, log_every=0, eval_every=0)
    config.update(report_every=0, eval_episodes=1)
    trainer = Trainer(
        agent,
        EchoEnv(5),
        SequenceReplay(1000, 1, 2, 1, seed=0),
        RunLogger("tb", log_dir=str(tmp_path)),
        tmp_path,
        LoopConfig(**{**config, **schedule}),
        make_eval_env=eval_env,
        action_dim=1,
    )
    agent.trainer = trainer
    return trainer


def test_train_metrics_are_the_mean_of_the_updates_since_the_last_log(tmp_path):
    """Each ``train/*`` point is the mean of the values the updates since the previous log
    returned (several per period here, all different), recomputed from the frame count each
    update ran at: fails if a log shows the period's last (or first) update instead."""
    trainer = _scripted_trainer(tmp_path, log_every=10)
    trainer.run(progress=False)
    trainer.env.close()
    trainer.logger.close()
    logged = _scalars(tmp_path)["train/x"]
    steps = [s for s, _ in logged]
    assert steps[:3] == [20, 30, 40] and steps[-1] == trainer.counters["frames"]
    updates = trainer.agent.updates_at
    previous = 0
    for step, value in logged:
        period = [x for f, x in updates if previous < f <= step]
        assert len(period) > 1 and len(set(period)) > 1
        assert value == pytest.approx(sum(period) / len(period), rel=1e-6)
        previous = step
    assert previous >= updates[-1][0]  # every update was logged


def test_report_logs_mse_and_ssim_at_their_own_horizons(tmp_path):
    """The report's scalars are the agent's report's entries: ``open_loop_mse_h{h}`` and
    ``open_loop_ssim_h{h}`` the h-th value of each curve (h = 1, 10, 25, 45), their means, the
    sharpness and the bits/dim, the reward head's absolute error (its mean, h = 1, 15, 45) and
    bias; fails if one curve is logged under the other's name."""
    trainer = _scripted_trainer(tmp_path, total_frames=30, report_every=30)
    trainer.run(progress=False)
    trainer.env.close()
    trainer.logger.close()
    logged = {
        tag: values for tag, values in _scalars(tmp_path).items() if tag.startswith("replay/")
    }
    h = torch.arange(1, 46, dtype=torch.float64)
    mse, ssim = 0.01 * h, 1.0 - 0.02 * h
    want = {"bits_per_dim": 3.25, "open_loop_sharpness": 0.5}
    want.update(open_loop_mse_mean=float(mse.mean()), open_loop_ssim_mean=float(ssim.mean()))
    for k in (1, 10, 25, 45):
        want[f"open_loop_mse_h{k}"] = float(mse[k - 1])
        want[f"open_loop_ssim_h{k}"] = float(ssim[k - 1])
    error, bias = 0.1 + 0.003 * h, -0.05 * h
    want["open_loop_reward_abs_error_mean"] = float(error.mean())
    for k in (1, 15, 45):
        want[f"open_loop_reward_abs_error_h{k}"] = float(error[k - 1])
        want[f"open_loop_reward_bias_h{k}"] = float(bias[k - 1])
    assert set(logged) == {f"replay/{name}" for name in want}
    for name, value in want.items():
        assert logged[f"replay/{name}"] == [(30, pytest.approx(value, rel=1e-6))], name


def test_evaluation_logs_the_critics_value_and_the_return_to_go(tmp_path):
    """``eval/critic_value`` is the critic's mean value over the first quarter of the evaluation
    episode (7 at every state here) and ``eval/critic_return_to_go`` the discounted return the
    policy then collected there, recomputed from the actions the eval env received (its reward
    echoes them): fails if the two are swapped or one is logged for the other."""
    received = []
    trainer = _scripted_trainer(tmp_path, eval_env=lambda i: EchoEnv(8, received=received))
    result = trainer.evaluate()
    trainer.env.close()
    trainer.logger.close()
    rewards = torch.cat(received).double()  # r_1 .. r_8
    assert len(rewards) == 8
    gamma = trainer.agent.actor_loss.gamma
    to_go = [sum(gamma**k * float(r) for k, r in enumerate(rewards[t:])) for t in range(8)]
    first = max(1, int(8 * 0.25))
    want_to_go = sum(to_go[:first]) / first
    assert abs(want_to_go - ScriptedAgent.critic_value) > 1
    logged = _scalars(tmp_path)
    assert logged["eval/critic_value"] == [(0, pytest.approx(ScriptedAgent.critic_value))]
    assert logged["eval/critic_return_to_go"] == [(0, pytest.approx(want_to_go, rel=1e-5))]
    assert result["critic_value"] == pytest.approx(ScriptedAgent.critic_value)


def test_a_second_sigterm_aborts_with_its_own_signal(tmp_path):
    """The abort raised a plain KeyboardInterrupt, so train.py exited 130 for a second SIGTERM
    (128 + the exception's signum: 143)."""
    import signal

    trainer = build(tmp_path)
    trainer._on_signal(signal.SIGTERM, None)  # the first: finish the step, save, return
    assert trainer._stop_requested and trainer.stop_signal == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt) as info:
        trainer._on_signal(signal.SIGTERM, None)
    assert info.value.signum == signal.SIGTERM
    trainer.logger.close()


def test_the_logs_are_flushed_before_the_checkpoint_is_written(tmp_path):
    """A resume purges the steps after its checkpoint and never logs the earlier ones again:
    events still in the writer's buffer when the checkpoint landed were lost to a crash."""
    trainer = build(tmp_path)
    order = []
    flush, write = trainer.logger.flush, trainer._write_checkpoint
    trainer.logger.flush = lambda: order.append("flush") or flush()
    trainer._write_checkpoint = lambda: order.append("checkpoint") or write()
    trainer.save()
    trainer.env.close()
    assert order[:2] == ["flush", "checkpoint"]


FINAL_TAGS = ("eval/episode_return", "heldout/bits_per_dim", "heldout/open_loop_mse_h1")


@pytest.fixture(scope="module")
def finished_run_logs(tmp_path_factory):
    """The final points of an uninterrupted run (evaluation and report at its last frame)."""
    run_dir = tmp_path_factory.mktemp("finished")
    trainer = build(run_dir)
    trainer.run(progress=False)
    trainer.env.close()
    trainer.logger.close()
    logged = _scalars(run_dir)
    return {tag: logged[tag] for tag in FINAL_TAGS}


@pytest.mark.slow
@pytest.mark.parametrize("killed_in", ["evaluate", "report"])
def test_a_run_killed_in_its_final_evaluation_makes_it_when_resumed(
    tmp_path, finished_run_logs, killed_in
):
    """The final evaluation and report come after the final checkpoint: a run killed during
    them (SIGKILL, or a second Ctrl-C) resumed to "nothing to train" and its curves ended a
    point short. The resume now makes what is missing with the streams the uninterrupted run
    used; killed during the report, it makes the evaluation again for the report's held-out
    episode without logging it a second time."""
    trainer = build(tmp_path)
    made = getattr(trainer, killed_in)

    def killed_at_the_end(*args, **kwargs):
        if trainer.counters["frames"] >= SCHEDULE["total_frames"]:
            raise KeyboardInterrupt
        return made(*args, **kwargs)

    setattr(trainer, killed_in, killed_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(progress=False)
    trainer.env.close()
    trainer.logger.close()
    state = load_checkpoint(tmp_path)
    end = state["counters"]["frames"]
    assert end >= SCHEDULE["total_frames"] and state["counters"]["evals"] == 2
    assert final_evaluation_pending(state, tmp_path)
    if killed_in == "evaluate":  # a record from an earlier, shorter schedule does not count
        (tmp_path / FINAL_EVALUATION).write_text('{"frames": 100, "made": ["eval"]}')
        assert final_evaluation_pending(state, tmp_path)

    resumed = build(tmp_path, seed=7)
    resumed.load()
    counters = resumed.run(progress=False)
    resumed.env.close()
    resumed.logger.close()
    assert counters == {**state["counters"], "evals": 3}  # no frame, step or update more
    assert not final_evaluation_pending(load_checkpoint(tmp_path), tmp_path)
    logged = _scalars(tmp_path)
    assert [step for step, _ in logged["eval/episode_return"]] == [100, 200, end]
    for tag in FINAL_TAGS:  # one point per step, the uninterrupted run's values
        assert logged[tag] == finished_run_logs[tag], tag
    # Checkpoints from before the key existed keep "nothing to train".
    assert not final_evaluation_pending({"counters": {"frames": end}}, tmp_path / "nowhere")


def test_a_run_stopped_before_its_first_iteration_logs_its_config_once(tmp_path):
    """A checkpoint written before the first iteration (a stop already requested) is at
    iteration 0: its resume logged the config text and hyperparameters a second time."""
    trainer = build(tmp_path)
    trainer.run_config = {"seed": 0}
    trainer.request_stop()
    assert trainer.run(progress=False)["iterations"] == 0
    trainer.env.close()
    trainer.logger.close()
    resumed = build(tmp_path)
    resumed.run_config = {"seed": 0}
    resumed.load()
    resumed.config = LoopConfig(**{**SCHEDULE, "total_frames": 20, "eval_every": 0})
    resumed._schedules()
    assert resumed.run(progress=False)["iterations"] > 0
    resumed.env.close()
    resumed.logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("config/text_summary")] == [0]


def test_the_logs_are_flushed_before_the_final_evaluation_is_recorded(tmp_path, monkeypatch):
    """The record says the points are logged: they must be on disk before it is."""
    trainer = build(tmp_path)
    order = []
    flush = trainer.logger.flush
    trainer.logger.flush = lambda: order.append("flush") or flush()
    write = loop_module.write_text_atomically
    monkeypatch.setattr(
        loop_module, "write_text_atomically", lambda *a: order.append("record") or write(*a)
    )
    trainer._record_final(240, {"eval"})
    trainer.env.close()
    assert order == ["flush", "record"]
    assert final_evaluation_made(tmp_path, 240) == {"eval"}


def test_the_first_forms_final_evaluation_keys_still_read(tmp_path):
    """Checkpoints and records written by the first version of the record (one flag; a record
    written once both parts were logged) neither crash a resume nor repeat the evaluation."""
    state = {"final_evaluation_due": True, "counters": {"frames": 430}}
    assert final_evaluation_pending(state, tmp_path)
    (tmp_path / FINAL_EVALUATION).write_text('{"frames": 430}\n')
    assert final_evaluation_made(tmp_path, 430) == {"eval", "report"}
    assert not final_evaluation_pending(state, tmp_path)
