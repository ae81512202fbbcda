"""aefrl.allocator: glibc's thresholds are raised, and user MALLOC_* settings are respected."""

import os
import platform
import subprocess
import sys

import pytest

PROBE = (
    "import ctypes, resource\n"
    "from aefrl.allocator import malloc_tuned, tune_malloc\n"
    "ok = tune_malloc()\n"
    "print(ok, malloc_tuned())\n"
    "libc = ctypes.CDLL('libc.so.6')\n"
    "libc.malloc.restype = ctypes.c_void_p\n"
    "libc.free.argtypes = [ctypes.c_void_p]\n"
    "def faults():\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "# a block the size of a large activation, written and freed, three times\n"
    "for _ in range(3):\n"
    "    before = faults()\n"
    "    p = libc.malloc(200 << 20); ctypes.memset(p, 1, 200 << 20); libc.free(p)\n"
    "    print(faults() - before)\n"
)
PAGES = (200 << 20) // 4096


def _probe(env: dict) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc only")
def test_tuned_heap_keeps_freed_pages():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tuned, flag, first, _, third = _probe(env)
    assert tuned == "True" and flag == "True"
    assert int(first) > PAGES // 2  # the first block is faulted in
    assert int(third) < PAGES // 10  # later ones reuse its pages


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc only")
def test_user_malloc_settings_are_left_alone():
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    tuned, flag, _, _, third = _probe(env)
    assert tuned == "False" and flag == "False"
    assert int(third) > PAGES // 2  # glibc default: mapped again every time
