"""Run a script's command lines as processes forked from one that already imported it.

``python scripts/train.py <bad override>`` spends ~4 s of a quiet 2-core machine (~20 s
beside other work) importing torch, tensordict, torchrl and dm-control before its checks
refuse the override in a fraction of a second; the CLI's bad-input tests are dozens of such
command lines. :class:`ForkedScript` starts one server process that imports the script's
modules once (the script's module code, run under another name than ``__main__``), then forks
a child per command line that runs the script as ``__main__`` with that ``argv``: a process of
its own, with its own exit code, stdout, stderr, signal handlers and Hydra state, as a fresh
``python scripts/<name>.py ...`` would have, minus the import time. What a fresh interpreter
does differently (the imports themselves, a Ctrl-C during them) is tested with real
subprocesses elsewhere, and ``tests/test_cli.py`` checks that both give the same result.

The server forks only while it is single-threaded (it checks, and refuses otherwise: a fork
copies no other thread, and a lock one of them held would stay held in the child), and it
never runs torch operations itself, so no OpenMP pool exists to be lost in a child.

Run as a script, this file is the server: ``python tests/forked_script.py scripts/train.py``
reads one JSON request per line on stdin (``{"args": [...], "timeout": s, "env": {...}}``) and
answers each with one JSON line (``returncode``, ``stdout``, ``stderr``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


class ForkedScript:
    """A client of the server below for ``script`` (a path under the repository root, e.g.
    ``"scripts/train.py"``), started with ``env`` in the repository root. ``run(*args)``
    returns what ``subprocess.run(..., capture_output=True, text=True)`` would: an object with
    ``returncode``, ``stdout`` and ``stderr``."""

    def __init__(self, script: str, env: dict[str, str] | None = None) -> None:
        self.script = script
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), script],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        hello = self._proc.stdout.readline()
        if not hello:
            self._proc.wait(timeout=60)
            raise RuntimeError(f"the fork server did not start: {self._proc.stderr.read()[-2000:]}")
        threads = json.loads(hello)["threads"]
        if threads != 1:
            self.close()
            raise RuntimeError(f"the fork server has {threads} threads after its imports; a fork "
                               "would copy only one of them")  # fmt: skip

    def run(self, *args: str, timeout: float = 300, env: dict | None = None) -> SimpleNamespace:
        """``env``: the child's whole environment (default: the server's). Variables read
        while the server imported (``OMP_*``, ``MUJOCO_GL``) keep the server's values; those
        read later (``CUDA_VISIBLE_DEVICES``: at CUDA's first use) take the new ones."""
        request = {"args": list(args), "timeout": timeout, "env": env}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died: {self._proc.stderr.read()[-2000:]}")
        return SimpleNamespace(**json.loads(line))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdout, self._proc.stderr):
            stream.close()


# --- the server --------------------------------------------------------------------------------
def _exit_code(code) -> int:
    """The exit status the interpreter gives ``SystemExit(code)`` (printing a non-int one)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(script: Path, args: list[str], env: dict | None, out: str, err: str) -> None:
    """Run ``script`` as ``__main__`` with ``args`` in this (forked) process and exit with its
    status, as the interpreter would: uncaught exceptions print their traceback, exit status 1,
    and the atexit functions run."""
    import atexit
    import runpy
    import traceback

    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    sys.argv = [os.path.relpath(script, ROOT), *args]
    code = 0
    try:
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _serve(script: Path) -> None:
    import runpy
    import signal
    import threading

    sys.path[0] = str(script.parent)  # as `python scripts/<name>.py` has it
    # The imports, and the module code; its `if __name__ == "__main__"` part does not run. An
    # error here is left to the children, which run the module code again and report it.
    with contextlib.suppress(BaseException):
        runpy.run_path(str(script), run_name="__forked_script_preload__")
    # The handlers a fresh interpreter starts with (the preload set its own).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    reply = sys.stdout
    reply.write(json.dumps({"threads": threading.active_count()}) + "\n")
    reply.flush()
    # mkdtemp, not TemporaryDirectory: a child runs the atexit functions it inherits, and
    # TemporaryDirectory's would delete the folder under the server.
    tmp = tempfile.mkdtemp(prefix="forked_script_")
    try:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for line in sys.stdin:
            request = json.loads(line)
            for path in (out, err):
                Path(path).write_bytes(b"")
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(script, request["args"], request["env"], out, err)
            deadline = time.monotonic() + request["timeout"]
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
            reply.write(
                json.dumps(
                    {
                        "returncode": os.waitstatus_to_exitcode(status),
                        "stdout": Path(out).read_text(errors="replace"),
                        "stderr": Path(err).read_text(errors="replace"),
                    }
                )
                + "\n"
            )
            reply.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    _serve((ROOT / sys.argv[1]).resolve())
