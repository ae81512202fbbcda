"""Timers, peak memory and profile summaries for benchmarks on a shared, noisy machine.

* :func:`time_interleaved` runs several callables round-robin (A B C A B C ...), so slow drifts
  of the machine's load hit every one of them alike; it reports medians, and the kernel time and
  page faults of the calls.
* :class:`PeakMemory` measures one call's memory: on CUDA ``torch.cuda.max_memory_allocated``;
  on the CPU the process RSS, sampled every ``interval`` seconds by a thread, because the RSS
  high-water mark of ``getrusage`` only ever grows within a process and cannot tell two
  configurations in one process apart. Before the call, freed heap pages go back to the OS
  (glibc ``malloc_trim``), so a call cannot hide its working set in pages left by a previous one;
  :func:`settle_allocator` at start makes a first call's memory that of a warm process.
* :func:`profile_summary` runs one call under ``torch.profiler`` and keeps the top operators by
  self time, plus the same time grouped into a few families (convolution, matmul, ...).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MIB = 2**20


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages of the machine."""
    return [round(x, 2) for x in os.getloadavg()]


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def settle_allocator() -> None:
    """Put glibc malloc in the state a process reaches after its first large free.

    glibc serves allocations above a *dynamic* threshold (128 KiB at start) with mmap, and raises
    the threshold to the size of each mmapped block freed, up to 32 MiB. A fresh process therefore
    maps and unmaps tensors that a warm one keeps in its heap, and the first update of a process
    shows a lower peak RSS than every later one. Freeing one 32 MiB block at start settles the
    threshold where training processes run, so first-call memory is warm-call memory.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free(libc.malloc(32 * MIB - 64 * 1024))


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Context manager: peak memory of the code inside it, in bytes.

    After exit: ``peak`` (CPU: the highest process RSS seen; CUDA: max allocated) and ``delta``
    (``peak`` minus the value on entry: what the code needed on top of what was resident).
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.peak = self.delta = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._start = self.peak = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss())
        self.delta = self.peak - self._start
        return False


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    reps: int = 3,
    warmup: int = 1,
    memory: bool = True,
) -> dict[str, dict]:
    """Time every callable ``reps`` times, round-robin, after ``warmup`` untimed rounds.

    Memory is measured in a round of its own before those (``memory``): its ``malloc_trim``
    and sampling thread would perturb a timed call. The first call after a trim pages the heap
    back in, which the warm-up rounds absorb; with ``warmup=0`` (the test harness's toy plan)
    the first timed round follows the memory round directly and pays for it. Each
    round starts one callable later than the round before, so
    no implementation is always the one that runs after the previous round's last (a fixed
    order made the first one pay for the trimmed heap in every run). Call
    :func:`settle_allocator` once at start so that first calls are measured in a warm heap.

    Returns ``{name: {"median_s", "min_s", "times_s", "sys_s", "minor_faults", "peak_mib",
    "delta_mib"}}``: ``sys_s`` and ``minor_faults`` are medians over the timed calls of the
    process's kernel time and minor page faults (``getrusage``; on the CPU, freeing and
    re-faulting large tensors can cost a third of an update).
    """
    out = {name: {"times_s": [], "sys": [], "faults": []} for name in calls}

    def run(name: str, fn, timed: bool, measure_memory: bool) -> None:
        mem = PeakMemory(device) if measure_memory else None
        if mem is not None:
            mem.__enter__()
        sync(device)
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        rec = out[name]
        if mem is not None:
            mem.__exit__(None, None, None)
            rec["peak_mib"] = round(mem.peak / MIB, 1)
            rec["delta_mib"] = round(mem.delta / MIB, 1)
        if timed:
            rec["times_s"].append(round(seconds, 6))
            rec["sys"].append(after.ru_stime - before.ru_stime)
            rec["faults"].append(after.ru_minflt - before.ru_minflt)

    names = list(calls)
    rounds = ["memory"] * memory + ["warmup"] * warmup + ["timed"] * reps
    for i, kind in enumerate(rounds):
        first = i % len(names)
        for name in names[first:] + names[:first]:
            run(name, calls[name], timed=kind == "timed", measure_memory=kind == "memory")
    for rec in out.values():
        rec["median_s"] = round(statistics.median(rec["times_s"]), 6)
        rec["min_s"] = min(rec["times_s"])
        rec["sys_s"] = round(statistics.median(rec.pop("sys")), 3)
        rec["minor_faults"] = int(statistics.median(rec.pop("faults")))
    return out


# Operator families for the profile summary, tried in order on the lower-cased operator name.
OP_GROUPS = (
    ("optimizer (Adam, grad-norm clip)", ("optimizer.", "_foreach", "adam", "vector_norm")),
    ("convolution", ("conv",)),
    ("recurrent (GRU cell)", ("gru",)),
    ("matmul / linear", ("addmm", "::mm", "bmm", "matmul", "linear")),
    ("normalisation", ("layer_norm", "batch_norm", "group_norm")),
    ("copies / layout", ("copy", "clone", "contiguous", "permute", "cat", "stack", "index")),
)
PHASES = ("forward", "backward", "optimizer")


def op_group(name: str) -> str:
    """The :data:`OP_GROUPS` family of an operator name (``"elementwise / other"`` if none)."""
    low = name.lower()
    for group, needles in OP_GROUPS:
        if any(n in low for n in needles):
            return group
    return "elementwise / other"


def _phase_and_group(event) -> tuple[str, str]:
    """Phase of a profiler event from its ancestors (autograd engine: backward; an
    ``Optimizer.*`` record: optimizer; else forward) and its family (optimizer phase wins)."""
    phase, parent = "forward", event
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            phase = "optimizer"
            break
        if parent.name.startswith("autograd::engine::evaluate_function"):
            phase = "backward"
        parent = parent.cpu_parent
    group = op_group(event.name)
    if phase == "optimizer":
        group = OP_GROUPS[0][0]
    return phase, group


def self_times(events, cuda: bool) -> tuple[dict, dict, dict]:
    """``(family -> µs, phase -> µs, (op, phase) -> [µs, calls, family])`` of profiler
    ``events``: self CPU time, or on a GPU (``cuda``) the self device time of the CPU-side
    operators. A GPU profile also lists the kernels as events of their own, whose time their
    launching operator's self device time already holds (and which have no parent to give
    their phase): counting them too counted every kernel twice."""
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    groups: dict[str, float] = {}
    phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    ops: dict[tuple, list] = {}
    for e in events:
        if cuda and e.device_type != DeviceType.CPU:
            continue
        t = getattr(e, attr)
        if t <= 0:
            continue
        phase, group = _phase_and_group(e)
        groups[group] = groups.get(group, 0.0) + t
        phases[phase] += t
        rec = ops.setdefault((e.name, phase), [0.0, 0, group])
        rec[0] += t
        rec[1] += 1
    return groups, phases, ops


def profile_summary(fn: Callable[[], object], device: torch.device, top: int = 15) -> dict:
    """Run ``fn`` once under ``torch.profiler``; returns the total self time, the top ``top``
    operators by self time (CPU time, or on a GPU the device time of the kernels each
    launched: :func:`self_times`), the time per :data:`OP_GROUPS`
    family and per phase (forward, backward, optimizer step; grad-norm clipping counts as
    optimizer by its operators, the rest of the code between backward and step as forward)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - start
    groups, phases, ops = self_times(prof.events(), device.type == "cuda")
    total = sum(groups.values()) or 1.0
    ranked = sorted(ops.items(), key=lambda kv: -kv[1][0])

    def share(t: float) -> dict:
        return {"self_ms": round(t / 1000, 1), "share": round(t / total, 4)}

    return {
        "clock": "device" if device.type == "cuda" else "cpu",
        "wall_s_with_profiler": round(wall, 3),
        "total_self_ms": round(total / 1000, 1),
        "top_ops": [
            {"op": name, "phase": phase, **share(t), "calls": n, "group": g}
            for (name, phase), (t, n, g) in ranked[:top]
        ],
        "groups": {g: share(t) for g, t in sorted(groups.items(), key=lambda kv: -kv[1])},
        "phases": {p: share(t) for p, t in phases.items()},
    }


def conv_flops_per_image(encoder, decoder, feat_dim: int, image: int, two_inputs: bool) -> dict:
    """Convolution FLOPs for one image through ``encoder`` and ``decoder`` (forward, and forward +
    backward with parameter and decoder-input gradients), counted by ``torch.utils.flop_counter``
    (2 FLOPs per multiply-add). ``two_inputs``: the decoder takes ``(state, belief)`` (torchrl)
    instead of one feature vector (ours)."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = next(encoder.parameters()).device
    y = torch.rand(1, 3, image, image, device=dev)
    feat = torch.randn(1, feat_dim, device=dev, requires_grad=True)

    def run(backward: bool) -> dict[str, int]:
        with FlopCounterMode(display=False) as counter:
            e = encoder(y)
            x = decoder(feat[:, :0], feat) if two_inputs else decoder(feat)
            if backward:
                torch.autograd.backward([e, x], [torch.ones_like(e), torch.ones_like(x)])
        counts = counter.get_flop_counts()["Global"]
        conv = sum(v for k, v in counts.items() if "conv" in str(k))
        return {"conv": int(conv), "all": int(sum(counts.values()))}

    fwd, both = run(False), run(True)
    encoder.zero_grad(set_to_none=True)
    decoder.zero_grad(set_to_none=True)
    return {
        "conv_gflop_forward": round(fwd["conv"] / 1e9, 4),
        "conv_gflop_forward_backward": round(both["conv"] / 1e9, 4),
        "all_gflop_forward_backward": round(both["all"] / 1e9, 4),
    }


def call_flops(fn: Callable[[], object]) -> dict[str, float]:
    """FLOPs of one call of ``fn`` (forward, backward and optimiser arithmetic that
    ``torch.utils.flop_counter`` knows: matmuls and convolutions, 2 per multiply-add; pointwise
    work is not counted), split into convolution and the rest, in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()["Global"]
    conv = sum(v for k, v in counts.items() if "conv" in str(k))
    total = sum(counts.values())
    return {
        "flops": int(total),
        "gflop": round(total / 1e9, 3),
        "conv_gflop": round(conv / 1e9, 3),
    }
