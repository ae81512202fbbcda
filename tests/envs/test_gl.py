"""OffscreenRenderer.close() frees what exists, whatever state a failed or partial open left."""

import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import mujoco
import pytest

from aefrl.envs import gl

ROOT = Path(__file__).resolve().parents[2]


class _FakeGLContext:
    """Stands for mujoco.<backend>.GLContext; records what was done to it."""

    made: ClassVar[list] = []

    def __init__(self, width, height):
        self.calls = []
        _FakeGLContext.made.append(self)

    def make_current(self):
        self.calls.append("make_current")

    def free(self):
        self.calls.append("free")


def _renderer():
    return gl.OffscreenRenderer(mujoco.MjModel.from_xml_string("<mujoco/>"), 16, 0, fast=True)


def test_close_before_any_render_and_twice():
    renderer = _renderer()
    renderer.close()
    renderer.close()
    assert renderer._gl is None and renderer._context is None


def test_close_with_a_gl_context_but_no_mujoco_context():
    """_open made the GL context, then MjrContext failed: close() must free the GL context instead
    of an AttributeError on the missing MjrContext (which used to hide the real error)."""
    renderer = _renderer()
    renderer._gl = context = _FakeGLContext(16, 16)
    renderer.close()
    assert context.calls == ["make_current", "free"]
    assert renderer._gl is None and renderer._context is None
    renderer.close()  # already freed: nothing to do
    assert context.calls == ["make_current", "free"]


def test_close_of_an_object_whose_init_never_ran():
    gl.OffscreenRenderer.__new__(gl.OffscreenRenderer).close()


def test_failed_open_raises_the_real_error_and_frees_the_context(monkeypatch):
    def fail(*args, **kwargs):
        raise mujoco.FatalError("an OpenGL platform library has not been loaded")

    monkeypatch.setenv("MUJOCO_GL", "glfw")
    monkeypatch.setattr(gl, "_context_class", lambda backend: _FakeGLContext)
    monkeypatch.setattr(mujoco, "MjrContext", fail)
    _FakeGLContext.made.clear()
    renderer = _renderer()
    data = mujoco.MjData(renderer._model)
    with pytest.raises(mujoco.FatalError, match="platform library"):
        renderer.render(data)
    (context,) = _FakeGLContext.made
    assert context.calls[-1] == "free" and renderer._gl is None
    renderer.close()  # e.g. env.close() while the error propagates
    with pytest.raises(mujoco.FatalError):  # and a retry opens afresh, failing the same way
        renderer.render(data)
    assert len(_FakeGLContext.made) == 2


_GLFW_RENDER = """
import mujoco
from aefrl.envs.gl import OffscreenRenderer

renderer = OffscreenRenderer(mujoco.MjModel.from_xml_string("<mujoco/>"), 16, 0, fast=True)
try:
    renderer.render(mujoco.MjData(renderer._model))
except (mujoco.FatalError, RuntimeError) as error:
    print(type(error).__name__)
renderer.close()
print("closed")
"""


def test_glfw_without_a_display_fails_at_render_and_closes_cleanly():
    """The audit's case, for real: GLFW without a display (removed from the environment)."""
    env = {**os.environ, "MUJOCO_GL": "glfw"}
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    out = subprocess.run(
        [sys.executable, "-c", _GLFW_RENDER],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    # The render failed (with mujoco's or our error, not a crash), and close still ran.
    assert out.stdout.split()[-2:] in (["FatalError", "closed"], ["RuntimeError", "closed"])
