"""MuJoCo's GL backend names and a probe of one, importable before torchrl (stdlib only).

``mujoco`` reads ``MUJOCO_GL`` when it is imported, and importing almost any torchrl sub-package
imports it: a user-set value naming a backend that is unknown or not installed (``osmesa``
without libOSMesa) crashes that import with a traceback, before any of our code runs, and one
that imports but cannot render (``glfw`` without a display) fails at the first frame. The scripts
call :func:`user_backend_problem` first, so that either is one sentence and exit code 2.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Backends tried, in order, when the user has not set MUJOCO_GL (aefrl.envs.gl).
CANDIDATES = ("egl", "osmesa")
# MUJOCO_GL values mujoco accepts on Linux that mean "use GLFW".
GLFW_NAMES = ("glfw", "glx", "enable", "enabled", "on", "true", "1")
# Creating and binding a context is not enough: GLFW without a display "creates" one (a null window,
# only warnings) and mujoco then dies at its first GL call. So the probe also makes the same
# MjrContext as a renderer (framebuffers, textures) and reads a pixel back; about as fast as
# importing mujoco.
_PROBE = """\
import mujoco, mujoco.{0} as b, numpy as np
c = b.GLContext(16, 16)
c.make_current()
m = mujoco.MjModel.from_xml_string(
    "<mujoco><visual><global offwidth='16' offheight='16'/><quality shadowsize='0'/></visual>"
    "</mujoco>"
)
r = mujoco.MjrContext(m, mujoco.mjtFontScale.mjFONTSCALE_50)
mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, r)
mujoco.mjr_readPixels(np.zeros((1, 1, 3), np.uint8), None, mujoco.MjrRect(0, 0, 1, 1), r)
r.free()
c.free()
"""
# Set to a backend once it was probed and works; inherited, so child processes skip the probe.
WORKS = "AEFRL_MUJOCO_GL_WORKS"


def probe(backend: str) -> bool:
    """Whether a fresh python process can render with ``backend``: create and bind a GL context,
    make mujoco's rendering context in it and read a pixel back."""
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
    if probe(chosen):
        return None
    display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if chosen in GLFW_NAMES and not display:
        return (
            f"MUJOCO_GL={chosen} cannot render here: GLFW needs a display and neither DISPLAY nor "
            "WAYLAND_DISPLAY is set; unset MUJOCO_GL and aefrl picks a headless backend that "
            "works (egl, then osmesa), or run with a display"
        )
    return (
        f"MUJOCO_GL={chosen} cannot create an OpenGL context that renders on this machine: "
        "install it, or unset MUJOCO_GL and aefrl picks one that works (egl, then osmesa)"
    )


def exit_if_user_backend_broken() -> None:
    """For scripts, before they import torchrl: print the problem and exit with code 2."""
    problem = user_backend_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
