"""aefrl.interrupts: a Ctrl-C or SIGTERM during the imports is one line and the shell's code;
after them a Ctrl-C is a KeyboardInterrupt and SIGTERM has its own handler back."""

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


_SCRIPT_WITH_A_WORKER = """
import os, sys, time
from aefrl.interrupts import imports_done, quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting(__name__)
if __name__ == "__mp_main__":  # a spawned worker re-running the script: its imports take time
    open(sys.argv[1] + ".importing", "w").close()
    time.sleep(3)
imports_done()


def work(path):
    open(path + ".ran", "w").close()


if __name__ == "__main__":
    import multiprocessing

    worker = multiprocessing.get_context("spawn").Process(target=work, args=(sys.argv[1],))
    worker.start()
    print(worker.pid, flush=True)
    worker.join()
    print(worker.exitcode, flush=True)
"""


def test_a_spawned_worker_ignores_ctrl_c_while_it_reruns_the_scripts_imports(tmp_path):
    """A parallel env's worker runs the training script's module code again (as __mp_main__)
    for seconds before it builds its env; a Ctrl-C to the process group then killed it, and
    the training process's env start failed with an EOFError instead of saving."""
    import os
    import time

    script, marker = tmp_path / "script.py", str(tmp_path / "m")
    script.write_text(_SCRIPT_WITH_A_WORKER)
    proc = subprocess.Popen(
        [sys.executable, str(script), marker], stdout=subprocess.PIPE, text=True
    )
    pid = int(proc.stdout.readline())
    for _ in range(600):  # the worker is in its imports
        if os.path.exists(marker + ".importing"):
            break
        time.sleep(0.05)
    os.kill(pid, signal.SIGINT)  # what the terminal sends the whole group on Ctrl-C
    os.kill(pid, signal.SIGTERM)  # and a scheduler
    out, _ = proc.communicate(timeout=120)
    assert out.split() == ["0"] and os.path.exists(marker + ".ran")


def test_the_script_itself_keeps_its_ctrl_c_handling():
    """Only a worker's re-run ignores the signals: the script proper (and a test that loads it
    under another name) gets the one-line exit, then KeyboardInterrupt."""
    from aefrl import interrupts

    def own(signum, frame):  # the SIGTERM handler the process had before: it must come back
        pass

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, own)
        for name in ("__main__", "train_script"):
            interrupts.quiet_ctrl_c_while_starting(name)
            assert signal.getsignal(signal.SIGINT) is interrupts._interrupted_while_starting
            assert signal.getsignal(signal.SIGTERM) is interrupts._interrupted_while_starting
            interrupts.imports_done()
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            assert signal.getsignal(signal.SIGTERM) is own
        # Called twice before its imports are done (a module loaded again after a failed
        # load): the handler from before the first call still comes back.
        interrupts.quiet_ctrl_c_while_starting("train_script")
        interrupts.quiet_ctrl_c_while_starting("train_script")
        interrupts.imports_done()
        assert signal.getsignal(signal.SIGTERM) is own
        # A process started with SIGTERM ignored (nohup-like launchers) keeps ignoring it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        interrupts.quiet_ctrl_c_while_starting("__main__")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        interrupts.imports_done()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
