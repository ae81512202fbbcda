"""tests/forked_script.py against fresh interpreters, on toy scripts (no torch): the CLI tests
run their refused command lines through it, so what it claims to keep must hold."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.forked_script import ROOT, ForkedScript

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
TOY = """\
import os, sys
from pathlib import Path

os.environ.setdefault("IMPORT_SET", "by-the-imports")  # as torch and tensordict do
os.environ.setdefault("LATE", "by-the-imports")


def main(mode):
    print(sys.argv[0], Path(__file__).is_absolute(), type(__loader__).__name__, __name__)
    print(os.environ.get("LATE"), os.environ.get("IMPORT_SET"))
    if mode == "raise":
        raise ValueError("boom")
    if mode == "interrupt":
        raise KeyboardInterrupt
    if mode == "exit-text":
        sys.exit("bye")
    if mode == "exit-huge":
        sys.exit(2**70)
    if mode == "exit-negative":
        sys.exit(-3)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    script = tmp_path_factory.mktemp("toy") / "toy.py"
    script.write_text(TOY)
    path = os.path.relpath(script, ROOT)  # as scripts/train.py is given: relative to the root
    server = ForkedScript(path, env=ENV, late_env=("LATE",))
    yield path, server
    server.close()


@pytest.mark.parametrize(
    ("mode", "env"),
    [
        ("", None),
        ("raise", None),
        ("interrupt", None),
        ("exit-text", None),
        ("exit-huge", None),
        ("exit-negative", None),
        ("", {**ENV, "LATE": "by-the-request"}),  # the request's value wins, as in a fresh one
        ("", {**ENV, "IMPORT_SET": "by-the-request"}),  # read while importing: refused
    ],
)
def test_a_forked_child_gives_what_a_fresh_interpreter_gives(toy, mode, env):
    path, server = toy
    if env is not None and "IMPORT_SET" in env:
        with pytest.raises(ValueError, match="IMPORT_SET"):
            server.run(mode, env=env)
        return
    fresh = subprocess.run(
        [sys.executable, path, mode], cwd=ROOT, env=env or ENV, capture_output=True, text=True
    )
    forked = server.run(mode, env=env)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode,
        fresh.stdout,
        fresh.stderr,
    )
    assert fresh.stdout.splitlines()[0] == f"{path} True SourceFileLoader __main__"


def test_a_forked_command_line_that_outlives_its_timeout_raises_and_is_killed(tmp_path):
    """As ``subprocess.run``: TimeoutExpired; and what the child started dies with it."""
    script = tmp_path / "sleeper.py"
    pid_file = tmp_path / "grandchild.pid"
    script.write_text(
        "import subprocess, sys, time\n"
        "if __name__ == '__main__' and sys.argv[1:] == ['quick']:\n"
        "    print('quick')\n"
        "    sys.exit(3)\n"
        "if __name__ == '__main__':\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"    open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "    print('started', flush=True)\n"
        "    time.sleep(60)\n"
    )

    def running(pid: int) -> bool:  # a zombie left for init to reap counts as dead
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    server = ForkedScript(str(script), env=ENV)
    try:
        with pytest.raises(subprocess.TimeoutExpired) as info:
            server.run(timeout=3)
        assert info.value.stdout == "started\n"
        grandchild = int(pid_file.read_text())
        deadline = time.monotonic() + 10
        while running(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(grandchild)
        out = server.run("quick")  # and the server goes on serving
        assert (out.returncode, out.stdout) == (3, "quick\n")
    finally:
        server.close()
