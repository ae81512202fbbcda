"""aefrl.interrupts: a Ctrl-C during the imports is one line, then a KeyboardInterrupt."""

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


def test_the_scripts_handle_ctrl_c_even_when_started_with_it_ignored():
    """During the imports a Ctrl-C exits with one line; after them it is a KeyboardInterrupt for
    the script's handling, also in a background job of a non-interactive shell (started with it
    ignored), so that a Ctrl-C stops such a loop's runs cleanly, as the training loop does."""
    for ignored in (True, False):
        assert _run(ignore_sigint=ignored) == ["False", "False", "True"]
