"""Ctrl-C (or SIGTERM) while a script is still importing (stdlib only, importable before torch).

The imports take seconds (torch, torchrl, mujoco); a Ctrl-C among them surfaced as a
``KeyboardInterrupt`` (or an ``ImportError`` from inside mujoco) traceback of dozens of frames,
and a SIGTERM killed the process without a word. Nothing has been written by then, so the
scripts leave at once with one line and the shell's code for the signal (130, 143).

The handlers are installed even in a process started with Ctrl-C ignored (a background job of
a non-interactive shell): a Ctrl-C then stops the training runs of such a loop cleanly, each
with its checkpoint, as the training loop's own handler does, rather than leaving them running
after the shell that started them has gone.
"""

from __future__ import annotations

import os
import signal

_MESSAGE = b"interrupted while starting: nothing was written\n"


def _interrupted_while_starting(signum, frame) -> None:
    # os.write, not print: a signal that lands while the main thread writes to stderr would
    # make print fail ("reentrant call") before the exit.
    os.write(2, _MESSAGE)
    os._exit(128 + signum)


_UNSET = object()
_state = {"worker": False, "sigterm": _UNSET}  # SIGTERM's handler before ours, to restore


def quiet_ctrl_c_while_starting(module_name: str = "__main__") -> None:
    """Until :func:`imports_done`, a Ctrl-C or SIGTERM exits with one line and the shell's
    code (130, 143). A SIGTERM the process was started ignoring stays ignored.

    ``module_name`` is the calling script's ``__name__``. A parallel env's worker process
    (``multiprocessing``'s spawn) runs the script's module code again, as ``"__mp_main__"``,
    before it builds its env: there SIGINT and SIGTERM are ignored from the first line on (and
    :func:`imports_done` leaves them so). A Ctrl-C to the process group during those seconds of
    imports killed the worker, and the training process's start of its envs failed with an
    EOFError instead of finishing the step and saving (aefrl.envs.dmc's workers ignore both
    signals once built, for the same reason; the training process stops them itself).
    """
    if module_name == "__mp_main__":
        _state["worker"] = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        return
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    before = signal.getsignal(signal.SIGTERM)
    if before is signal.SIG_IGN:
        return
    if before is not _interrupted_while_starting:  # a second call keeps the first one's
        _state["sigterm"] = before
    signal.signal(signal.SIGTERM, _interrupted_while_starting)


def imports_done() -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` again, for the script's own handling, and SIGTERM
    gets back the handler it had (not in a worker, which keeps ignoring both: see
    :func:`quiet_ctrl_c_while_starting`)."""
    if _state["worker"]:
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if _state["sigterm"] is not _UNSET:
        # None: a handler installed outside Python, which Python cannot reinstall; the default.
        before = _state["sigterm"]
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)
        _state["sigterm"] = _UNSET
