"""Where a number came from: machine, library versions, git commit (for results JSON)."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

# One JSON line per start of a training run (new or resumed) in its run directory, so a
# learning curve can name the machine and command of every stretch it was trained in.
RUN_RECORDS = "provenance.jsonl"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """The short hash of the checkout this package runs from (``-dirty`` with uncommitted
    changes), wherever the command was started; else ``AEFRL_GIT_COMMIT`` from the environment
    (a copy of the tree without its .git, as the device tool's GPU machine gets, whose command
    names the commit), else ``unknown`` (an installed copy)."""
    fallback = os.environ.get("AEFRL_GIT_COMMIT", "unknown")
    package = Path(__file__).resolve().parent  # not the working directory: runs start anywhere

    def git(*args: str) -> str:
        # --no-optional-locks: status would take the index lock, which a commit running at
        # the same time (a run started from a working checkout) then failed to take.
        run = subprocess.run(
            ["git", "--no-optional-locks", *args], capture_output=True, text=True, cwd=package
        )
        if run.returncode != 0:
            raise OSError(run.stderr)
        return run.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != package.parent:
            return fallback  # e.g. site-packages inside some other repository
        return git("rev-parse", "--short", "HEAD") + (
            "-dirty" if git("status", "--porcelain") else ""
        )
    except OSError:  # no git, or not a checkout
        return fallback


def machine_info() -> dict:
    """CPU / GPU, core count, and the versions that matter for our numbers."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": package_version("torch"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git": git_commit(),
    }
    for name in ("torchrl", "tensordict", "mujoco", "dm_control"):
        info[name] = package_version(name)
    return info


# Result keys (module names) whose installed distribution is named differently.
DISTRIBUTIONS = {"dm_control": "dm-control"}


def package_version(module: str) -> str | None:
    """The installed version of ``module``'s distribution (``dm_control`` -> ``dm-control``,
    which has no ``__version__``), else the module's ``__version__``, else ``"unknown"``;
    ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(DISTRIBUTIONS.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except ImportError:
        return None


def command_line(script: str, argv: list[str] | None = None) -> str:
    """How a result was produced: ``OMP_WAIT_POLICY=... python <script> <args>`` (the wait
    policy changes CPU timings, so it is part of the command); ``argv`` defaults to sys.argv's."""
    args = sys.argv[1:] if argv is None else argv
    policy = os.environ.get("OMP_WAIT_POLICY")
    return " ".join([f"OMP_WAIT_POLICY={policy} python {script}", *map(shlex.quote, args)])


def write_result(out: Path, result: dict, markdown: str) -> None:
    """A benchmark's JSON at ``out`` and its markdown next to it (``.md``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)


def append_run_record(run_dir: Path, frames: int, command: str) -> dict:
    """Append this process's start to ``run_dir/provenance.jsonl``: UTC time, the frame count it
    starts from (0 for a new run), the command line and :func:`machine_info`."""
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "frames": int(frames),
        "command": command,
        **machine_info(),
    }
    with open(Path(run_dir) / RUN_RECORDS, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def read_run_records(run_dir: Path) -> list[dict]:
    """The records :func:`append_run_record` left in ``run_dir`` (none for runs from before it
    existed); a line cut short by a kill mid-write is skipped."""
    path = Path(run_dir) / RUN_RECORDS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
