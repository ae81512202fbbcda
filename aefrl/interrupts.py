"""Ctrl-C while a script is still importing (stdlib only, importable before torch).

The imports take seconds (torch, torchrl, mujoco); a Ctrl-C among them surfaced as a
``KeyboardInterrupt`` (or an ``ImportError`` from inside mujoco) traceback of dozens of frames.
Nothing has been written by then, so the scripts leave at once with one line.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    print("interrupted while starting: nothing was written", file=sys.stderr)
    os._exit(128 + signum)


_inherited = None  # the SIGINT handler the process started with


def quiet_ctrl_c_while_starting() -> None:
    """Until :func:`imports_done`, a Ctrl-C exits with one line and the shell's code (130).
    A process started with Ctrl-C ignored (a background job of a non-interactive shell, so
    that one Ctrl-C does not stop every job) keeps ignoring it."""
    global _inherited
    _inherited = signal.getsignal(signal.SIGINT)
    if _inherited is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def imports_done() -> None:
    """The handler the process started with again (``KeyboardInterrupt`` for Python's default),
    for the script's own handling."""
    if _inherited is not None:
        signal.signal(signal.SIGINT, _inherited)
