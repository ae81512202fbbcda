"""Run a script's command lines as processes forked from one that already imported it.

``python scripts/train.py <bad override>`` spends ~4 s of a quiet 2-core machine (~20 s
beside other work) importing torch, tensordict, torchrl and dm-control before its checks
refuse the override in a fraction of a second; the CLI's bad-input tests are dozens of such
command lines. :class:`ForkedScript` starts one server process that imports the script's
modules once (the script's module code, run under another name than ``__main__``), then forks
a child per command line that runs the script as ``__main__`` with that ``argv``: a process of
its own, with its own exit code, stdout, stderr, signal handlers and Hydra state, as a fresh
``python scripts/<name>.py ...`` would have, minus the import time. ``tests/test_cli.py``
checks that both give the same result on representative lines; what a fresh interpreter does
in its imports (a Ctrl-C there) is tested with real subprocesses.

Where a child differs from a fresh interpreter: output the imports wrote went to the server's
stderr, once (the equivalence test compares stderr exactly, so new import-time output fails
it); interpreter finalisation is reduced to joining non-daemon threads and the atexit
functions; environment variables read while importing (``OMP_*``, ``MUJOCO_GL``) keep the
server's values. Fork copies only the calling thread: the server refuses to serve with a Python
thread besides its main one, or with CUDA initialised (its device count would stay fixed in
every child); native pools such as OpenBLAS's shut themselves down around a fork. Each child is
its own process group, killed whole on a timeout.

Run as a script, this file is the server: ``python tests/forked_script.py scripts/train.py``
reads one JSON request per line on stdin (``{"args": [...], "timeout": s, "env": {...}}``) and
answers each with one JSON line (``returncode``, ``stdout``, ``stderr``, ``timed_out``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


class ForkedScript:
    """A client of the server below for ``script`` (a path relative to the repository root,
    e.g. ``"scripts/train.py"``), started with ``env`` in the repository root. ``run(*args)``
    returns what ``subprocess.run(..., capture_output=True, text=True)`` would: an object with
    ``returncode``, ``stdout`` and ``stderr``, or raises ``subprocess.TimeoutExpired``."""

    def __init__(self, script: str, env: dict[str, str] | None = None) -> None:
        self.script = script
        # A file, not a pipe: nobody reads the server's stderr while it runs, and a full pipe
        # would block it.
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by close())
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), script],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        hello = self._reply(timeout=300)
        refusal = hello.get("refusal")
        if refusal:
            self.close()
            raise RuntimeError(f"the fork server cannot fork safely: {refusal}")

    def run(self, *args: str, timeout: float = 300, env: dict | None = None) -> SimpleNamespace:
        """``env``: the child's whole environment (default: the server's), plus what the
        server's imports set in theirs, as a fresh process's imports would."""
        request = {"args": list(args), "timeout": timeout, "env": env}
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except OSError:
            raise RuntimeError(f"the fork server died: {self._server_log()}") from None
        out = SimpleNamespace(**self._reply(timeout + 60))
        if out.timed_out:
            cmd = [sys.executable, self.script, *args]
            raise subprocess.TimeoutExpired(cmd, timeout, out.stdout, out.stderr)
        return out

    def _reply(self, timeout: float) -> dict:
        # One line per request and nothing else, so the text wrapper never holds a read-ahead
        # line that select() would not see.
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            self._proc.kill()
            raise RuntimeError(f"the fork server did not answer: {self._server_log()}")
        return json.loads(line)

    def _server_log(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()
        self._log.close()


# --- the server --------------------------------------------------------------------------------
def _run_as_main(script: Path) -> None:
    """Run ``script`` as ``__main__``, its ``__file__`` absolute and ``sys.argv[0]`` left as
    given, as ``python scripts/<name>.py`` has them (``runpy.run_path`` sets both to one
    path)."""
    import builtins
    import types

    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=str(script), __builtins__=builtins, __cached__=None)
    sys.modules["__main__"] = main
    exec(compile(script.read_bytes(), str(script), "exec"), main.__dict__)


def _child(script: Path, request: dict, env_added: dict, out: str, err: str) -> None:
    """Run ``script`` as ``__main__`` with the request's ``args`` in this (forked) process and
    exit with its status: ``SystemExit``'s code (a non-int one printed, status 1), an uncaught
    exception through ``sys.excepthook`` with status 1, an uncaught ``KeyboardInterrupt`` by
    SIGINT; then non-daemon threads are joined and the atexit functions run."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own group: a timeout kills what it started too
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
        if request["env"] is not None:
            os.environ.clear()
            os.environ.update({**request["env"], **env_added})
        sys.argv = [os.path.relpath(script, ROOT), *request["args"]]
        interrupted = False
        try:
            _run_as_main(script)
            code = 0
        except SystemExit as exc:
            code = exc.code
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        import atexit
        import threading

        threading._shutdown()
        atexit._run_exitfuncs()
        if interrupted:  # the interpreter ends such a run by the signal itself
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code & 0xFF if isinstance(code, int) else 1)


def _refusal() -> str | None:
    """Why forking this process would not give what a fresh one has, or None."""
    import threading

    if threading.active_count() != 1:
        return f"{threading.active_count()} Python threads after the imports"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised while importing"
    return None


def _serve(script: Path) -> None:
    import threading

    sys.path[0] = str(script.parent)  # as `python scripts/<name>.py` has it
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    env_before = dict(os.environ)
    # Replies go to a copy of stdout; whatever the imports print goes to stderr (a file).
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # The imports, and the module code; its `if __name__ == "__main__"` part does not run. An
    # error here is left to the children, which run the module code again and report it.
    with contextlib.suppress(BaseException):
        sys.argv = [os.path.relpath(script, ROOT)]
        import runpy

        runpy.run_path(str(script), run_name="__forked_script_preload__")
    sys.stdout.flush()
    for sig, handler in handlers.items():  # the preload set its own; the child sets them again
        signal.signal(sig, handler)
    env_added = {k: v for k, v in os.environ.items() if env_before.get(k) != v}
    reply.write(json.dumps({"refusal": _refusal(), "threads": threading.active_count()}) + "\n")
    reply.flush()
    # mkdtemp, not TemporaryDirectory: a child runs the atexit functions it inherits, and
    # TemporaryDirectory's would delete the folder under the server.
    tmp = tempfile.mkdtemp(prefix="forked_script_")
    try:
        for number, line in enumerate(sys.stdin):
            request = json.loads(line)
            # Fresh files per request: a process the last child left behind cannot write
            # into this one's output.
            out, err = (os.path.join(tmp, f"{number}.{name}") for name in ("out", "err"))
            for path in (out, err):
                Path(path).write_bytes(b"")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                reply.close()
                _child(script, request, env_added, out, err)
            with contextlib.suppress(OSError):  # here too: the child may not have run yet
                os.setpgid(pid, pid)
            deadline = time.monotonic() + request["timeout"]
            timed_out = False
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    for kill in (os.killpg, os.kill):
                        with contextlib.suppress(ProcessLookupError):
                            kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
            result = {
                "returncode": os.waitstatus_to_exitcode(status),
                "stdout": Path(out).read_text(errors="replace"),
                "stderr": Path(err).read_text(errors="replace"),
                "timed_out": timed_out,
            }
            reply.write(json.dumps(result) + "\n")
            reply.flush()
            for path in (out, err):
                os.unlink(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    _serve((ROOT / sys.argv[1]).resolve())
