"""aefrl.allocator: glibc's thresholds are raised, and user MALLOC_* settings are respected."""

import os
import platform
import subprocess
import sys

import pytest

PROBE = (
    "import ctypes, torch\n"
    "from aefrl.allocator import malloc_tuned, tune_malloc\n"
    "ok = tune_malloc()\n"
    "print(ok, malloc_tuned())\n"
    "# a freed 200 MiB tensor stays in the heap when tuned, so a later one faults far less\n"
    "import resource\n"
    "def faults():\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "for _ in range(3):\n"
    "    before = faults(); x = torch.ones(50_000_000); del x; print(faults() - before)\n"
)


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
    pages = 50_000_000 * 4 // 4096
    assert int(first) > pages // 2  # the first tensor is faulted in
    assert int(third) < pages // 10  # later ones reuse its pages (the second may be placed
    # at a new 2 MiB-aligned offset: torch aligns large blocks for transparent huge pages)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc only")
def test_user_malloc_settings_are_left_alone():
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    tuned, flag, _, _, third = _probe(env)
    assert tuned == "False" and flag == "False"
    assert int(third) > 50_000_000 * 4 // 4096 // 2  # glibc default: mapped again every time
