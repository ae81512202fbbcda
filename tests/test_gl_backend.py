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
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("MUJOCO_GL", "glfw")
    assert "GLFW needs a display" in gl_backend.user_backend_problem()
    monkeypatch.setenv("DISPLAY", ":0")  # a display that does not work: the general sentence
    assert "cannot create an OpenGL context" in gl_backend.user_backend_problem()


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


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_glfw_without_a_display_is_one_sentence(script, tmp_path):
    """GLFW without a display creates a "context" (a null window, warnings only) that fails at the
    first GL call with mujoco.FatalError: the check must render, not only create and bind."""
    env = {**os.environ, "MUJOCO_GL": "glfw"}
    for name in ("DISPLAY", "WAYLAND_DISPLAY", gl_backend.WORKS):
        env.pop(name, None)  # deterministic whether or not this machine has a display
    args = ["exp=smoke", f"run_dir={tmp_path / 'run'}"] if script == "train.py" else [str(tmp_path)]
    out = subprocess.run(
        [sys.executable, f"scripts/{script}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("error: MUJOCO_GL=glfw cannot render here: GLFW needs a display")
    assert "unset MUJOCO_GL" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_probe_accepts_a_backend_that_renders(monkeypatch):
    """The probe is a real render: it must still pass where a headless backend works (else aefrl
    would reject every backend)."""
    monkeypatch.delenv(gl_backend.WORKS, raising=False)  # probe() sets it; restored afterwards
    works = [backend for backend in gl_backend.CANDIDATES if gl_backend.probe(backend)]
    if not works:
        pytest.skip("no headless OpenGL backend (EGL or OSMesa) on this machine")
    assert os.environ[gl_backend.WORKS] == works[-1]
