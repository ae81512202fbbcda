"""What the command-line scripts share: bad input as one sentence (exit code 2), not a traceback.

``scripts/train.py``, ``scripts/eval.py``, ``scripts/world_model_report.py`` and
``scripts/bench.py`` raise :class:`UserError` for a problem the user can fix and print it as
``error: <sentence>`` (the argparse-only scripts say theirs through ``aefrl.arguments.Parser``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from aefrl.checkpoint import CHECKPOINT_NAME
from aefrl.devices import usable_device
from aefrl.envs import make_dmc_env
from aefrl.envs.dmc import check_env_args
from aefrl.provenance import RUN_RECORDS


class UserError(Exception):
    """A problem the user can fix; printed as one sentence, exit code 2."""


def resolve_device(name: str, option: str = "device=") -> torch.device:
    """``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``; ``option`` names the
    setting in the message (``device=`` for Hydra, ``--device `` for argparse). A
    :class:`UserError` when this machine cannot use it (:func:`aefrl.devices.usable_device`)."""
    try:
        return usable_device(name, option)
    except ValueError as exc:
        raise UserError(str(exc)) from None


# make_dmc_env's arguments that come from the configuration's env section (seed is the run's
# own key; the scripts' --seed and --render are checked by argparse).
ENV_KEYS = ("task", "image_size", "action_repeat", "render", "num_envs", "time_limit")


def make_env(task: str, **kwargs):
    """:func:`~aefrl.envs.make_dmc_env`, with a missing rendering backend as a :class:`UserError`
    (the env's argument errors are ``ValueError``s with one-sentence messages already; one that
    names an argument names its configuration key here: ``env.render must be one of ...``)."""
    try:
        return make_dmc_env(task, **kwargs)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:
        raise _env_setting_error(exc) from None


def check_run_env(env: dict) -> None:
    """:func:`make_run_env`'s checks of a run's ``env`` configuration, building nothing (a
    sweep checks every job's before the first one starts): a :class:`UserError` naming the
    key."""
    try:
        check_env_args(**env)
    except ValueError as exc:
        raise _env_setting_error(exc) from None


def _env_setting_error(exc: ValueError) -> UserError:
    """The env's one-sentence argument error, naming the configuration key (``env.render``)."""
    message = str(exc)
    if message.split(" ", 1)[0] in ENV_KEYS:
        message = f"env.{message}"
    return UserError(message)


def make_run_env(env: dict, seed: int, num_envs: int | None = None, render: str | None = None):
    """:func:`make_env` for a run's ``env`` configuration: its own number of environments
    unless ``num_envs`` is given (evaluation takes one), its renderer unless ``render`` is."""
    kwargs = {k: v for k, v in env.items() if k not in ("task", "num_envs")}
    if render is not None:
        kwargs["render"] = render
    return make_env(env["task"], seed=seed, num_envs=num_envs or env.get("num_envs", 1), **kwargs)


#: What a training run keeps in its directory, beside what a script writes there.
RUN_CONFIG = "run_config.yaml"
RUN_LOCK = ".lock"  # flock'ed while a process trains in the run directory
#: Written in the run directory as a complete run's final evaluation and report are logged
#: (``aefrl.loop``); a resume reads it to know what is left.
FINAL_EVALUATION = "final_evaluation.json"
RUN_FILES = (CHECKPOINT_NAME, RUN_CONFIG, RUN_RECORDS, RUN_LOCK, FINAL_EVALUATION)
RUN_FOLDERS = ("tb", "replay")  # TensorBoard logs, a disk replay's files (aefrl.run_dir)


def video_fps(conf: dict) -> float:
    """The run's GIF frame rate (``logger.video_fps`` of its stored config ``conf``), as its
    training logs use: the scripts that make GIFs from a checkpoint play them at the same speed."""
    return float((conf.get("logger") or {}).get("video_fps", 15))


def output_path(
    path: str | Path | None, default: Path, run: str | Path | None = None, taken: tuple = ()
) -> Path:
    """Where a script writes its result: ``path`` or ``default``, its folder created and the
    file's writability tried now, before the work (a missing folder, a directory or an
    unwritable place used to fail with a traceback only after all episodes had run). Refused:
    a file of the training run the script reads (``run``: its directory, or a checkpoint file
    in it, whatever its name; ``--out run/checkpoint.pt`` overwrote the checkpoint) and the
    paths in ``taken`` (another output of the same script)."""
    out = Path(path) if path else Path(default)
    if out.is_dir():
        raise UserError(f"cannot write {out}: it is a directory; give a file path")
    target = out.resolve()  # a symlink's target (dangling or not) is what gets written
    if run is not None:
        run = Path(run).resolve()
        owned = {run} if run.is_file() else set()
        run = run.parent if run.is_file() else run
        owned |= {run / name for name in RUN_FILES}
        if target in owned or any(run / f in target.parents for f in RUN_FOLDERS):
            raise UserError(
                f"cannot write {out}: it is the training run's own {target.relative_to(run)}; "
                "give another path"
            )
    if any(target == Path(t).resolve() for t in taken):
        raise UserError(f"cannot write {out}: another output of this command goes there")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            with open(target, "ab"):  # writable, left as it is
                pass
        else:
            with open(target, "xb"):  # creatable; removed again until the result is written
                pass
            target.unlink()
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror}") from None
    return out
