"""A user-set MUJOCO_GL that cannot work is one sentence before torchrl's import crashes on it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aefrl import gl_backend

ROOT = Path(__file__).resolve().parents[1]


def test_user_backend_problem(monkeypatch):
    monkeypatch.delenv(gl_backend.WORKS, raising=False)
    monkeypatch.setattr(gl_backend, "probe", lambda backend: backend == "egl")
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    assert gl_backend.user_backend_problem() is None  # unset: aefrl.envs.gl chooses
    monkeypatch.setenv("MUJOCO_GL", "EGL")
    assert gl_backend.user_backend_problem() is None
    monkeypatch.setenv("MUJOCO_GL", "foo")
    assert "MUJOCO_GL=foo is not a MuJoCo rendering backend" in gl_backend.user_backend_problem()
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    assert "cannot create an OpenGL context" in gl_backend.user_backend_problem()
    monkeypatch.setenv(gl_backend.WORKS, "osmesa")  # probed before (e.g. by a parent process)
    assert gl_backend.user_backend_problem() is None


@pytest.mark.parametrize("script", ["train.py", "eval.py", "world_model_report.py"])
def test_scripts_say_so_in_one_sentence(script):
    """mujoco raises deep inside `import torchrl` (a RuntimeError, or an AttributeError from
    PyOpenGL for a backend that is not installed); the scripts check first."""
    env = {**os.environ, "MUJOCO_GL": "foo"}
    env.pop(gl_backend.WORKS, None)
    out = subprocess.run(
        [sys.executable, f"scripts/{script}", "/nonexistent"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: MUJOCO_GL=foo is not a MuJoCo rendering backend")
    assert len(out.stderr.strip().splitlines()) == 1
