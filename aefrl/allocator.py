"""Keep freed tensor memory in the process on the CPU, instead of unmapping and re-faulting it.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB by default) with a
fresh ``mmap`` and returns it to the kernel on ``free``. A Dreamer update at B·T = 800 frames
allocates and frees many activations of 40-100 MiB (the first conv layer's output alone is
800 x 32 x 32 x 32 floats), so every update faults its whole working set in again, page by
page: about 650 k minor faults and 1-2 s of kernel time per world-model update on the project's
2-core VM, a third or more of the update (docs/benchmarks.md). Raising the mmap and trim
thresholds lets the heap keep those pages: the process's RSS stays at its peak working set,
which it reaches on every update anyway.

Only glibc is tuned; with another libc, or when ``MALLOC_*`` variables are set by the user, this
does nothing. CUDA memory is managed by torch's caching allocator and is not affected.
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# mallopt takes a C int: every value must stay below 2**31.
MMAP_THRESHOLD = 1 << 30  # blocks above 1 GiB still get their own mapping
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of free heap top between updates
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps

_state = {"tuned": False}


def tune_malloc() -> bool:
    """Raise glibc's mmap / trim thresholds for this process (see the module docstring).

    Returns True when the settings were applied (now or by an earlier call), False when they
    could not be (not glibc) or the user chose their own ``MALLOC_*`` settings. Call it once at
    start, before the first large allocation; later calls do nothing.
    """
    if _state["tuned"]:
        return True
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = all(
            libc.mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (_M_TOP_PAD, TOP_PAD),
            )
        )
    except (OSError, AttributeError):
        return False
    _state["tuned"] = ok
    return ok


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` has applied its settings in this process."""
    return _state["tuned"]
