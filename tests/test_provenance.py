"""Run records: one JSON line per start of a training run."""

import importlib.metadata
import subprocess
from pathlib import Path

import pytest

import aefrl
from aefrl.provenance import (
    append_run_record,
    cpu_model,
    git_commit,
    machine_info,
    package_version,
    read_run_records,
)


def test_run_records_append_per_start_and_skip_a_line_cut_by_a_kill(tmp_path):
    assert read_run_records(tmp_path) == []  # runs from before the records existed
    append_run_record(tmp_path, 0, "python scripts/train.py seed=1")
    append_run_record(tmp_path, 5000, "python scripts/train.py resume=x")
    with open(tmp_path / "provenance.jsonl", "a") as f:
        f.write('{"started": "2026-')  # a kill mid-write
    first, resumed = read_run_records(tmp_path)
    assert (first["frames"], resumed["frames"]) == (0, 5000)
    assert resumed["command"] == "python scripts/train.py resume=x"
    assert first["cpu"] == cpu_model() and "torch" in first and "git" in first


def test_versions_come_from_the_installed_distributions():
    """dm_control has no __version__: records and result JSONs said "unknown"."""
    info = machine_info()
    for key, dist in [("dm_control", "dm-control"), ("mujoco", "mujoco"), ("torch", "torch"),
                      ("torchrl", "torchrl"), ("tensordict", "tensordict")]:  # fmt: skip
        assert info[key] == importlib.metadata.version(dist) != "unknown", key
    assert package_version("colorsys") == "unknown"  # importable, no distribution, no __version__
    assert package_version("no_such_module_here") is None


def test_git_commit_is_the_packages_checkout_wherever_the_run_starts(tmp_path, monkeypatch):
    """It asked git about the working directory: "unknown" for a run started outside the
    repository (``python /path/to/scripts/train.py``), or another repository's hash."""
    repo = Path(aefrl.__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
    )
    expected = head.stdout.strip() if head.returncode == 0 else "unknown"  # a wheel: unknown
    monkeypatch.chdir(tmp_path)  # not a repository
    found = git_commit()
    assert found.removesuffix("-dirty") == expected
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)  # another repository
    assert git_commit() == found


def test_a_tree_without_git_takes_the_commit_its_command_names(monkeypatch):
    """The device tool's GPU machine gets the working tree without .git: its command names
    the commit (AEFRL_GIT_COMMIT), which result JSONs then record instead of "unknown"."""
    import aefrl.provenance as provenance

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")  # as subprocess.run raises without the program

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    monkeypatch.delenv("AEFRL_GIT_COMMIT", raising=False)
    with pytest.raises(FileNotFoundError):  # the premise: no git at all
        provenance.subprocess.run(["git"])
    assert provenance.git_commit() == "unknown"
    monkeypatch.setenv("AEFRL_GIT_COMMIT", "abc1234")
    assert provenance.git_commit() == "abc1234"
