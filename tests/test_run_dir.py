"""aefrl/run_dir.py: a run directory's checks, lock and clean-up, without a run (the CLI's
own tests drive them through scripts/train.py)."""

import os
import re

import pytest

from aefrl.cli import UserError
from aefrl.run_dir import (
    RUN_LEFTOVERS,
    check_disk_replay,
    check_new_run_dir,
    check_resume_dir,
    discard_unstarted_run,
    keep_crash_logs,
    lock_run_dir,
)


def test_two_processes_cannot_train_in_one_run_dir(tmp_path):
    """Two runs started in the same second share the default run_dir: the second stops with one
    sentence instead of overwriting the first (flock; released when its holder closes or dies)."""
    held = lock_run_dir(tmp_path, new_run=True)
    with pytest.raises(UserError, match="in use by another training process"):
        lock_run_dir(tmp_path, new_run=True)  # another open file: flock conflicts
    with pytest.raises(UserError, match="another training process is running it; wait"):
        lock_run_dir(tmp_path, new_run=False)  # a resume: no other run_dir to choose
    (tmp_path / "run_config.yaml").write_text("seed: 0\n")  # the first run's files
    held.close()
    with pytest.raises(UserError, match="was taken by another run"):
        lock_run_dir(tmp_path, new_run=True)  # it got in first, and finished
    lock_run_dir(tmp_path, new_run=False).close()  # a resume of it may take the dir


def test_a_read_only_run_dir_is_one_sentence(tmp_path):
    """Opening the lock file in a read-only run_dir was an OSError traceback, exit 1."""
    tmp_path.chmod(0o555)
    try:
        if os.access(tmp_path, os.W_OK):  # root ignores the mode bits: a file in its place
            tmp_path.chmod(0o755)
            (tmp_path / ".lock").mkdir()  # open(..., "a") on a directory fails the same way
        message = re.escape(f"cannot write in run_dir {tmp_path}: ")
        with pytest.raises(UserError, match=message):
            lock_run_dir(tmp_path, new_run=False)
    finally:
        tmp_path.chmod(0o755)


def test_a_resume_without_its_disk_replay_is_refused_before_anything_is_written(tmp_path):
    """A run directory copied without its multi-GB replay/ folder: the replay found out only
    after the resume had appended its provenance record and opened a new event file, in words
    meant for the Python API ("pass that directory as path")."""
    state = {"steps": 120}
    with pytest.raises(UserError, match=r"its replay \(replay.storage=disk\) is kept in"):
        check_disk_replay("disk", state, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written
    (tmp_path / "replay").mkdir()
    (tmp_path / "replay" / "pixels.memmap").write_bytes(b"")
    check_disk_replay("disk", state, tmp_path)
    check_disk_replay("memory", state, tmp_path / "elsewhere")  # in the checkpoint
    check_disk_replay("disk", {"steps": 0}, tmp_path / "elsewhere")  # nothing stored yet


def _leftovers(run_dir):
    """Every name in RUN_LEFTOVERS written in ``run_dir``, the folders with a file inside."""
    for name in RUN_LEFTOVERS:
        if "." in name:
            (run_dir / name).write_text("x")
        else:
            (run_dir / name).mkdir()
            (run_dir / name / "inside").write_text("x")


def test_a_new_run_dir_is_refused_for_each_kind_of_earlier_content(tmp_path):
    check_new_run_dir(tmp_path / "new")  # does not exist yet: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    check_new_run_dir(tmp_path)  # empty: fine
    (tmp_path / "notes.txt").write_text("mine")  # a file of the user's is no run's
    check_new_run_dir(tmp_path)
    with pytest.raises(UserError, match="is a file; run_dir takes a directory"):
        check_new_run_dir(tmp_path / "notes.txt")
    for name in RUN_LEFTOVERS:  # each leftover alone is refused, and named
        run_dir = tmp_path / f"with{name.replace('.', '_')}"
        run_dir.mkdir()
        (run_dir / name).write_text("x")
        with pytest.raises(UserError, match=rf"holds an earlier run's {re.escape(name)} but no"):
            check_new_run_dir(run_dir)
    # A finished run has its logs beside its checkpoint: "delete them" would destroy a run that
    # can be resumed, so the checkpoint is named first.
    _leftovers(tmp_path)
    (tmp_path / "checkpoint.pt").write_text("x")
    with pytest.raises(UserError, match=f"already holds a run .*resume={re.escape(str(tmp_path))}"):
        check_new_run_dir(tmp_path)


def test_a_resume_dir_must_hold_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="it does not exist"):
        check_resume_dir(tmp_path / "gone")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"resume takes a run directory or the checkpoint\.pt"):
        check_resume_dir(tmp_path / "notes.txt")
    with pytest.raises(UserError, match=r"it holds no checkpoint\.pt"):
        check_resume_dir(tmp_path)
    (tmp_path / "checkpoint.pt").write_text("x")
    check_resume_dir(tmp_path)


def test_an_unstarted_run_leaves_only_what_was_there_before(tmp_path, capsys):
    """discard_unstarted_run removes a run's files and its lock, nothing of the user's, and
    leaves a run directory that a new run accepts again."""
    (tmp_path / "notes.txt").write_text("mine")
    lock_run_dir(tmp_path, new_run=True).close()
    _leftovers(tmp_path)
    discard_unstarted_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert "the same command starts it again" in capsys.readouterr().err
    check_new_run_dir(tmp_path)


def test_a_run_with_a_checkpoint_is_never_discarded(tmp_path):
    _leftovers(tmp_path)
    (tmp_path / "checkpoint.pt").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    discard_unstarted_run(tmp_path)
    keep_crash_logs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "replay" / "inside").exists()


def test_a_crashed_run_keeps_its_logs_and_drops_its_replay(tmp_path, capsys):
    _leftovers(tmp_path)
    keep_crash_logs(tmp_path)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted(n for n in RUN_LEFTOVERS if n != "replay")
    assert (tmp_path / "tb" / "inside").exists()
    assert "its logs stay in" in capsys.readouterr().err
