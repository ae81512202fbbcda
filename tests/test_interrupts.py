"""aefrl.interrupts: a Ctrl-C during the imports is one line; an ignored Ctrl-C stays ignored."""

import signal
import subprocess
import sys

_SNIPPET = """
import signal
from aefrl.interrupts import imports_done, quiet_ctrl_c_while_starting
quiet_ctrl_c_while_starting()
during = signal.getsignal(signal.SIGINT)
imports_done()
after = signal.getsignal(signal.SIGINT)
print(during is signal.SIG_IGN, after is signal.SIG_IGN, after is signal.default_int_handler)
"""


def _run(ignore_sigint: bool) -> str:
    def ignore():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    out = subprocess.run(
        [sys.executable, "-c", _SNIPPET],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=ignore if ignore_sigint else None,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_process_started_with_ctrl_c_ignored_keeps_ignoring_it():
    """Background jobs of a non-interactive shell start with SIGINT ignored, so that one
    Ctrl-C does not stop them all; the scripts installed Python's handler regardless."""
    assert _run(ignore_sigint=True) == ["True", "True", "False"]
    assert _run(ignore_sigint=False) == ["False", "False", "True"]
