"""Train an agent on a DMC pixel task (the README's main job).

    python scripts/train.py                                   # aef Dreamer on walker-walk
    python scripts/train.py env.task=cartpole-swingup obs_model=vae seed=1
    python scripts/train.py exp=smoke                          # the whole loop in < 1 minute
    python scripts/train.py resume=runs/walker-walk/dreamer-aef/s0-... # continue a run exactly

Logs: ``tensorboard --logdir runs``. Configuration: ``configs/`` (every key documented).
"""

from __future__ import annotations

import os
import signal
import sys

from aefrl.interrupts import imports_done, quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting(__name__)  # until the imports below are done

from aefrl.gl_backend import exit_if_user_backend_broken

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: docs/benchmarks.md, finding 8
exit_if_user_backend_broken()  # before torchrl imports mujoco, which reads MUJOCO_GL

import copy
import fcntl
import functools
import json
import math
import random
import shutil
from pathlib import Path
from typing import NamedTuple

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from aefrl.allocator import tune_malloc
from aefrl.arguments import VERSION
from aefrl.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_contents,
    load_checkpoint,
    write_text_atomically,
)
from aefrl.cli import (
    RUN_CONFIG,
    RUN_LOCK,
    UserError,
    check_run_env,
    make_run_env,
    resolve_device,
)
from aefrl.envs.dmc import task_action_dim
from aefrl.logging import RunLogger
from aefrl.loop import LoopConfig, Trainer, final_evaluation_pending
from aefrl.nn import conv_stages
from aefrl.overrides import MULTIRUN_FLAGS, OverrideError, check_overrides
from aefrl.provenance import RUN_RECORDS, append_run_record, command_line
from aefrl.replay import STORAGES, SequenceReplay, check_replay_sizes
from aefrl.resume_overrides import (
    CHOICES_KEY,
    command_line_conflicts,
    describe,
    group_choices,
    leaves,
    overridable_given,
)
from aefrl.seeding import stream_seed
from agents.base import shared_entries
from agents.factory import IGNORED, build_agent, check_read_settings, name_keys

imports_done()  # KeyboardInterrupt again

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
_HELD_LOCKS: dict = {}  # run_dir -> its open lock file; closing it (or exiting) releases it
_COUNTERS: dict = {}  # run_dir -> its Trainer's counters, once built (did its loop run?)
# LoopConfig fields that come from other config groups than loop (for error messages).
LOOP_FIELD_KEYS = {
    "action_repeat": "env.action_repeat",
    "batch_size": "replay.batch_size",
    "seq_len": "replay.seq_len",
    "log_every": "logger.log_every",
    "video_fps": "logger.video_fps",
    "eval_video": "logger.eval_video",
}


def resolve_cuda_graph(value, device: torch.device) -> dict:
    """``loop.cuda_graph`` as LoopConfig fields: ``auto`` tries on CUDA devices and falls back to
    eager updates if the capture fails; ``true`` needs a CUDA device and a working capture."""
    if value == "auto":
        return {"cuda_graph": device.type == "cuda", "cuda_graph_fallback": True}
    if not isinstance(value, bool):
        raise UserError(f"loop.cuda_graph must be auto, true or false, got {value!r}")
    if value and device.type != "cuda":
        raise UserError(f"loop.cuda_graph=true needs a CUDA device, but device is {device}")
    return {"cuda_graph": value, "cuda_graph_fallback": False}


#: What a run writes in its directory besides its checkpoint and lock: its configuration, logs,
#: the replay's files (``replay.storage=disk``), records and a checkpoint write cut short.
RUN_FILES = (RUN_CONFIG, "tb", "replay", RUN_RECORDS, f".{CHECKPOINT_NAME}.tmp")

# Keys a resumed run may change: none touches the learning itself, so the resumed run still
# follows the uninterrupted one (threads exactly up to float rounding: reductions may split
# differently; another device or CUDA graphs on or off only as closely as their kernels
# agree, and CUDA's RNG state carries over between CUDA devices only). Each with the smallest
# value it accepts, bool for a switch, or None where check_settings checks the value as it
# checks a new run's (the device; loop.cuda_graph, which a GPU run moved to the CPU must turn
# off when it was true; the GIFs' frame rate, refused below LoopConfig's minimum, which a run
# from before that minimum may have to change to resume at all).
RESUME_OVERRIDABLE = {
    "loop.total_frames": 1,
    "loop.checkpoint_every": 0,
    "threads": 0,
    "logger.eval_video": bool,
    "device": None,
    "loop.cuda_graph": None,
    "logger.video_fps": None,
}


def resume_hint(message: str) -> str:
    """A resumed run's settings error, with the way out when the key it names (its first word,
    ``key`` or ``key=value``) is one a resume may change: a run whose saved value a later check
    refuses could otherwise read as impossible to resume."""
    key = message.split(" ", 1)[0].split("=", 1)[0]
    if key in RESUME_OVERRIDABLE:
        return f"{message} (a resume may set {key} on the command line)"
    return message


def check_whole_number(key: str, value, minimum: int | None = None) -> None:
    """Refuse ``value`` unless it is a whole number (>= ``minimum``, if given): int() would
    truncate 2.5 without a word. Whole floats (``1e6`` from the command line) pass."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    low = minimum is not None and whole and value < minimum
    if isinstance(value, bool) or not whole or low:  # is_integer(): False for inf and nan too
        bound = "" if minimum is None else f" >= {minimum}"
        raise UserError(f"{key} must be a whole number{bound}, got {value!r}")


def non_finite_keys(conf: dict) -> list[tuple[str, float]]:
    """``(dotted key, value)`` of the configuration's floats that are inf or nan: range checks
    of the form ``not value > 0`` let inf through (a learning rate of inf crashed deep in a
    sampler; a train ratio of inf trained nothing and exited 0)."""
    return [
        (key, value)
        for key, value in leaves(conf).items()
        if isinstance(value, float) and not math.isfinite(value)
    ]


def fill_legacy_defaults(conf: dict) -> dict:
    """Give a resumed run's configuration ``conf`` (in place) the value of every learning key
    added since it started that the run trained with, where the new default differs: a resume
    continues the algorithm it began with. Returns ``conf``."""
    agent = conf.get("agent")
    if isinstance(agent, dict) and agent.get("name") == "dreamer":
        # Before agent.actor_loss.actor_input_grad existed the actor trained through its input.
        if agent.get("actor_loss") is None:  # null: the defaults of that time
            agent["actor_loss"] = {}
        agent["actor_loss"].setdefault("actor_input_grad", True)
    return conf


def hydra_job() -> tuple[bool, int, list[str]] | None:
    """``(is a -m sweep, job number, the job's overrides)`` of the running Hydra job; None
    outside Hydra (tests calling :func:`train` directly)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:  # job.num is unset (missing) outside sweeps
        return False, 0, list(hc.overrides.task)
    return True, int(hc.job.num), list(hc.overrides.task)


def sweep_job_run_dir(run_dir: str, job: tuple[bool, int, list[str]] | None) -> str:
    """The ``run_dir`` of a sweep's job, with ``-j<job number>`` appended.

    Hydra resolves ``${now:}`` once per process, so the jobs of a ``-m`` sweep over a key the
    default path does not name (``loop.train_ratio=32,64``) all got one directory and every
    job after the first was refused; so did every job of a sweep given one ``run_dir=X``.
    """
    if job is None or not job[0]:
        return run_dir
    return f"{run_dir}-j{job[1]}"


def path_setting(key: str, value) -> str:
    """A directory path from the configuration: a number is a folder's name (``run_dir=5``);
    null, a boolean or '' (which would have put the run in the working directory) is refused."""
    if value is None or isinstance(value, bool) or value == "":
        raise UserError(f"{key} takes a directory path, got {json.dumps(value)}")
    return str(value)


def new_run_dir(cfg: DictConfig) -> Path:
    """The directory of a new run: ``cfg.run_dir``, numbered per job in a sweep."""
    return Path(sweep_job_run_dir(path_setting("run_dir", cfg.run_dir), hydra_job()))


def run_dir_of(cfg: DictConfig) -> Path:
    """The run's directory, unchecked: a new run's, or the one ``resume`` names (a directory,
    or the checkpoint file in it)."""
    if cfg.resume is None:
        return new_run_dir(cfg)
    path = Path(path_setting("resume", cfg.resume))
    return path.parent if path.is_file() and path.name == CHECKPOINT_NAME else path


def run_configuration(cfg: DictConfig) -> tuple[dict, Path, dict | None]:
    """The configuration this run uses, its directory, and the checkpoint it resumes (if any).

    A resumed run takes its configuration from its checkpoint; only the keys of
    ``RESUME_OVERRIDABLE`` (when to stop, how often to save, threads, the evaluation GIFs and
    the GIFs' frame rate, the device and CUDA graphs) may be changed on the command line.
    """
    if cfg.resume is None:
        run_dir = new_run_dir(cfg)
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"run_dir {run_dir} is a file; run_dir takes a directory")
        if run_dir_in_use(run_dir):  # its files are a live run's, not leftovers to delete
            raise UserError(
                f"run_dir {run_dir} is in use by another training process; wait for it to "
                "finish or choose another run_dir"
            )
        if (run_dir / CHECKPOINT_NAME).exists():  # a new run would overwrite it
            raise UserError(
                f"run_dir {run_dir} already holds a run ({CHECKPOINT_NAME}); continue it with "
                f"resume={run_dir}, or choose another run_dir"
            )
        leftovers = [name for name in RUN_FILES if (run_dir / name).exists()]
        if leftovers:  # a run that stopped before its first checkpoint: its logs would mix in
            raise UserError(
                f"run_dir {run_dir} holds an earlier run's {' and '.join(leftovers)} but no "
                f"{CHECKPOINT_NAME} to resume; delete them or choose another run_dir"
            )
        conf = OmegaConf.to_container(cfg, resolve=True)
        conf["run_dir"] = str(run_dir)
        job = hydra_job()
        # check_overrides ran it before Hydra; again here for lines it leaves to Hydra (-cn)
        check_read_settings(conf, [] if job is None else job[2])
        if job is not None:  # the presets chosen, which a resume checks its own against
            from hydra.core.hydra_config import HydraConfig

            conf[CHOICES_KEY] = group_choices(HydraConfig.get().runtime.choices)
        return conf, run_dir, None
    run_dir = run_dir_of(cfg)
    if not run_dir.exists():
        raise UserError(f"cannot resume from {run_dir}: it does not exist")
    if run_dir.is_file():  # a file other than the run's checkpoint
        raise UserError(
            f"resume takes a run directory or the {CHECKPOINT_NAME} in one, got the file {run_dir}"
        )
    if not (run_dir / CHECKPOINT_NAME).exists():
        raise UserError(
            f"cannot resume from {run_dir}: it holds no {CHECKPOINT_NAME} "
            f"(pass the directory of an earlier run, or its {CHECKPOINT_NAME})"
        )
    state = load_checkpoint(run_dir)
    check_contents(state, run_dir / CHECKPOINT_NAME)
    conf = copy.deepcopy(state["run_config"])  # overrides below must not touch the checkpoint's
    fill_legacy_defaults(conf)
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    check_resume_overrides(cfg, overrides, conf)
    # Also inside a dict (loop={total_frames: 600}), which would otherwise pass the check
    # above and be dropped here.
    for key in overridable_given(overrides, RESUME_OVERRIDABLE):
        *parents, name = key.split(".")
        section = conf
        for parent in parents:
            section = section[parent]
        value = OmegaConf.select(cfg, key)
        if key == "threads" and value is None:  # as in a new run: torch's default
            value = 0
        # Checked here, before "nothing to train" compares it with the run's frames.
        if RESUME_OVERRIDABLE[key] is bool:
            if not isinstance(value, bool):
                raise UserError(f"{key} must be true or false, got {value!r}")
        elif RESUME_OVERRIDABLE[key] is not None:
            check_whole_number(key, value, RESUME_OVERRIDABLE[key])
        section[name] = value
    return conf, run_dir, state


def check_resume_overrides(cfg: DictConfig, overrides: list[str], run_conf: dict) -> None:
    """UserError naming the settings a resume's command line would change in the run's
    configuration (:mod:`aefrl.resume_overrides`); the run's own values pass."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    conflicts = command_line_conflicts(
        overrides,
        RESUME_OVERRIDABLE,
        cfg,
        lambda line: compose(hc.job.config_name, overrides=line),
        group_choices(hc.runtime.choices),
        run_conf,
    )
    if conflicts:
        raise UserError(
            f"a resumed run keeps its configuration, which the command line would change: "
            f"{describe(conflicts)}; a resume may change only {', '.join(RESUME_OVERRIDABLE)} "
            "(start a new run for other settings)"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_dir_in_use(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir``'s lock (:func:`lock_run_dir`): it is training
    there, and the files it has written are not an earlier run's leftovers."""
    try:
        with open(run_dir / RUN_LOCK) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released on close
    except BlockingIOError:
        return True
    except (FileNotFoundError, NotADirectoryError):  # no run has held it (or no such dir)
        return False
    except OSError as exc:  # unreadable: "leftovers, delete them" could be a live run's files
        raise UserError(
            f"cannot tell whether run_dir {run_dir} is in use: {run_dir / RUN_LOCK}: "
            f"{exc.strerror} (another user's run?); choose another run_dir"
        ) from None
    return False


def lock_run_dir(run_dir: Path, new_run: bool):
    """Hold an exclusive lock on ``run_dir`` for as long as the returned file stays open (the
    process's lifetime: the kernel drops it when the process dies, so no lock goes stale).

    Two runs started in the same second get the same default ``run_dir``; both passed the
    checks of :func:`run_configuration` before either wrote, and one would overwrite the other.
    The second now stops here; a new run also re-checks the directory under the lock.
    """
    try:
        handle = open(run_dir / RUN_LOCK, "a")  # noqa: SIM115 (kept open: it holds the lock)
    except OSError as exc:  # a read-only directory (or mount)
        raise UserError(
            f"cannot write in run_dir {run_dir}: {run_dir / RUN_LOCK}: {exc.strerror}"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if not isinstance(exc, BlockingIOError):  # no locks here (NFS without lockd, ...)
            raise UserError(
                f"cannot lock run_dir {run_dir} ({run_dir / RUN_LOCK}): {exc.strerror}"
            ) from None
        if not new_run:  # a resume: the process training this run is still at it
            raise UserError(
                f"cannot resume {run_dir}: another training process is running it; wait for "
                "it to finish (or stop it with Ctrl-C, which saves a checkpoint)"
            ) from None
        raise UserError(
            f"run_dir {run_dir} is in use by another training process (started there, or "
            "started in the same second with the same default run_dir); wait for it to finish "
            "or choose another run_dir"
        ) from None
    if new_run and any((run_dir / n).exists() for n in (CHECKPOINT_NAME, RUN_CONFIG)):
        handle.close()
        raise UserError(
            f"run_dir {run_dir} was taken by another run that started at the same time; "
            "choose another run_dir"
        )
    return handle


def discard_unstarted_run(run_dir: Path) -> None:
    """Remove what a new run left in ``run_dir`` if it stopped before its first checkpoint:
    nothing there can be resumed, and the leftovers would make the same command refuse the
    directory."""
    if (run_dir / CHECKPOINT_NAME).exists():
        return
    removed = [n for n in RUN_FILES if (run_dir / n).exists()]
    for name in removed:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (run_dir / RUN_LOCK).unlink(missing_ok=True)
    if removed:
        print(
            f"removed {', '.join(removed)} from {run_dir}: the run stopped before its first "
            "checkpoint, so the same command starts it again",
            file=sys.stderr,
        )


def train(cfg: DictConfig) -> tuple[dict, int | None]:
    """Train; returns the final counters and the signal that stopped the run early (None when it
    reached ``loop.total_frames``)."""
    run_dir = new_run_dir(cfg) if cfg.resume is None else None
    try:
        return setup_and_run(cfg)
    except BaseException as exc:  # a crash or Ctrl-C in setup or in the loop
        # Only what this process wrote: a run_dir it does not hold is another run's (or an
        # earlier one's, which the error asks the user to deal with).
        if cfg.resume is None and run_dir in _HELD_LOCKS:
            counters = _COUNTERS.get(run_dir)
            if counters and counters["iterations"] and not isinstance(exc, KeyboardInterrupt):
                keep_crash_logs(run_dir)
            else:
                discard_unstarted_run(run_dir)
        raise
    finally:
        _COUNTERS.clear()  # a Hydra -m sweep runs its jobs one after another in this process


def keep_crash_logs(run_dir: Path) -> None:
    """A new run that crashed in its loop before its first checkpoint: its TensorBoard logs
    and records explain the crash, so they stay; a disk replay, useless without a checkpoint
    and possibly gigabytes, goes."""
    if (run_dir / CHECKPOINT_NAME).exists():
        return
    if (run_dir / "replay").is_dir():
        shutil.rmtree(run_dir / "replay")
    print(
        f"the run crashed before its first checkpoint; its logs stay in {run_dir} (nothing "
        "there can be resumed: start again with another run_dir, or delete this one)",
        file=sys.stderr,
    )


class NothingToTrain(Exception):  # noqa: N818 (a way out of setup, not an error)
    """A resume whose run already reached ``loop.total_frames``; carries its counters."""


def setup_and_run(cfg: DictConfig) -> tuple[dict, int | None]:
    try:  # every ValueError of the setup is a bad configuration; one in training is a bug
        trainer, env, run_dir, resumed = build_run(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    except NothingToTrain as done:
        return done.args[0], None
    if _SETUP_SIGNAL["signum"] is not None:  # its exception was dropped inside setup
        trainer.logger.close()
        env.close()
        raise _interrupt(_SETUP_SIGNAL["signum"])
    if resumed:
        print(f"resumed {run_dir} at {trainer.counters['frames']} frames")
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})")

    def stop_if_signalled(trainer: Trainer) -> None:  # one that came after the check above,
        # before the loop's own handler, and was dropped too: the loop stops as on Ctrl-C
        if _SETUP_SIGNAL["signum"] is not None and trainer.stop_signal is None:
            trainer.request_stop(_SETUP_SIGNAL["signum"])

    try:
        counters = trainer.run(on_iteration=stop_if_signalled)
    finally:
        trainer.logger.close()
        env.close()
    # The final evaluation comes after the final checkpoint, so these may count one more.
    print(f"checkpoint {run_dir / CHECKPOINT_NAME}; counters at exit: {counters}")
    if trainer.stop_signal is not None:  # None for a run that reached loop.total_frames
        name = signal.Signals(trainer.stop_signal).name
        print(f"stopped by {name} before loop.total_frames; resume={run_dir} continues the run")
    return counters, trainer.stop_signal


#: Settings that reach their consumers through int(): refused unless whole.
WHOLE_NUMBERS = (
    ("replay", "batch_size"),
    ("replay", "seq_len"),
    ("replay", "capacity"),
    ("logger", "log_every"),
    ("env", "action_repeat"),
    ("env", "num_envs"),
)


def check_trains(loop: LoopConfig, num_envs: int, updates_done: int = 0) -> None:
    """Refuse a run that would end before its first update (it would log and evaluate an
    untrained agent and exit 0): the prefill, the first full window of every env's stream or
    a train ratio too low for the run's length. A resumed run that has updated may stop
    anywhere (``updates_done`` > 0); one stopped in its prefill is checked like a new one."""
    if updates_done:
        return
    steps = loop.total_frames // loop.action_repeat  # agent steps, all envs together
    ready = num_envs * loop.seq_len  # the replay samples once every stream holds a window
    frames = f"loop.total_frames={loop.total_frames} ({steps} agent steps at action repeat "
    frames += f"{loop.action_repeat})"
    never = "the run would end before its first update"
    if steps <= loop.prefill_steps:
        raise UserError(
            f"loop.prefill_steps={loop.prefill_steps} random steps fill the whole run, "
            f"{frames}: {never}; raise loop.total_frames or lower loop.prefill_steps"
        )
    if steps <= ready:
        raise UserError(
            f"replay.seq_len={loop.seq_len} needs that many agent steps in each of the "
            f"{num_envs} env stream(s) before the first batch, {ready} in all, and the run has "
            f"{frames}: {never}; raise loop.total_frames or lower replay.seq_len"
        )
    per_step = loop.train_ratio / (loop.batch_size * loop.seq_len)
    updates = (steps - max(loop.prefill_steps, ready)) * per_step
    if updates < 1:
        raise UserError(
            f"loop.train_ratio={loop.train_ratio} makes {per_step:.3g} updates per agent step "
            f"(replay.batch_size x replay.seq_len = {loop.batch_size * loop.seq_len} replayed "
            f"steps each), {updates:.2f} over the {frames}: {never}; raise loop.train_ratio or "
            "loop.total_frames"
        )


def check_replay_fits(storage: str, replay_bytes: int, capacity: int, device) -> None:
    """Refuse an in-memory replay larger than the memory that would hold it (the allocation
    would fail at the first row, after the run's files were written); disk files are sparse.
    ``replay_bytes``: its rows' pixels (and stored contexts)."""
    if storage == "memory":
        where, total = device_memory(torch.device("cpu"))
    elif storage == "device":
        where, total = device_memory(device)
    else:
        return
    if replay_bytes > total:
        raise UserError(
            f"replay.capacity={capacity} needs {replay_bytes / 2**30:.0f} GiB of {where} for its "
            f"rows, more than the {total / 2**30:.0f} GiB there; lower replay.capacity or use "
            "replay.storage=disk"
        )


_task_action_dim = functools.lru_cache(task_action_dim)  # once per task in a sweep's checks


class CheckedSettings(NamedTuple):
    """What :func:`check_settings` worked out of a run's configuration."""

    seed: int
    threads: int  # 0: torch's default
    device: torch.device
    image_size: int
    loop: LoopConfig
    storage: str  # replay.storage with auto decided
    agent: torch.nn.Module  # built on the meta device: its parameters' shapes, no memory


def check_settings(conf: dict, updates_done: int = 0) -> CheckedSettings:
    """Every check of a run's configuration ``conf`` (resolved) that needs no environment, no
    files and no memory; a :class:`UserError` or ValueError names the key. :func:`build_run`
    runs it first, and :func:`check_job` before Hydra for every job of a ``-m`` sweep, where a
    bad value in a later job (an unknown task, γ > 1, a run too short to update) stopped the
    sweep only after the jobs before it had trained. ``updates_done``: a resumed run's."""
    for key, value in non_finite_keys(conf):
        raise UserError(f"{key} must be a finite number, got {value}")
    threads = conf["threads"] or 0  # 0 and null: torch's default
    check_whole_number("threads", threads, 0)
    seed = conf["seed"]
    if isinstance(seed, bool) or seed != int(seed) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be a whole number in [0, 2**32 - 1], got {seed}")
    device = resolve_device(conf["device"])
    loop = dict(conf["loop"])  # runs from before loop.cuda_graph existed resume with "auto"
    cuda_graph = resolve_cuda_graph(loop.pop("cuda_graph", "auto"), device)
    try:  # the conv trunks halve the image down to 4 pixels: refuse other sides before the env
        conv_stages(conf["env"]["image_size"], conf["env"]["image_size"])
    except (TypeError, ValueError):
        raise UserError(
            "env.image_size must be 4 times a power of two (8, 16, 32, 64, 128, ...), got "
            f"{conf['env']['image_size']}"
        ) from None
    for section, key in WHOLE_NUMBERS:  # ranges are checked where the values are used
        check_whole_number(f"{section}.{key}", conf[section][key])
    check_run_env(conf["env"])  # the task, the renderer, num_envs, ...
    size = int(conf["env"]["image_size"])
    action_dim = _task_action_dim(conf["env"]["task"])
    agent = check_networks(conf, (3, size, size), action_dim, device)
    rep = conf["replay"]
    try:
        loop_conf = LoopConfig(
            **loop,
            **cuda_graph,
            action_repeat=int(conf["env"]["action_repeat"]),
            batch_size=int(rep["batch_size"]),
            seq_len=int(rep["seq_len"]),
            log_every=int(conf["logger"]["log_every"]),
            video_fps=float(conf["logger"]["video_fps"]),
            eval_video=conf["logger"].get("eval_video", True),  # runs from before it: on
        )
    except ValueError as exc:  # "name must ...": name the configuration key instead
        name, _, rest = str(exc).partition(" ")
        raise UserError(f"{LOOP_FIELD_KEYS.get(name, f'loop.{name}')} {rest}") from None
    num_envs, capacity = int(conf["env"]["num_envs"]), int(rep["capacity"])
    try:  # the replay's own checks, in the configuration's words
        check_replay_sizes(capacity, num_envs, int(rep["seq_len"]), int(rep["batch_size"]))
    except ValueError as exc:
        raise UserError(name_keys(str(exc), replay_sections(conf))) from None
    check_trains(loop_conf, num_envs, updates_done)
    storage = rep["storage"]
    if storage not in ("auto", *STORAGES):
        accepted = ", ".join(("auto", *STORAGES))
        raise UserError(f"replay.storage must be one of {accepted}, got {storage!r}")
    row_bytes = 3 * size * size  # the pixels dominate a row
    if getattr(agent, "replay_context", False):  # and its context: float32 h and z
        row_bytes += 4 * (agent.world_model.rssm.deter + agent.world_model.rssm.latent_dim)
    replay_bytes = capacity * row_bytes
    if storage == "auto":
        storage = "disk" if replay_bytes > 2**31 else "memory"
    check_replay_fits(storage, replay_bytes, capacity, device)
    return CheckedSettings(int(seed), int(threads), device, size, loop_conf, storage, agent)


def check_networks(
    conf: dict, obs_shape: tuple, action_dim: int, device: torch.device
) -> torch.nn.Module:
    """Build the run's agent on the meta device (no memory, milliseconds) and return it: its
    ValueErrors name a wrong setting, and networks whose weights, gradients and Adam's two
    moments alone exceed the device's memory are refused (building them for real was not an
    allocation error but the kernel's out-of-memory kill, exit 137, once the weights were
    initialised)."""
    with torch.device("meta"):
        agent = build_agent(conf["agent"], conf["obs_model"], obs_shape, action_dim)
    tensors = [*agent.parameters(), *agent.buffers()]
    need = 4 * sum(t.numel() * t.element_size() for t in tensors)
    where, total = device_memory(device)
    if need > total:
        count = sum(p.numel() for p in agent.parameters())
        raise UserError(
            f"the agent's networks do not fit in {where} at these sizes: {count:,} parameters, "
            f"{need / 2**30:,.1f} GiB with their gradients and optimiser states, more than the "
            f"{total / 2**30:.0f} GiB there; lower {network_sizes(conf)}"
        )
    return agent


def check_weights(agent: torch.nn.Module, saved: dict, path: Path) -> None:
    """Refuse a checkpoint whose weights (``saved``: its ``agent`` entry) do not have the shapes
    of the networks its own run configuration builds (``agent``, e.g. the meta-device one of
    :func:`check_settings`): a checkpoint edited or copied in from another run failed deep in
    ``load_state_dict`` with a traceback, after the run had appended its records and logs."""
    modules = saved.get("modules") if isinstance(saved, dict) else None
    modules = modules if isinstance(modules, dict) else {}
    expected = agent.state_dict()["modules"]
    aliases = shared_entries(agent)  # checkpoints from before listed them too
    wrong = [
        f"{key} is there, and not in the configured model"
        for key in modules
        if key not in expected and key not in aliases
    ]
    # an alias's stored tensor is loaded as it is (agents/base.py): its shape matters as well
    checked = {**expected, **{a: expected[n] for a, n in aliases.items() if a in modules}}
    for key, tensor in checked.items():
        found = modules.get(key)
        if not isinstance(found, torch.Tensor) or found.shape != tensor.shape:
            there = "missing" if found is None else "not a tensor"
            if isinstance(found, torch.Tensor):
                there = f"{tuple(found.shape)}"
            wrong.append(f"{key} is {there} there, {tuple(tensor.shape)} in the configured model")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{path} does not hold the networks of its own run configuration: {wrong[0]}{more}; "
            "it was written by another run, edited, or by an aefrl version with other networks"
        )


def replay_sections(conf: dict) -> dict:
    """The configuration sections :class:`SequenceReplay`'s arguments come from (``name_keys``
    turns ``capacity`` into ``replay.capacity``, ``num_envs`` into ``env.num_envs``)."""
    return {"replay": conf["replay"], "env": {"num_envs": conf["env"]["num_envs"]}}


def network_sizes(conf: dict) -> str:
    """The settings that size the run's agent's networks (those of the sections it reads)."""
    ignored = IGNORED[conf["agent"]["name"]]  # the planner has no actor-critic
    sizes = [f"agent.{k}" for k in ("world_model", "actor", "critic") if k not in ignored]
    return ", ".join(sizes) + " or obs_model.latent_dim"


def check_disk_replay(storage: str, replay_state: dict, run_dir: Path) -> None:
    """A resumed run's disk replay lives in ``run_dir/replay``, not in its checkpoint: refuse,
    before anything is written, a run directory copied or moved without it (the replay found
    out only after the run had appended its records and opened a new log)."""
    if storage != "disk" or int(replay_state.get("steps", 0)) == 0:
        return
    if not any((run_dir / "replay").glob("*.memmap")):
        raise UserError(
            f"cannot resume {run_dir}: its replay (replay.storage=disk) is kept in "
            f"{run_dir / 'replay'}, not in {CHECKPOINT_NAME}, and is missing there; copy the "
            "run's replay folder back with it"
        )


def device_memory(device: torch.device) -> tuple[str, int]:
    """``(what to call it, bytes)`` of the memory tensors on ``device`` live in."""
    if device.type == "cuda":
        return f"{device} memory", torch.cuda.get_device_properties(device).total_memory
    return "RAM", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_run(cfg: DictConfig) -> tuple[Trainer, object, Path, bool]:
    """The trainer (restored when resuming), its env, run directory and whether it resumed."""
    conf, run_dir, resume_state = run_configuration(cfg)
    if resume_state is not None:  # checked before anything is written (logs, records, files)
        frames, total = resume_state["counters"]["frames"], conf["loop"]["total_frames"]
        if frames >= total and final_evaluation_pending(resume_state, run_dir):
            print(f"{run_dir} stopped during its final evaluation at {frames} frames; making it")
        elif frames >= total:
            print(
                f"nothing to train: {run_dir} is at {frames} frames >= loop.total_frames={total}; "
                "raise it to continue (nothing was written)"
            )
            raise NothingToTrain(dict(resume_state["counters"]))
    updates_done = 0 if resume_state is None else resume_state["counters"]["updates"]
    try:
        checked = check_settings(conf, updates_done)
    except (UserError, ValueError) as exc:
        if resume_state is None:
            raise
        raise UserError(resume_hint(str(exc))) from None
    if resume_state is not None:  # before anything is written
        check_weights(checked.agent, resume_state["agent"], run_dir / CHECKPOINT_NAME)
        check_disk_replay(checked.storage, resume_state["replay"], run_dir)
    if checked.threads:
        torch.set_num_threads(checked.threads)
    tune_malloc()  # CPU updates otherwise re-fault their working set every time (allocator.py)
    seed, device, size = checked.seed, checked.device, checked.image_size
    seed_everything(seed)
    env = make_run_env(conf["env"], stream_seed(seed, "env"))
    action_dim = int(env.action_spec.shape[-1])
    try:
        agent = build_agent(conf["agent"], conf["obs_model"], (3, size, size), action_dim)
        agent = agent.to(device)
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # the CPU allocator's is a RuntimeError
        if not isinstance(exc, torch.OutOfMemoryError) and "allocate" not in str(exc):
            raise
        env.close()
        raise UserError(
            f"the agent's networks do not fit in {device} memory at these sizes: lower "
            f"{network_sizes(conf)}"
        ) from None
    rep, storage, loop_conf = conf["replay"], checked.storage, checked.loop
    # Everything above validates the configuration; only now does the run leave files (a bad
    # input must not leave a run_config.yaml that makes the corrected command refuse the dir),
    # its directory and lock first: a disk replay creates its folder, which must be a file of
    # the run that holds the directory (check_settings has checked the replay's sizes).
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create run_dir {run_dir}: {exc.strerror}") from None
    _HELD_LOCKS[run_dir] = lock_run_dir(run_dir, new_run=resume_state is None)
    try:
        replay = SequenceReplay(
            int(rep["capacity"]),
            int(conf["env"]["num_envs"]),
            int(rep["seq_len"]),
            int(rep["batch_size"]),
            storage=storage,
            path=run_dir / "replay" if storage == "disk" else None,
            device=device,
            seed=stream_seed(seed, "replay"),  # not the prefill generator's stream
        )
    except ValueError as exc:  # "storage must be ...": name the configuration keys
        raise UserError(name_keys(str(exc), replay_sections(conf))) from None
    if resume_state is None:  # the Trainer rewrites it with every checkpoint (a resume's
        # changed settings reach it with its first: until then the file is the checkpoint's)
        write_text_atomically(run_dir / RUN_CONFIG, OmegaConf.to_yaml(OmegaConf.create(conf)))
    start = 0 if resume_state is None else int(resume_state["counters"]["frames"])
    append_run_record(run_dir, start, command_line("scripts/train.py"))
    # A resumed run drops what a killed run logged after its checkpoint (it logs it again).
    purge = None if resume_state is None else start + 1
    logger = RunLogger("tb", log_dir=str(run_dir), purge_step=purge)
    trainer = Trainer(
        agent,
        env,
        replay,
        logger,
        run_dir,
        loop_conf,
        make_eval_env=lambda index: make_run_env(
            conf["env"], stream_seed(seed, "eval_env", index), num_envs=1
        ),
        run_config=conf,
        run_config_file=run_dir / RUN_CONFIG,
        device=device,
        seed=seed,
        action_dim=action_dim,
    )
    _COUNTERS[run_dir] = trainer.counters  # updated in place by the loop
    if resume_state is not None:  # changed settings reach the logs with its first checkpoint
        trainer.load(state=resume_state)
    return trainer, env, run_dir, resume_state is not None


def run_cli(cfg: DictConfig) -> int:
    """:func:`train` with the command line's exit codes: 0, 2 for bad input (one sentence), 130
    for a Ctrl-C outside the loop's own handling (during setup, or a second one that aborts),
    143 for a SIGTERM there."""
    try:
        _, stop_signal = train(cfg)
    except (UserError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated) outside the loop
        print(interrupted_message(cfg), file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    return 0 if stop_signal is None else 128 + stop_signal  # the shell's code for that signal


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop's own handler (the checks before Hydra, Hydra's own
    code, setup, between a sweep's jobs): it stops the process as a Ctrl-C does, so a new run
    removes what its setup wrote, where the default action killed it with its run_config.yaml
    and records left behind, and the same command then refused the directory. Exit code 143."""

    signum = signal.SIGTERM


_SETUP_SIGNAL: dict = {"signum": None}  # the last signal _on_signal raised for


def _on_signal(signum, frame) -> None:
    """SIGINT and SIGTERM outside the loop's own handler: raise (KeyboardInterrupt,
    :class:`Terminated`), as Python's default handler does for SIGINT, and remember the signal.
    Python drops an exception raised while it runs certain callbacks (an import lock's, a
    weakref's): about one Ctrl-C in 55 during setup was lost so, and the run trained on.
    :func:`setup_and_run` stops a run whose setup finished after such a signal."""
    _SETUP_SIGNAL["signum"] = signum
    raise _interrupt(signum)


def _interrupt(signum: int) -> KeyboardInterrupt:
    """The exception that stops setup for ``signum``: :class:`Terminated` for SIGTERM."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def interrupted_message(cfg: DictConfig) -> str:
    """What a Ctrl-C outside the loop's own handling leaves: the run's last checkpoint, if it
    has one, or nothing (a new run stopped before its first one removes what it wrote)."""
    run_dir = run_dir_of(cfg)
    if (run_dir / CHECKPOINT_NAME).exists():
        return (  # after a second Ctrl-C, which may have come while that checkpoint was written
            f"interrupted: the run's latest checkpoint, in {run_dir}, is intact "
            f"(resume={run_dir} continues from it)"
        )
    return "interrupted before the run's first checkpoint: nothing was kept (run it again)"


def check_job(composed: DictConfig, overrides: list[str]) -> None:
    """What :func:`aefrl.overrides.check_overrides` asks of each job of a new run before Hydra
    starts the first: the settings it would never read (:func:`check_read_settings`) and
    :func:`check_settings` on its configuration ``composed``; a ValueError names the problem."""
    check_read_settings(composed, overrides)
    conf = OmegaConf.to_container(composed, resolve=True)
    conf.pop("hydra", None)
    try:
        check_settings(conf)
    except UserError as exc:
        raise ValueError(str(exc)) from None


def handle_signals_in_setup() -> None:
    """:func:`_on_signal` for SIGINT and SIGTERM (the loop installs its own while it runs)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    code = run_cli(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    if "--version" in sys.argv[1:]:  # ours, not Hydra's
        print(VERSION)
        sys.exit(0)
    # Hydra reads -m only before the overrides (after them: its usage block); anywhere works.
    sys.argv[1:] = sorted(sys.argv[1:], key=lambda arg: arg not in MULTIRUN_FLAGS)
    handle_signals_in_setup()
    try:  # Hydra's own reports of a bad override are multi-line; ours are one sentence
        check_overrides(CONFIG_DIR, "config", sys.argv[1:], check_job)
    except OverrideError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:  # before Hydra and the run: nothing was written
        print("interrupted while starting: nothing was written", file=sys.stderr)
        sys.exit(128 + getattr(exc, "signum", signal.SIGINT))
    try:
        main()
    except KeyboardInterrupt as exc:  # in Hydra's own code, or between a sweep's jobs
        print("interrupted", file=sys.stderr)
        sys.exit(128 + getattr(exc, "signum", signal.SIGINT))
