"""MuJoCo's GL backend names and a probe of one, importable before torchrl (stdlib only).

``mujoco`` reads ``MUJOCO_GL`` when it is imported, and importing almost any torchrl sub-package
imports it: a user-set value naming a backend that is unknown or not installed (``osmesa``
without libOSMesa) crashes that import with a traceback, before any of our code runs. The
scripts call :func:`user_backend_problem` first, so that this is one sentence and exit code 2.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Backends tried, in order, when the user has not set MUJOCO_GL (aefrl.envs.gl).
CANDIDATES = ("egl", "osmesa")
# MUJOCO_GL values mujoco accepts on Linux that mean "use GLFW".
GLFW_NAMES = ("glfw", "glx", "enable", "enabled", "on", "true", "1")
_PROBE = "import mujoco.{0} as b; c = b.GLContext(16, 16); c.make_current(); c.free()"
# Set to a backend once it was probed and works; inherited, so child processes skip the probe.
WORKS = "AEFRL_MUJOCO_GL_WORKS"


def probe(backend: str) -> bool:
    """Whether a fresh python process can create and bind a ``backend`` GL context."""
    module = "glfw" if backend in GLFW_NAMES else backend
    env = dict(os.environ, MUJOCO_GL=backend)
    env.pop("PYOPENGL_PLATFORM", None)  # mujoco.<backend> sets the matching PyOpenGL platform
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE.format(module)], env=env, capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    if done.returncode == 0:
        os.environ[WORKS] = backend
    return done.returncode == 0


def user_backend_problem() -> str | None:
    """One sentence if the user set ``MUJOCO_GL`` to a backend that cannot work here, else None
    (also when it is unset: then :func:`aefrl.envs.gl.select_gl_backend` chooses)."""
    chosen = os.environ.get("MUJOCO_GL", "").strip().lower()
    if not chosen or os.environ.get(WORKS) == chosen:
        return None
    if chosen not in (*CANDIDATES, *GLFW_NAMES):
        return (
            f"MUJOCO_GL={chosen} is not a MuJoCo rendering backend: use egl or osmesa, or unset "
            "it and aefrl picks one that works"
        )
    if not probe(chosen):
        return (
            f"MUJOCO_GL={chosen} cannot create an OpenGL context on this machine: install it, or "
            "unset MUJOCO_GL and aefrl picks one that works (egl, then osmesa)"
        )
    return None


def exit_if_user_backend_broken() -> None:
    """For scripts, before they import torchrl: print the problem and exit with code 2."""
    problem = user_backend_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
