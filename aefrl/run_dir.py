"""A training run's directory: what a run keeps there, the lock that keeps a second process
out, the checks before a run starts or resumes there, and the clean-up of a run that stopped
before its first checkpoint.

    run_dir/
      checkpoint.pt        the run's state (aefrl.checkpoint; written to .checkpoint.pt.tmp first)
      run_config.yaml      its resolved configuration
      provenance.jsonl     one record per start: machine, command line (aefrl.provenance)
      .lock                flock'ed while a process trains here
      tb/                  TensorBoard logs
      replay/              the replay's memory-mapped files (replay.storage=disk)

``scripts/train.py`` calls these; every refusal is a :class:`~aefrl.cli.UserError`, one
sentence that names the directory and the way out.
"""

from __future__ import annotations

import fcntl
import shutil
import sys
from pathlib import Path

from aefrl.checkpoint import CHECKPOINT_NAME
from aefrl.cli import RUN_CONFIG, RUN_FOLDERS, RUN_LOCK, UserError
from aefrl.provenance import RUN_RECORDS

LOG_FOLDER, REPLAY_FOLDER = RUN_FOLDERS  # TensorBoard logs, a disk replay's files

#: What a run writes in its directory besides its checkpoint and lock: its configuration, logs,
#: the replay's files (``replay.storage=disk``), records and a checkpoint write cut short. A
#: new run refuses a directory holding any of them; one that stops before its first
#: checkpoint removes them.
RUN_LEFTOVERS = (RUN_CONFIG, LOG_FOLDER, REPLAY_FOLDER, RUN_RECORDS, f".{CHECKPOINT_NAME}.tmp")


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


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse ``run_dir`` for a new run: a file, a directory another process trains in, one
    holding a run (its checkpoint) or an earlier run's leftovers (whose logs would mix in).
    Nothing is written; :func:`lock_run_dir` checks again under the lock."""
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
    leftovers = [name for name in RUN_LEFTOVERS if (run_dir / name).exists()]
    if leftovers:  # a run that stopped before its first checkpoint
        raise UserError(
            f"run_dir {run_dir} holds an earlier run's {' and '.join(leftovers)} but no "
            f"{CHECKPOINT_NAME} to resume; delete them or choose another run_dir"
        )


def check_resume_dir(run_dir: Path) -> None:
    """Refuse ``run_dir`` (``resume=``'s directory) unless it holds a checkpoint to resume."""
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


def lock_run_dir(run_dir: Path, new_run: bool):
    """Hold an exclusive lock on ``run_dir`` for as long as the returned file stays open (the
    process's lifetime: the kernel drops it when the process dies, so no lock goes stale).

    Two runs started in the same second get the same default ``run_dir``; both passed
    :func:`check_new_run_dir` before either wrote, and one would overwrite the other. The
    second now stops here; a new run also re-checks the directory under the lock.
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


def check_disk_replay(storage: str, replay_state: dict, run_dir: Path) -> None:
    """A resumed run's disk replay lives in ``run_dir/replay``, not in its checkpoint: refuse,
    before anything is written, a run directory copied or moved without it (the replay found
    out only after the run had appended its records and opened a new log). ``replay_state``:
    the checkpoint's ``replay`` entry."""
    if storage != "disk" or int(replay_state.get("steps", 0)) == 0:
        return
    if not any((run_dir / REPLAY_FOLDER).glob("*.memmap")):
        raise UserError(
            f"cannot resume {run_dir}: its replay (replay.storage=disk) is kept in "
            f"{run_dir / REPLAY_FOLDER}, not in {CHECKPOINT_NAME}, and is missing there; copy "
            "the run's replay folder back with it"
        )


def discard_unstarted_run(run_dir: Path) -> None:
    """Remove what a new run left in ``run_dir`` if it stopped before its first checkpoint:
    nothing there can be resumed, and the leftovers would make the same command refuse the
    directory."""
    if (run_dir / CHECKPOINT_NAME).exists():
        return
    removed = [n for n in RUN_LEFTOVERS if (run_dir / n).exists()]
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


def keep_crash_logs(run_dir: Path) -> None:
    """A new run that crashed in its loop before its first checkpoint: its TensorBoard logs
    and records explain the crash, so they stay; a disk replay, useless without a checkpoint
    and possibly gigabytes, goes."""
    if (run_dir / CHECKPOINT_NAME).exists():
        return
    if (run_dir / REPLAY_FOLDER).is_dir():
        shutil.rmtree(run_dir / REPLAY_FOLDER)
    print(
        f"the run crashed before its first checkpoint; its logs stay in {run_dir} (nothing "
        "there can be resumed: start again with another run_dir, or delete this one)",
        file=sys.stderr,
    )
