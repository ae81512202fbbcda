"""Run a script's command lines as processes forked from one that already imported it.

``python scripts/train.py <bad value>`` spends ~4 s of a quiet 2-core machine (~20 s beside
other work) importing torch, tensordict, torchrl and dm-control before its checks refuse the
value in a fraction of a second (a mistyped key of a single run is refused before the imports);
the CLI's bad-input tests are dozens of such command lines. :class:`ForkedScript` starts one
server process that imports the script's modules once (the script's module code, run under
another name than ``__main__``), then forks a child per command line that runs the script as
``__main__`` with that ``argv``: a process of its own, with its own exit code, stdout, stderr,
signal handlers and Hydra state, as a fresh ``python scripts/<name>.py ...`` would have, minus
the import time. ``tests/test_cli.py`` checks that both give the same result on representative
lines; what a fresh interpreter does in its imports (a Ctrl-C there) is tested with real
subprocesses.

Where a child differs from a fresh interpreter: output the imports wrote went to the server's
stderr, once (the equivalence test compares stderr exactly, so new import-time output fails
it); interpreter finalisation is reduced to joining non-daemon threads and the atexit
functions; environment variables read while importing (``OMP_*``, ``MUJOCO_GL``) keep the
server's values (a request may change only those it names as read later); every child starts
from the server's hash seed and RNG states, where fresh processes draw their own; output of
native code still in C stdio buffers at exit is lost; a ``TimeoutExpired`` holds str, not bytes.
Fork copies only the calling thread: the server refuses to serve with a Python thread besides
its main one, or with CUDA initialised by the imports (a child would keep its device count; on
a GPU machine where torch counts devices without NVML the imports initialise the driver without
``is_initialized`` saying so); native pools such as OpenBLAS's shut themselves down around a
fork. Each child is its own process group, killed whole on a timeout or a Ctrl-C of the
server, and dies with the server (Linux).

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

    def __init__(
        self,
        script: str,
        env: dict[str, str] | None = None,
        late_env: tuple[str, ...] = ("CUDA_VISIBLE_DEVICES",),
    ) -> None:
        """``late_env``: the variables a request's ``env`` may change, those the script
        reads only after its imports (the others were read in the server, once)."""
        self.script = script
        self.env = dict(os.environ if env is None else env)
        self.late_env = late_env
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
        try:
            refusal = self._reply(timeout=300).get("refusal")
            if refusal:
                raise RuntimeError(f"the fork server cannot fork safely: {refusal}")
        except BaseException:
            self.close()
            raise

    def run(self, *args: str, timeout: float = 300, env: dict | None = None) -> SimpleNamespace:
        """``env``: the child's whole environment (default: the server's); it may differ from
        the server's in ``late_env`` only, and the variables the imports set keep their values
        unless it sets them."""
        changes = None
        if env is not None:
            keys = {k for k in {*env, *self.env} if env.get(k) != self.env.get(k)}
            early = sorted(keys - set(self.late_env))
            if early:
                raise ValueError(f"{early} are read while the script imports; the server read "
                                 "its own values once: use a fresh process")  # fmt: skip
            changes = {k: env.get(k) for k in keys}
        request = {"args": list(args), "timeout": timeout, "env": changes}
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
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        if self._proc.poll() is None:
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
    from importlib.machinery import SourceFileLoader

    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=str(script), __builtins__=builtins, __cached__=None)
    main.__loader__ = SourceFileLoader("__main__", str(script))
    sys.modules["__main__"] = main
    exec(compile(script.read_bytes(), str(script), "exec"), main.__dict__)


def _child(script: Path, given: str, request: dict, reply, out: str, err: str) -> None:
    """Run ``script`` as ``__main__`` with the request's ``args`` in this (forked) process and
    exit with its status: ``SystemExit``'s code (a non-int one printed, status 1), an uncaught
    exception through ``sys.excepthook`` with status 1, an uncaught ``KeyboardInterrupt`` by
    SIGINT (both with their traceback, less this file's frames); then non-daemon threads are
    joined and the atexit functions run."""
    code = 1
    try:
        reply.close()
        os.setpgid(0, 0)  # its own group: a timeout kills what it started too
        with contextlib.suppress(Exception):  # and it dies with the server (Linux)
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
        for key, value in (request["env"] or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        sys.argv = [given, *request["args"]]
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
            elif not -(2**63) <= code < 2**63:  # the interpreter's C long overflows: -1
                code = -1
        except BaseException as exc:
            tb = exc.__traceback__
            for _ in range(2):  # this file's frames: _child, _run_as_main
                tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
            sys.excepthook(type(exc), exc.with_traceback(tb), tb)  # it prints __traceback__
            interrupted = isinstance(exc, KeyboardInterrupt)
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


def _serve(script: Path, given: str) -> None:
    sys.path[0] = str(script.parent)  # as `python scripts/<name>.py` has it
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Replies go to a copy of stdout; whatever the imports print goes to stderr (a file).
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # The imports, and the module code; its `if __name__ == "__main__"` part does not run. An
    # error here is left to the children, which run the module code again and report it.
    with contextlib.suppress(Exception, SystemExit):  # a Ctrl-C stops the server
        sys.argv = [given]
        import runpy

        runpy.run_path(str(script), run_name="__forked_script_preload__")
    sys.stdout.flush()
    for sig, handler in handlers.items():  # the preload set its own; the child sets them again
        signal.signal(sig, handler)
    reply.write(json.dumps({"refusal": _refusal()}) + "\n")
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
                _child(script, given, request, reply, out, err)
            with contextlib.suppress(OSError):  # here too: the child may not have run yet
                os.setpgid(pid, pid)
            deadline = time.monotonic() + request["timeout"]
            try:
                while not (status := os.waitpid(pid, os.WNOHANG))[0]:
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    time.sleep(0.01)
                timed_out, status = False, status[1]
            except BaseException as exc:  # the timeout, or a Ctrl-C: the child's group goes too
                for kill in (os.killpg, os.kill):
                    with contextlib.suppress(ProcessLookupError):
                        kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                if not isinstance(exc, TimeoutError):
                    raise
                timed_out = True
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
    # As the interpreter makes a script's path absolute: joined to the working directory, not
    # resolved; argv[0] stays as given.
    _serve(Path(os.path.join(os.getcwd(), sys.argv[1])), sys.argv[1])
