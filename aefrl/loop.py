"""The training loop: collect, replay, train at a fixed ratio, evaluate, report, checkpoint.

It talks to the agent only through the narrow interface (``act``, ``train_step``, ``report``,
``state_dict`` / ``load_state_dict``), so every agent in ``agents/`` shares it. Counters:
*frames* are environment frames (the physics steps the env reports: agent steps × action
repeat, fewer when an episode ends inside a repeat), the x-axis of every log.

Interrupts: the first Ctrl-C (SIGINT) or SIGTERM finishes the current iteration, writes a
checkpoint and returns (an evaluation or report that fell due in that iteration is left to the
resumed run, so that a scheduler's grace period is not spent on it; one under way when the signal
comes stops after its current step, and the report after it waits too); a second one aborts at once
(the last checkpoint stays intact, as every checkpoint is written atomically). ``Trainer.load`` +
``run`` continue a run exactly: models, optimisers, replay, RNG states, counters, schedules, and
the environment mid-episode (single env).

Evaluations and reports draw their random numbers from streams of their own (forked from the
global generators, seeded from the run's seed and their index): turning them on, off or more
often leaves the training run as it was, so they are neutral settings in an ablation.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tensordict import TensorDict
from tqdm import tqdm

from aefrl import keys
from aefrl.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CheckpointError,
    check_contents,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    write_text_atomically,
)
from aefrl.checkpoint import set_rng_state as restore_rng
from aefrl.cli import FINAL_EVALUATION
from aefrl.collect import Collector
from aefrl.cuda_graph import CudaGraphed, graph_train_step
from aefrl.evaluation import critic_calibration, run_episodes
from aefrl.logging import RunLogger, open_loop_video
from aefrl.seeding import forked_torch_rng, stream_seed

__all__ = [
    "CHECKPOINT_FORMAT",
    "FINAL_EVALUATION",
    "LoopConfig",
    "Trainer",
    "final_evaluation_pending",
]


#: The loop's phases, timed for ``perf/time_<phase>``: their shares of the time between logs.
PHASES = ("collect", "update", "eval", "report", "checkpoint")


# FINAL_EVALUATION (aefrl.cli, beside the run's other files): ``{"frames": N, "made": ["eval",
# "report"]}``, the frame count and the parts made.


def write_back_contexts(replay, ids: torch.Tensor, out: dict) -> int:
    """Pop an update's new contexts from its outputs ``out`` (``context_belief`` /
    ``context_state`` ``[B, T-1, ·]``: row t's posterior for row t+1) and write them to the
    window's rows 1..T-1, ``ids [B, T]`` from ``replay.sample(ids=True)``. Position-major:
    where windows overlap, the posterior that filtered the most rows of its window before the
    row comes last, and :meth:`~aefrl.replay.SequenceReplay.write` keeps it. Returns the
    number of rows written."""
    news = {k: out.pop(k).transpose(0, 1) for k in keys.CONTEXT_KEYS}
    return replay.write(ids[:, 1:].T, news)


def final_evaluation_pending(state: dict, run_dir: str | Path) -> bool:
    """Whether the run whose checkpoint holds ``state`` reached its ``total_frames`` and was
    stopped (killed, or interrupted twice) before its final evaluation and report were logged:
    its resume has them to make, not "nothing to train". False for checkpoints from before the
    key existed."""
    due = state.get("final_evaluation_due")
    if not due:
        return False
    if due is True:  # checkpoints of 2026-12-07's first form: one flag for both parts
        due = ["eval", "report"]
    return not set(due) <= final_evaluation_made(run_dir, state["counters"]["frames"])


def final_evaluation_made(run_dir: str | Path, frames: int) -> set[str]:
    """The parts (``"eval"``, ``"report"``) of the final evaluation at ``frames`` that
    ``FINAL_EVALUATION`` in ``run_dir`` records as logged."""
    try:
        record = json.loads((Path(run_dir) / FINAL_EVALUATION).read_text())
        if record["frames"] != frames:
            return set()
        # The first form, {"frames": N}, was written once both parts were logged.
        return set(record.get("made", ("eval", "report")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


#: The slowest video frame rate our GIFs can hold (Pillow writes frames of at most 327.67 s).
MIN_VIDEO_FPS = 0.004


@dataclass
class LoopConfig:
    """Schedule of a run; every ``*_every`` is in environment frames (0 disables)."""

    total_frames: int = 1_000_000  # stop after this many environment frames
    action_repeat: int = 2  # frames per agent step (to count frames)
    prefill_steps: int = 2500  # agent steps of uniform random actions before training starts
    train_ratio: float = 512.0  # replayed steps (batch x seq_len) per agent step
    batch_size: int = 16  # B of a training batch (for the train ratio)
    seq_len: int = 64  # T of a training batch (for the train ratio)
    log_every: int = 2000  # training scalars
    eval_every: int = 20000  # evaluation episodes with the deterministic policy
    eval_episodes: int = 5
    report_every: int = 20000  # video of real vs imagined frames, held-out bits/dim
    report_samples: int = 8  # K of the importance-sampled bits/dim in reports
    checkpoint_every: int = 50000
    video_fps: float = 15.0
    eval_video: bool = True  # each evaluation's first episode as a GIF (eval/first_episode)
    cuda_graph: bool = False  # replay the whole update as one CUDA graph (aefrl/cuda_graph.py)
    cuda_graph_fallback: bool = True  # if the capture fails: warn and run eagerly (else raise)

    def __post_init__(self) -> None:
        for f in fields(self):  # counts given as 1e6 on the command line arrive as floats
            value = getattr(self, f.name)
            if f.type == "int" and isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(f"{f.name} must be a whole number, got {value}")
                setattr(self, f.name, int(value))
        counts = ("total_frames", "action_repeat", "batch_size", "seq_len", "eval_episodes")
        for name in (*counts, "report_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:  # a one-step window holds no transition: the recurrence cannot learn
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        periods = ("prefill_steps", "log_every", "eval_every", "report_every", "checkpoint_every")
        for name in periods:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.train_ratio > 0:
            raise ValueError(f"train_ratio must be > 0, got {self.train_ratio}")
        if not self.video_fps >= MIN_VIDEO_FPS:  # a slower GIF crashed the first evaluation
            raise ValueError(
                f"video_fps must be >= {MIN_VIDEO_FPS} (a GIF frame lasts at most 327 s), "
                f"got {self.video_fps}"
            )
        if not isinstance(self.eval_video, bool):  # bool("false") would be True
            raise ValueError(f"eval_video must be true or false, got {self.eval_video!r}")


class _Every:
    """True once each time a counter passes a multiple of ``period`` (never when period is 0)."""

    def __init__(self, period: int, last: int = 0) -> None:
        self.period, self.last = period, last

    def __call__(self, value: int) -> bool:
        if self.period <= 0 or value // self.period <= self.last // self.period:
            return False
        self.last = value
        return True


class Trainer:
    """Runs an agent on an environment with a sequence replay (see module docstring).

    Args:
        agent: the agent (``agents/``).
        env: the training env (torchrl, single or batched).
        replay: a :class:`~aefrl.replay.SequenceReplay` with ``num_envs`` streams.
        logger: a :class:`~aefrl.logging.RunLogger`.
        run_dir: where ``checkpoint.pt`` lives.
        config: the schedule.
        make_eval_env: ``seed -> env`` building a fresh single evaluation env; a new env per
            evaluation (seeded by the evaluation's index) keeps resumed runs exact.
        run_config: the resolved run configuration, stored in checkpoints and logged once.
        run_config_file: where a YAML copy of ``run_config`` is rewritten after every
            checkpoint, so that it always shows what the checkpoint resumes with (a resume
            interrupted before its first checkpoint leaves the file as that checkpoint's).
        device: where the agent lives.
        seed: seeds the random prefill policy, and the streams of evaluations and reports.
    """

    def __init__(
        self,
        agent,
        env,
        replay,
        logger: RunLogger,
        run_dir: str | Path,
        config: LoopConfig,
        *,
        make_eval_env: Callable[[int], object] | None = None,
        run_config: dict | None = None,
        run_config_file: str | Path | None = None,
        device="cpu",
        seed: int = 0,
        action_dim: int,
    ) -> None:
        self.agent, self.env, self.replay, self.logger = agent, env, replay, logger
        self.run_dir = Path(run_dir)
        self.config = config
        self.make_eval_env = make_eval_env
        self.run_config = run_config or {}
        self.run_config_file = None if run_config_file is None else Path(run_config_file)
        self.device = torch.device(device)
        self.action_dim = action_dim
        self.seed = int(seed)
        # agent.replay_context: the rows carry their context latents and every update's
        # posteriors are written back to the rows it filtered (DreamerV3's replay_context)
        self.replay_context = bool(getattr(agent, "replay_context", False))
        self.collector = Collector(
            env,
            agent,
            action_dim,
            device,
            torch.Generator().manual_seed(stream_seed(seed, "prefill")),  # not torch's global one
            context=self.replay_context,
        )
        names = ("frames", "agent_steps", "updates", "episodes", "evals", "iterations")
        self.counters = dict.fromkeys(names, 0)
        self.train_credit = 0.0
        self.heldout: TensorDict | None = None  # rows of the latest evaluation episode
        self.last_return = float("nan")
        self._stop_requested = False
        self.stop_signal: int | None = None  # the signal that stopped run() early, if any
        self._saving = False
        self._abort_after_save = False
        self._abort_signal = signal.SIGINT
        # Update metrics waiting for the next train/* log; checkpointed, so that the first point
        # after a resume averages the same updates as an uninterrupted run's.
        self._pending: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._phase_seconds: dict[str, float] = defaultdict(float)  # since the last log
        self._update = None  # the agent's train_step, or its CUDA graph (built on first use)
        self._saved_at: int | None = None  # the frame count of the last checkpoint written
        self._saved_config: dict | None = None  # run_config of the checkpoint loaded or written
        self._schedules()

    def _schedules(self) -> None:
        c, f = self.config, self.counters["frames"]
        self._log = _Every(c.log_every, f)
        self._eval = _Every(c.eval_every, f)
        self._report = _Every(c.report_every, f)
        self._ckpt = _Every(c.checkpoint_every, f)

    # --- checkpoints -----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def save(self) -> None:
        """Write the checkpoint; a second Ctrl-C during the write aborts once it is complete."""
        self._saving = True
        try:
            # The logs up to this frame first: a resume purges the steps after its checkpoint
            # and never writes the earlier ones again, so they must be on disk before it is.
            self.logger.flush()
            self._write_checkpoint()
            self._saved_at = self.counters["frames"]
            if self._saved_config is not None and self._saved_config != self.run_config:
                # A resume's changed settings, recorded where its first checkpoint holds them;
                # flushed, as the next resume (from this checkpoint) will not log them again.
                self.logger.log_config(self.run_config, step=self.counters["frames"])
                self.logger.flush()
            self._saved_config = copy.deepcopy(self.run_config)
            if self.run_config_file is not None:
                self._write_run_config()
        finally:
            self._saving = False
        if self._abort_after_save:
            raise self._abort()

    def _write_checkpoint(self) -> None:
        save_checkpoint(
            self.checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "run_config": self.run_config,
                "loop_config": asdict(self.config),
                "counters": dict(self.counters),
                "train_credit": self.train_credit,
                "last_return": self.last_return,  # the progress bar's, until an episode ends
                "agent": self.agent.state_dict(),
                "replay": self.replay.state_dict(),
                "collector": self.collector.state_dict(),
                "heldout": None if self.heldout is None else self.heldout.to_dict(),
                "rng": rng_state(),
                "pending_metrics": {
                    k: torch.stack(vs).detach().cpu() for k, vs in self._pending.items()
                },
                # Frames of the last evaluation and report: one that fell due in the iteration
                # a stop request ended is still due after the resume.
                "schedules": {"eval": self._eval.last, "report": self._report.last},
                # A complete run whose last frame still owes its evaluation (or report), made
                # after this write: a resume from here makes it if it did not finish.
                "final_evaluation_due": [
                    part for part, due in zip(("eval", "report"), self._final_due()) if due
                ],
                "seed": self.seed,  # of the evaluation and report streams
            },
        )

    def _write_run_config(self) -> None:
        from omegaconf import OmegaConf  # only runs that keep the file need it

        text = OmegaConf.to_yaml(OmegaConf.create(self.run_config))
        try:
            write_text_atomically(self.run_config_file, text)
        except OSError as exc:
            after = (
                f"resume={self.run_dir} continues it"
                if self.counters["frames"] < self.config.total_frames
                else "its final evaluation did not run (scripts/eval.py evaluates the checkpoint)"
            )
            raise CheckpointError(
                f"could not write {self.run_config_file}: {exc.strerror or exc}; the run stopped "
                f"after writing its checkpoint, and {after}"
            ) from None

    def load(self, path: str | Path | None = None, state: dict | None = None) -> None:
        """Restore everything from a checkpoint (default: this run's), or from its already
        loaded contents ``state``."""
        if state is None:
            path = path or self.checkpoint_path
            state = load_checkpoint(path)
        check_contents(state, path or "(given state)")
        self.agent.load_state_dict(state["agent"])
        self._saved_config = copy.deepcopy(state["run_config"])
        # A captured CUDA-graph update keeps writing the optimiser state tensors it was captured
        # with, and load_state_dict replaces them: capture again on the next update.
        self._update = None
        # A stop request belongs to the run() it ended: the loaded run starts with none.
        self._stop_requested, self.stop_signal = False, None
        self.replay.load_state_dict(state["replay"])
        self.counters.update(state["counters"])
        self.train_credit = state["train_credit"]
        self.last_return = float(state.get("last_return", float("nan")))  # absent before
        if state["heldout"] is not None:
            held = state["heldout"]
            self.heldout = TensorDict(held, batch_size=held[keys.PIXELS].shape[:2])
        exact = self.collector.load_state_dict(state["collector"])
        if not exact:
            tqdm.write(
                "resume: batched envs cannot restore their episodes; they restart now, reseeded",
                file=sys.stderr,
            )
        restore_rng(state["rng"])
        pending = state.get("pending_metrics") or {}  # absent from checkpoints before it existed
        self._pending = defaultdict(
            list, {k: list(v.to(self.device).unbind(0)) for k, v in pending.items()}
        )
        self._schedules()
        self.seed = int(state.get("seed", self.seed))  # absent before 2026-12-06
        done = state.get("schedules") or {}  # absent before 2026-12-06: due from the checkpoint
        self._eval.last = done.get("eval", self._eval.last)
        self._report.last = done.get("report", self._report.last)

    # --- interrupts ------------------------------------------------------------------------------
    def request_stop(self, signum: int | None = None) -> None:
        """Finish the current iteration, checkpoint and return from :meth:`run`; for a signal
        (``signum``: a first Ctrl-C or SIGTERM) say so, and keep it in :attr:`stop_signal`."""
        if signum is not None:
            tqdm.write(
                "interrupt: finishing this step and saving a checkpoint (again to abort)",
                file=sys.stderr,
            )
            self.stop_signal = signum
        self._stop_requested = True

    def _abort(self) -> KeyboardInterrupt:
        """The exception of a second interrupt, carrying its ``signum`` (the script's exit code
        is 128 + signum: 130 for Ctrl-C, 143 for SIGTERM)."""
        exc = KeyboardInterrupt()
        exc.signum = self._abort_signal
        return exc

    def _on_signal(self, signum, frame) -> None:
        if self._stop_requested:
            self._abort_signal = signum
            if not self._saving:
                raise self._abort()
            # An exception raised inside torch.save leaves a half-written temp file (and turns
            # into a RuntimeError there): let the write finish, then abort (save() raises).
            tqdm.write("interrupt: aborting once the checkpoint is written", file=sys.stderr)
            self._abort_after_save = True
            return
        self.request_stop(signum)

    # --- the loop --------------------------------------------------------------------------------
    def run(self, progress: bool = True, on_iteration: Callable | None = None) -> dict:
        """Train until ``total_frames``; returns the counters. ``on_iteration(trainer)`` is
        called after every iteration (tests use it to interrupt at a chosen point)."""
        c = self.config
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                handlers[sig] = signal.signal(sig, self._on_signal)
        updates_per_step = c.train_ratio / (c.batch_size * c.seq_len)
        # The prefill's random steps run ~10x faster than training: a bar of its own, so the
        # training bar's rate and ETA start from training alone.
        phase = "train" if self.counters["updates"] else "prefill"
        bar = self._progress_bar(phase, progress)
        t_start, f_start = time.time(), self.counters["frames"]
        since_log = (t_start, f_start)  # perf/fps_interval: frames/s since the last log
        if self._saved_config is None:  # a run that neither loaded nor wrote a checkpoint yet:
            # one stopped before its first iteration had logged these before its checkpoint
            self.logger.log_config(self.run_config)
            self.logger.log_hparams(self.run_config)
        try:
            while self.counters["frames"] < c.total_frames and not self._stop_requested:
                self._iteration(updates_per_step)
                frames = self.counters["frames"]
                if phase == "prefill" and self.counters["updates"]:
                    bar.close()
                    phase = "train"
                    bar = self._progress_bar(phase, progress)
                bar.update(frames - bar.n)
                bar.set_postfix(  # no fps: tqdm's own rate is the current one, fps the mean
                    ret=f"{self.last_return:.1f}",
                    upd=self.counters["updates"],
                    refresh=False,
                )
                if self._log(frames):
                    since_log = self._log_now(t_start, f_start, since_log)
                if self._stop_requested and frames < c.total_frames:
                    # Checkpoint now; a due evaluation or report runs after the resume. (At the
                    # last frame there is no resume: the run finishes its schedule instead.)
                    break
                evaluated = self._eval.last
                due = self._eval(frames) and self.make_eval_env is not None
                if due:
                    with self._timed("eval"):
                        if self.evaluate(stoppable=frames < c.total_frames) is None:
                            self._eval.last = evaluated  # stopped midway: due after the resume
                if self._stop_requested and frames < c.total_frames:
                    break  # a signal during the evaluation: the report waits as well
                if self._report(frames):
                    with self._timed("report"):
                        self.report()
                if self._ckpt(frames):
                    with self._timed("checkpoint"):
                        self.save()
                if on_iteration is not None:
                    on_iteration(self)
            complete = self.counters["frames"] >= c.total_frames
            # The updates since the last train/* log: a finished run logs them at its last
            # frame, and its checkpoint must then not carry them (a stopped one keeps them there
            # for the resumed run's next log).
            flush = complete and bool(self._pending)
            if flush:
                self._log_now(t_start, f_start, since_log)
            if flush or self._saved_at != self.counters["frames"]:  # not just written already
                self.save()
            if complete:
                # A complete run: its final evaluation even if a signal came in its last
                # iteration (a second one aborts it), and it exits as finished.
                self._final_evaluation()
                self.stop_signal = None
        finally:
            bar.close()
            self.logger.flush()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return dict(self.counters)

    def _progress_bar(self, phase: str, progress: bool) -> tqdm:
        """The run's bar from the current frame on, labelled with its phase."""
        return tqdm(
            desc=phase,
            total=self.config.total_frames,
            initial=self.counters["frames"],
            unit="frame",
            disable=not progress,
            dynamic_ncols=True,
            smoothing=0.05,
            # Redirected to a file (nohup, a scheduler's log) the bar is a line per redraw:
            # every 0.1 s during the prefill made ~30 KB a minute; once per 30 s there.
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
            maxinterval=10.0 if sys.stderr.isatty() else 30.0,  # its monitor's forced redraws
        )

    def _final_due(self) -> tuple[bool, bool]:
        """``(evaluate, report)``: what a run at ``total_frames`` still owes its last frame."""
        frames, c = self.counters["frames"], self.config
        if frames < c.total_frames:
            return False, False
        evaluate = bool(c.eval_every and self._eval.last != frames and self.make_eval_env)
        return evaluate, bool(c.report_every and self._report.last != frames)

    def _final_evaluation(self) -> None:
        """A run that reached ``total_frames`` between two evaluations (or reports) evaluates
        (and reports) once more at its last frame, so its curves end where training did. After
        the final checkpoint: a resume that raises ``total_frames`` continues from the state the
        periodic schedule left, as the uninterrupted run would (only this extra point in the
        logs tells them apart). A run stopped by a signal before ``total_frames`` skips it.

        The checkpoint says the evaluation is due (``final_evaluation_due``) and
        ``final_evaluation.json`` says it was made: a run killed during it resumes to make it
        (:func:`final_evaluation_pending`) instead of finding nothing to train."""
        evaluate, report = self._final_due()
        frames = self.counters["frames"]
        made = final_evaluation_made(self.run_dir, frames)
        if evaluate:
            # Its episode is the report's held-out data: a resume that finds the evaluation
            # logged and the report not makes it again (the same stream) without logging it.
            self.evaluate(log="eval" not in made)
            made.add("eval")
            self._record_final(frames, made)
        if report and "report" not in made:
            self.report()
            made.add("report")
            self._record_final(frames, made)
        self.logger.flush()

    def _record_final(self, frames: int, made: set[str]) -> None:
        self.logger.flush()  # what the record says is logged must be on disk first
        record = json.dumps({"frames": frames, "made": sorted(made)})
        write_text_atomically(self.run_dir / FINAL_EVALUATION, record + "\n")

    def _iteration(self, updates_per_step: float) -> None:
        c = self.config
        mode = "random" if self.counters["agent_steps"] < c.prefill_steps else "explore"
        with self._timed("collect"):
            rows, stats, stepped = self.collector.step(mode)
            self.replay.extend(rows.exclude(keys.DONE))
        self.counters["iterations"] += 1
        self.counters["agent_steps"] += stepped
        # The env's count: an action repeat cut short by an episode's end simulates fewer.
        frames = stats.frames if stats.frames is not None else stepped * c.action_repeat
        self.counters["frames"] += frames
        if stats.returns:
            # Parallel envs can finish several episodes in one iteration, at one frame count:
            # TensorBoard keeps one point per step (its reservoir drops the others), so they
            # are logged as their mean. episode_length counts agent steps, not frames.
            self.counters["episodes"] += len(stats.returns)
            self.last_return = stats.returns[-1]
            means = {
                "episode_return": sum(stats.returns) / len(stats.returns),
                "episode_length": sum(stats.lengths) / len(stats.lengths),
            }
            self.logger.log_scalars(means, self.counters["frames"], "env")
        if mode == "random" or not self.replay.ready:
            return
        self.train_credit += stepped * updates_per_step
        with self._timed("update"):
            while self.train_credit >= 1.0:
                batch = self.replay.sample(ids=self.replay_context)
                if self._update is None:
                    self._update = self._make_update(batch)
                out = self._update(batch)
                if self.replay_context:
                    write_back_contexts(self.replay, batch[keys.REPLAY_ID], out)
                if c.log_every:  # with logging off they would pile up, in memory and checkpoints
                    for key, value in out.items():
                        self._pending[key].append(value)
                self.counters["updates"] += 1
                self.train_credit -= 1.0

    @contextlib.contextmanager
    def _timed(self, phase: str):
        """Charge the body's wall time to ``phase`` (``perf/time_<phase>``, one of
        :data:`PHASES`). A CUDA update runs asynchronously, so its phase ends by waiting for the
        device: otherwise its time fell to the collection, whose action waits for it anyway (so
        the wait costs nothing)."""
        start = time.time()
        try:
            yield
        finally:
            if phase == "update" and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._phase_seconds[phase] += time.time() - start

    @property
    def graphed(self) -> bool:
        """Whether updates replay a captured CUDA graph (False before the first update, and
        after a failed capture fell back to eager updates)."""
        return isinstance(self._update, CudaGraphed)

    def _make_update(self, batch) -> Callable:
        """The agent's ``train_step``, or (``cuda_graph``) its CUDA graph captured on ``batch``."""
        c = self.config
        if not c.cuda_graph:
            return self.agent.train_step
        try:
            return graph_train_step(self.agent, batch)
        except Exception as exc:
            if not c.cuda_graph_fallback:
                raise
            # A spoiled capture raises at its end ("operation failed due to a previous error
            # during capture"); the operation that spoiled it is the exception before that.
            first = exc.__cause__ or exc.__context__
            cause = f"; first: {type(first).__name__}: {first}" if first is not None else ""
            tqdm.write(
                f"cuda_graph: capturing the update failed ({type(exc).__name__}: {exc}{cause}); "
                "updates run eagerly (set loop.cuda_graph=false to skip the attempt)",
                file=sys.stderr,
            )
            return self.agent.train_step

    def _log_now(self, t_start: float, f_start: int, since_log: tuple) -> tuple[float, int]:
        """Write the logs of this frame, with ``perf/fps`` since ``(t_start, f_start)`` and
        ``perf/fps_interval`` since ``since_log`` (time, frames); returns the new ``since_log``."""
        now, frames = time.time(), self.counters["frames"]
        fps = (frames - f_start) / max(now - t_start, 1e-9)
        seconds = max(now - since_log[0], 1e-9)
        self._write_metrics(fps, (frames - since_log[1]) / seconds, seconds)
        return now, frames

    def _write_metrics(self, fps: float, fps_interval: float, seconds: float) -> None:
        """Logs the update metrics gathered since the last call (their means) and ``perf/*``:
        ``fps``, frames/s since the process started (prefill, evaluations and pauses included),
        ``fps_interval``, frames/s over the ``seconds`` since the last log (the current speed),
        and ``time_<phase>``, the share of those seconds each phase took (collect, update, eval,
        report, checkpoint; the rest is logging and the loop itself)."""
        step = self.counters["frames"]
        if self._pending:
            means = {k: torch.stack(vs).float().mean() for k, vs in self._pending.items()}
            self.logger.log_scalars(means, step, "train")
            self._pending.clear()
        # Every phase at every log, 0 where it did not run (points at its runs alone would be
        # joined by TensorBoard's lines into a steady cost).
        shares = {f"time_{p}": self._phase_seconds[p] / seconds for p in PHASES}
        self._phase_seconds.clear()
        self.logger.log_scalars(
            {
                "fps": fps,
                "fps_interval": fps_interval,
                "agent_steps": self.counters["agent_steps"],
                "updates": self.counters["updates"],
                "replay_rows": len(self.replay),
                **shares,
            },
            step,
            "perf",
        )

    # --- evaluation and reports ------------------------------------------------------------------
    def _own_stream(self, stream: str, index: int):
        """Torch's global generators seeded for ``stream`` and ``index`` in the body; the
        training run's states (CPU, and the agent's CUDA device) come back after."""
        devices = [self.device] if self.device.type == "cuda" else []
        return forked_torch_rng(stream_seed(self.seed, stream, index), devices)

    @torch.no_grad()
    def evaluate(self, stoppable: bool = False, log: bool = True) -> dict | None:
        """``eval_episodes`` episodes with the deterministic policy on a fresh env; keeps the
        first episode's rows as held-out data for :meth:`report`. With ``stoppable``, a stop
        request (a signal) ends it midway: nothing is logged or kept, the count of evaluations
        stays, and None is returned (the resumed run evaluates with the same index's stream).
        ``log=False`` makes its first episode only, the held-out data, without logging or
        statistics (an evaluation logged before a resume: its first episode comes from the same
        stream), and returns ``{}``."""
        index = self.counters["evals"]
        env = self.make_eval_env(index)
        stop = (lambda: self._stop_requested) if stoppable else None
        try:
            with self._own_stream("eval", index):  # e.g. the VAE posterior samples
                episodes = run_episodes(
                    env, self.agent, self.action_dim, self.device,
                    self.config.eval_episodes if log else 1, True, should_stop=stop,
                )  # fmt: skip
        finally:
            env.close()
        if episodes is None:
            return None
        self.heldout = episodes.first_episode.exclude(keys.DONE).unsqueeze(0)
        self.counters["evals"] += 1
        if not log:  # the held-out episode was what it was made for: nothing to report
            return {}
        r = torch.tensor(episodes.returns, dtype=torch.float64)
        result = {"episode_return": float(r.mean())}
        if len(r) > 1:  # one episode has no spread to show (0 would read as none)
            result["episode_return_std"] = float(r.std())
        if episodes.values:  # the critic against what the policy collected (aefrl.evaluation)
            gamma = self.agent.actor_loss.gamma
            cal = critic_calibration(episodes.values, episodes.rewards, gamma)
            result["critic_value"] = cal["value_mean"]
            result["critic_return_to_go"] = cal["return_to_go_mean"]
        self.logger.log_scalars(result, self.counters["frames"], "eval")
        if self.config.eval_video:  # what the policy did, as the agent saw it (~1.3 MB/500 steps)
            pixels = self.heldout[keys.PIXELS][0]  # [T, C, H, W] uint8
            self.logger.log_video(
                "eval/first_episode", pixels, self.counters["frames"], fps=self.config.video_fps
            )
        return result

    @torch.no_grad()
    def report(self) -> None:
        """Open-loop video (real | imagined) and held-out bits/dim, if there is held-out data;
        otherwise on a replay batch (tags say which)."""
        if not hasattr(self.agent, "report"):
            return
        c, step = self.config, self.counters["frames"]
        if self.heldout is not None:
            source, episode = "heldout", self.heldout
            steps = min(50, episode.shape[1])
            chunks = episode.shape[1] // steps
            batch = episode[:, : chunks * steps].reshape(chunks, steps)
        elif self.replay.ready:  # from a generator of its own: training batches stay the same
            draw = torch.Generator().manual_seed(stream_seed(self.seed, "report_batch", step))
            source, batch = "replay", self.replay.sample(generator=draw)
        else:
            return
        with self._own_stream("report", step):  # the bits/dim estimate's samples
            out = self.agent.report(batch.to(self.device), num_samples=c.report_samples)
        real, pred, n = out["video_real"][0].cpu(), out["video_pred"][0].cpu(), out["context"]
        tag = f"{source}/open_loop_real_imagined_error"
        self.logger.log_video(tag, open_loop_video(real, pred, n), step, fps=c.video_fps)
        # Context frames: real (top) over their posterior reconstructions (bottom), side by side.
        context = torch.cat([real[:n], pred[:n]], -2).permute(1, 2, 0, 3).flatten(2)
        self.logger.log_image(f"{source}/reconstruction", context, step)
        horizon, ssim = out["open_loop_mse"], out["open_loop_ssim"]
        scalars = {
            "bits_per_dim": out["bits_per_dim"],
            # NaN marks horizons that no sequence of a replay batch reached within its episode
            "open_loop_mse_mean": horizon.nanmean(),
            "open_loop_ssim_mean": ssim.nanmean(),
        }
        if not math.isnan(out["open_loop_sharpness"]):  # blur of the imagined frames (§3)
            scalars["open_loop_sharpness"] = out["open_loop_sharpness"]
        for h in (1, 10, 25, 45):
            if h <= len(horizon) and not horizon[h - 1].isnan():
                scalars[f"open_loop_mse_h{h}"] = horizon[h - 1]
                scalars[f"open_loop_ssim_h{h}"] = ssim[h - 1]
        if "open_loop_reward_abs_error" in out:  # what the actor learns from, 15 steps by default
            error, bias = out["open_loop_reward_abs_error"], out["open_loop_reward_bias"]
            scalars["open_loop_reward_abs_error_mean"] = error.nanmean()
            for h in (1, 15, 45):
                if h <= len(error) and not error[h - 1].isnan():
                    scalars[f"open_loop_reward_abs_error_h{h}"] = error[h - 1]
                    scalars[f"open_loop_reward_bias_h{h}"] = bias[h - 1]
        self.logger.log_scalars(scalars, step, source)
