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

from pathlib import Path

from aefrl.arguments import VERSION
from aefrl.overrides import MULTIRUN_FLAGS, OverrideError, check_overrides

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def check_command_line(check_job=None) -> None:
    """:func:`aefrl.overrides.check_overrides` on this process's command line, with
    ``check_job`` for each job of a new run; a refusal is one sentence and exit code 2 (Hydra's
    own reports of a bad override are multi-line)."""
    try:
        check_overrides(CONFIG_DIR, "config", sys.argv[1:], check_job)
    except OverrideError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if "--version" in sys.argv[1:]:  # ours, not Hydra's
        print(VERSION)
        sys.exit(0)
    # Hydra reads -m only before the overrides (after them: its usage block); anywhere works.
    sys.argv[1:] = sorted(sys.argv[1:], key=lambda arg: arg not in MULTIRUN_FLAGS)
    # A single run's settings, names and kinds, before the ~4 s of importing torch, torchrl and
    # dm-control, so that a mistyped key is refused at once; the values' checks (check_job)
    # need those imports. A -m sweep's jobs are checked once, after them (~0.08 s a job).
    if not any(arg in MULTIRUN_FLAGS for arg in sys.argv[1:]):
        check_command_line()

import copy
import json
import random

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from aefrl.allocator import tune_malloc
from aefrl.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_contents,
    load_checkpoint,
    write_text_atomically,
)
from aefrl.cli import RUN_CONFIG, UserError, make_run_env
from aefrl.logging import RunLogger
from aefrl.loop import Trainer, final_evaluation_pending
from aefrl.provenance import append_run_record, command_line
from aefrl.replay import SequenceReplay
from aefrl.resume_overrides import (
    CHOICES_KEY,
    command_line_conflicts,
    describe,
    group_choices,
    overridable_given,
)
from aefrl.run_dir import (
    LOG_FOLDER,
    REPLAY_FOLDER,
    check_disk_replay,
    check_new_run_dir,
    check_resume_dir,
    discard_unstarted_run,
    keep_crash_logs,
    lock_run_dir,
)
from aefrl.seeding import stream_seed
from agents.factory import build_agent, check_read_settings, name_keys
from agents.run_settings import (
    check_settings,
    check_weights,
    check_whole_number,
    network_sizes,
    replay_sections,
)

imports_done()  # KeyboardInterrupt again

_HELD_LOCKS: dict = {}  # run_dir -> its open lock file; closing it (or exiting) releases it
_COUNTERS: dict = {}  # run_dir -> its Trainer's counters, once built (did its loop run?)

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
        check_new_run_dir(run_dir)
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
    check_resume_dir(run_dir)
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
            path=run_dir / REPLAY_FOLDER if storage == "disk" else None,
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
    logger = RunLogger(LOG_FOLDER, log_dir=str(run_dir), purge_step=purge)
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
    handle_signals_in_setup()
    try:
        check_command_line(check_job)
    except KeyboardInterrupt as exc:  # before Hydra and the run: nothing was written
        print("interrupted while starting: nothing was written", file=sys.stderr)
        sys.exit(128 + getattr(exc, "signum", signal.SIGINT))
    try:
        main()
    except KeyboardInterrupt as exc:  # in Hydra's own code, or between a sweep's jobs
        print("interrupted", file=sys.stderr)
        sys.exit(128 + getattr(exc, "signum", signal.SIGINT))
