"""Headless OpenGL for MuJoCo: choosing the backend and rendering offscreen frames.

Two facts shape this file:

* ``mujoco`` fixes ``mujoco.Renderer``'s GL backend from ``MUJOCO_GL`` when it is *imported*, and
  importing almost any torchrl sub-package (``torchrl.envs``, ``torchrl.data``, ...) imports
  ``mujoco``. With ``MUJOCO_GL`` unset that backend is GLFW, which cannot open a context on a
  headless machine. :class:`OffscreenRenderer` therefore creates its context from the backend module
  named by :func:`select_gl_backend` (``mujoco.egl`` / ``mujoco.osmesa`` / ``mujoco.glfw``) and then
  makes the same MjvScene / MjrContext calls as ``mujoco.Renderer``, whatever was imported first.
* dm_control remembers which of *its* contexts it made current and skips ``eglMakeCurrent`` when it
  believes it still is; a foreign context made current in between makes ``physics.render`` draw
  into the wrong context. Every GL call here is wrapped in :func:`_keep_current_egl_context`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import weakref

import numpy as np

from aefrl.gl_backend import CANDIDATES as _CANDIDATES
from aefrl.gl_backend import GLFW_NAMES as _GLFW_NAMES
from aefrl.gl_backend import probe as _probe


def select_gl_backend(*, strict: bool = True) -> str | None:
    """Return the MuJoCo GL backend, choosing and caching it in ``os.environ`` when unset.

    A user-set ``MUJOCO_GL`` is respected. Otherwise ``egl`` then ``osmesa`` are probed in a short
    subprocess (so a failing driver cannot break this process) and the first that works is written
    to ``os.environ["MUJOCO_GL"]``, where worker processes inherit it.

    Args:
        strict: raise when no backend works; with ``False`` return ``None`` instead (used at import
            time, so that importing :mod:`aefrl.envs` never fails on a machine without GL).
    """
    chosen = os.environ.get("MUJOCO_GL", "").strip().lower()
    if chosen:
        return chosen
    for backend in _CANDIDATES:
        if _probe(backend):
            os.environ["MUJOCO_GL"] = backend
            return backend
    if strict:
        raise RuntimeError(
            "No headless OpenGL backend works for MuJoCo (tried MUJOCO_GL=egl and "
            "MUJOCO_GL=osmesa): install an EGL driver (libegl1 with Mesa, e.g. "
            "`apt-get install libegl1 libgl1-mesa-dri`) or OSMesa (`apt-get install "
            "libosmesa6`), or set MUJOCO_GL yourself."
        )
    return None


def _context_class(backend: str) -> type:
    """The ``GLContext`` class of mujoco's module for ``backend``."""
    name = "glfw" if backend in _GLFW_NAMES else backend
    if name not in ("egl", "osmesa", "glfw"):
        raise ValueError(f"MUJOCO_GL must be one of egl, osmesa or glfw, got {backend!r}.")
    return importlib.import_module(f"mujoco.{name}").GLContext


def _current_egl_context():
    """The EGL context current on this thread (a falsy handle when none)."""
    from OpenGL import EGL

    return EGL.eglGetCurrentContext()


@contextlib.contextmanager
def _keep_current_egl_context(egl: bool, dying=None):
    """Restore whichever EGL context was current before the block.

    Args:
        egl: whether the block uses EGL; without it this does nothing.
        dying: a context the block destroys; it is not restored even if it was current.
    """
    context = _current_egl_context() if egl else None
    if not context or (dying is not None and context.address == dying.address):
        yield
        return
    from OpenGL import EGL

    display = EGL.eglGetCurrentDisplay()
    draw = EGL.eglGetCurrentSurface(EGL.EGL_DRAW)
    read = EGL.eglGetCurrentSurface(EGL.EGL_READ)
    try:
        yield
    finally:
        EGL.eglMakeCurrent(display, draw, read, context)


# Renderers alive in this process; closed at exit *before* mujoco.egl's own atexit hook terminates
# the EGL display (atexit runs last-registered first), which otherwise prints errors at exit.
_LIVE: weakref.WeakSet[OffscreenRenderer] = weakref.WeakSet()
_atexit_registered = False


def _close_live_renderers() -> None:
    for renderer in list(_LIVE):
        renderer.close()


class OffscreenRenderer:
    """Render one camera of a MuJoCo model to uint8 RGB frames ``[H, W, 3]``, square images.

    The model's visual settings are changed here, at construction, because ``MjrContext`` sizes its
    offscreen buffer and shadow map from them when it is created: offscreen buffer = image size and
    shadow map 256 (same pixels as dm_control's ``physics.render`` at a fraction of the cost, see
    docs/results/collect_cpu.md); ``fast`` also turns off shadows and multisampling. The GL context
    is created lazily by the first :meth:`render`, i.e. inside the process that renders.

    Args:
        model: the ``mujoco.MjModel`` (raw struct, e.g. ``physics.model.ptr``); modified in place.
        image_size: height = width of the frames.
        camera_id: fixed camera index.
        fast: shadows and multisampling off (pixels differ from dm_control's; for tests).
    """

    def __init__(self, model, image_size: int, camera_id: int, *, fast: bool = False) -> None:
        import mujoco

        self._model = model
        self._size = image_size
        self._fast = fast
        model.vis.global_.offwidth = image_size
        model.vis.global_.offheight = image_size
        model.vis.quality.shadowsize = 256
        if fast:
            model.vis.quality.offsamples = 0
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._camera.fixedcamid = camera_id
        self._option = mujoco.MjvOption()
        self._rect = mujoco.MjrRect(0, 0, image_size, image_size)
        self._buffer = np.empty((image_size, image_size, 3), dtype=np.uint8)
        self._gl = self._scene = self._context = None
        self._egl = False  # whether the context is an EGL one (set when it is created)
        self._egl_context = None  # our own EGL handle, once created
        self.num_renders = 0  # counted so tests can check one render per agent step

    def _open(self) -> None:
        global _atexit_registered
        import mujoco

        backend = select_gl_backend()
        self._egl = backend == "egl"
        with _keep_current_egl_context(self._egl):
            try:
                self._gl = _context_class(backend)(self._size, self._size)
                self._gl.make_current()
                self._egl_context = _current_egl_context() if self._egl else None
            except (ImportError, RuntimeError, OSError) as error:
                self._gl = self._egl_context = None  # not usable: the next render() tries again
                raise RuntimeError(
                    f"Could not create a MuJoCo GL context with MUJOCO_GL={backend} ({error}); "
                    "set MUJOCO_GL to a backend that works here (egl or osmesa)."
                ) from error
            try:
                self._scene = mujoco.MjvScene(self._model, maxgeom=10000)
                if self._fast:
                    self._scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
                self._context = mujoco.MjrContext(self._model, mujoco.mjtFontScale.mjFONTSCALE_150)
                mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
            except BaseException:
                # e.g. mujoco.FatalError "an OpenGL platform library has not been loaded": GLFW
                # without a display returns a context that cannot render. Free what was made, so
                # that the next render() opens afresh and close() has nothing left to do; a
                # failure to free must not hide this error.
                with contextlib.suppress(Exception):
                    self.close()  # which forgets the context even if freeing it fails
                raise
        _LIVE.add(self)
        if not _atexit_registered:
            atexit.register(_close_live_renderers)
            _atexit_registered = True

    def render(self, data) -> np.ndarray:
        """Render ``data`` (a ``mujoco.MjData``) and return a read-only view ``[H, W, 3]`` uint8.

        The view is overwritten by the next call; copy it to keep it.
        """
        import mujoco

        if self._gl is None:
            self._open()
        mujoco.mjv_updateScene(
            self._model, data, self._option, None, self._camera, mujoco.mjtCatBit.mjCAT_ALL,
            self._scene,
        )  # fmt: skip
        with _keep_current_egl_context(self._egl):
            self._gl.make_current()
            mujoco.mjr_render(self._rect, self._scene, self._context)
            mujoco.mjr_readPixels(self._buffer, None, self._rect, self._context)
        self.num_renders += 1
        view = self._buffer[::-1]  # OpenGL's first row is the bottom of the image
        view.flags.writeable = False
        return view

    def upload_hfields(self) -> None:
        """Re-send height fields to the GL context after a task changed them (quadruped-escape)."""
        import mujoco

        if self._gl is None or self._model.nhfield == 0:
            return  # a context created later uploads the current data itself
        with _keep_current_egl_context(self._egl):
            self._gl.make_current()
            for hfield_id in range(self._model.nhfield):
                mujoco.mjr_uploadHField(self._model, self._context, hfield_id)

    def close(self) -> None:
        """Free the GL resources; a later :meth:`render` opens a new context.

        Safe to call repeatedly, before any render, and after :meth:`_open` failed half-way (GL
        context made, mujoco's rendering context not): it frees what exists, and nothing else.
        """
        gl, context = getattr(self, "_gl", None), getattr(self, "_context", None)
        try:
            if gl is not None:
                with _keep_current_egl_context(self._egl, dying=self._egl_context):
                    gl.make_current()
                    if context is not None:
                        context.free()
                    gl.free()
        finally:
            self._gl = self._scene = self._context = self._egl_context = None
            _LIVE.discard(self)
