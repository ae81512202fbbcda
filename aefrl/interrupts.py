"""Ctrl-C while a script is still importing (stdlib only, importable before torch).

The imports take seconds (torch, torchrl, mujoco); a Ctrl-C among them surfaced as a
``KeyboardInterrupt`` (or an ``ImportError`` from inside mujoco) traceback of dozens of frames.
Nothing has been written by then, so the scripts leave at once with one line.

The handlers are installed even in a process started with Ctrl-C ignored (a background job of
a non-interactive shell): a Ctrl-C then stops the training runs of such a loop cleanly, each
with its checkpoint, as the training loop's own handler does, rather than leaving them running
after the shell that started them has gone.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    print("interrupted while starting: nothing was written", file=sys.stderr)
    os._exit(128 + signum)


def quiet_ctrl_c_while_starting() -> None:
    """Until :func:`imports_done`, a Ctrl-C exits with one line and the shell's code (130)."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def imports_done() -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` again, for the script's own handling."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
