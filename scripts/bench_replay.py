"""Benchmark aefrl's SequenceReplay against torchrl's SliceSampler path, in one run.

For each storage ("memory": LazyTensorStorage, "disk": LazyMemmapStorage) and capacity, both paths
get the same arrival-layout rows (pixels uint8 [3, 64, 64]) from ``--num-envs`` streams, written
one agent step at a time and wrapping the ring once. We time:

* extend: rows/s while filling (one ``extend`` per agent step, ``num_envs`` rows each);
* sample: ms per ``[B, T]`` batch, with one agent step written before every sample as in a
  training loop (so torchrl's boundary cache is always stale), for 16x64 and 16x50;
* torchrl "cached": the same sample with no write in between (its best case);
* "ours_out": ``SequenceReplay.sample(out=previous_batch)``, which writes in place instead of
  allocating a fresh batch (fresh 12 MB allocations can page-fault; see the "faults" column);
* correctness: fraction of sampled windows that are consecutive steps of one stream inside
  the valid range (never crossing the write cursor).

Disk numbers are for files in the page cache (they fit in RAM here); a cold cache reads from disk.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_replay.py            # 1e4 and 1e5 rows
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_replay.py --quick    # 1e4 rows, < 1 minute
"""

from __future__ import annotations

import os

# Small ops spin-wait on idle cores by default; with 2 cores that makes torch much slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import functools
import gc
import json
import logging
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import tensordict
import torch
import torchrl
from tensordict import TensorDict
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, ReplayBuffer, SliceSampler

from aefrl import keys
from aefrl.arguments import Parser
from aefrl.replay import SequenceReplay

ACTION_DIM = 6
STREAM_KEY = keys.TRAJ_ID  # torchrl path only: a constant id per stream = one trajectory each
STEP_KEY = "bench_step"  # the agent step, to check windows


def row_pool(num_envs: int, size: int, seed: int = 0) -> list[TensorDict]:
    """Pre-made rows (random pixels) so the timed loop measures the replay, not data creation."""
    gen = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(size):
        pool.append(
            TensorDict(
                {
                    keys.PIXELS: torch.randint(
                        0, 256, (num_envs, 3, 64, 64), dtype=torch.uint8, generator=gen
                    ),
                    keys.PREV_ACTION: torch.rand(num_envs, ACTION_DIM, generator=gen) * 2 - 1,
                    keys.REWARD: torch.rand(num_envs, 1, generator=gen),
                    keys.IS_FIRST: torch.zeros(num_envs, 1, dtype=torch.bool),
                    keys.TERMINATED: torch.zeros(num_envs, 1, dtype=torch.bool),
                },
                batch_size=[num_envs],
            )
        )
    return pool


def make_row(pool: list[TensorDict], step: int) -> TensorDict:
    rows = pool[step % len(pool)].copy()
    num_envs = rows.batch_size[0]
    rows.set(STEP_KEY, torch.full((num_envs,), step, dtype=torch.int64))
    rows.set(STREAM_KEY, torch.arange(num_envs))
    return rows


class TorchRLPath:
    """torchrl's own route: ndim=2 storage [rows_per_env, num_envs] + SliceSampler on a per-stream
    trajectory id. A plain ReplayBuffer: TensorDictReplayBuffer fails to extend ndim=2 storages
    one step at a time (it cannot write its "index" entry, shapes [N, 2] vs [N, 1])."""

    def __init__(self, capacity, num_envs, seq_len, batch_size, storage, path, seed):
        if storage == "memory":
            store = LazyTensorStorage(capacity, ndim=2)
        else:
            store = LazyMemmapStorage(capacity, scratch_dir=path, ndim=2)
        sampler = SliceSampler(
            slice_len=seq_len,
            traj_key=STREAM_KEY,
            strict_length=True,
            truncated_key=None,  # DreamerV3 needs no truncation marks...
            init_key=None,  # ...and resets on the stored is_first only
        )
        self.rb = ReplayBuffer(
            storage=store, sampler=sampler, generator=torch.Generator().manual_seed(seed)
        )
        self.set_shape(batch_size, seq_len)

    def set_shape(self, batch_size, seq_len):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rb.sampler.slice_len = seq_len

    def extend(self, rows):
        self.rb.extend(rows.unsqueeze(1))  # [num_envs, T=1]; dim_extend=1 is time

    def sample(self):
        # A flat [B * T] batch, slice after slice.
        flat = self.rb.sample(self.batch_size * self.seq_len)
        return flat.reshape(self.batch_size, self.seq_len)


class OursPath:
    """SequenceReplay; ``reuse`` passes the previous batch as ``out`` (no fresh allocation)."""

    def __init__(self, capacity, num_envs, seq_len, batch_size, storage, path, seed, reuse=False):
        self.replay = SequenceReplay(
            capacity, num_envs, seq_len, batch_size, storage=storage, path=path, seed=seed
        )
        self.reuse, self.last = reuse, None

    def extend(self, rows):
        self.replay.extend(rows)

    def sample(self):
        self.last = self.replay.sample(out=self.last if self.reuse else None)
        return self.last


def window_ok(batch: TensorDict, lowest: int, highest: int) -> float:
    """Fraction of windows made of consecutive steps of one stream within [lowest, highest]."""
    step = batch[STEP_KEY]
    ok = (step.diff(dim=1) == 1).all(1) & (step.min(1).values >= lowest)
    ok &= step.max(1).values <= highest
    ok &= (batch[STREAM_KEY] == batch[STREAM_KEY][:, :1]).all(1)
    return ok.float().mean().item()


def timed_samples(path, pool, step, reps, write_between):
    """Sample latencies (ms); with ``write_between`` one agent step is written before each."""
    times, ok = [], []
    path.sample()  # warm-up
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        if write_between:
            path.extend(make_row(pool, step))
            step += 1
        start = time.perf_counter()
        batch = path.sample()
        times.append((time.perf_counter() - start) * 1e3)
        ok.append(window_ok(batch, step - path_rows(path), step - 1))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / reps
    return times, ok, step, faults


def boundary_ms(path, pool, step, reps) -> float:
    """torchrl only: the part of a sample that rebuilds trajectory boundaries from the storage."""
    times = []
    for i in range(reps):
        path.extend(make_row(pool, step + i))
        start = time.perf_counter()
        path.rb.sampler._get_stop_and_length(path.rb.storage)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def path_rows(path) -> int:
    """Rows per stream held once the ring is full (the valid range is the last this many)."""
    if isinstance(path, OursPath):
        return path.replay.rows_per_env
    return path.rb.storage.shape[0]


def run_case(kind, capacity, num_envs, storage, pool, reps, workdir, seed=0):
    reuse = kind == "ours_out"
    cls = TorchRLPath if kind == "torchrl" else functools.partial(OursPath, reuse=reuse)
    results = []
    shapes = [(16, 64), (16, 50)]
    path_dir = None
    if storage == "disk":
        path_dir = Path(tempfile.mkdtemp(prefix=f"{kind}_", dir=workdir))
    first = cls(capacity, num_envs, shapes[0][1], shapes[0][0], storage, path_dir, seed)
    steps_to_fill = capacity // num_envs + capacity // num_envs // 4  # wrap the ring
    start = time.perf_counter()
    for step in range(steps_to_fill):
        first.extend(make_row(pool, step))
    fill_s = time.perf_counter() - start
    extend_rows_per_s = steps_to_fill * num_envs / fill_s
    step = steps_to_fill
    for batch_size, seq_len in shapes:
        if (batch_size, seq_len) == shapes[0]:
            path = first
        elif kind != "torchrl":
            # A second replay on the same data: the memory one copies it, the disk one reattaches.
            path = cls(capacity, num_envs, seq_len, batch_size, storage, path_dir, seed)
            path.replay.load_state_dict(first.replay.state_dict())
        else:
            path = first
            path.set_shape(batch_size, seq_len)
        times, ok, step, faults = timed_samples(path, pool, step, reps, write_between=True)
        row = {
            "path": kind,
            "storage": storage,
            "capacity": capacity,
            "num_envs": num_envs,
            "batch": f"{batch_size}x{seq_len}",
            "extend_rows_per_s": round(extend_rows_per_s),
            "sample_ms_median": round(statistics.median(times), 3),
            "sample_ms_p90": round(sorted(times)[int(0.9 * (len(times) - 1))], 3),
            "windows_ok": min(ok),
            "page_faults_per_sample": round(faults),
            "reps": reps,
        }
        if kind == "torchrl":
            cached, _, step, _ = timed_samples(path, pool, step, reps, write_between=False)
            row["sample_ms_median_cached"] = round(statistics.median(cached), 3)
            row["boundaries_ms_median"] = round(boundary_ms(path, pool, step, reps), 3)
            step += reps
        results.append(row)
        print_row(row)
    del first, path
    gc.collect()
    if path_dir is not None:
        shutil.rmtree(path_dir, ignore_errors=True)
    return results


def gather_ms(capacity: int, num_envs: int, reps: int) -> dict:
    """The gather alone, 16 x 64 rows of [3, 64, 64] uint8 from a [rows_per_env, num_envs] block:
    TensorDict-style advanced indexing (torchrl's path) vs index_select on a flat view (ours)."""
    rows_per_env, (batch_size, seq_len) = capacity // num_envs, (16, 64)
    block = torch.randint(0, 256, (rows_per_env, num_envs, 3, 64, 64), dtype=torch.uint8)
    flat = block.view(rows_per_env * num_envs, 3, 64, 64)
    gen = torch.Generator().manual_seed(0)
    result = {}
    for name in ("advanced_indexing", "index_select"):
        times = []
        for _ in range(reps):
            env = torch.randint(num_envs, (batch_size, 1), generator=gen)
            start = torch.randint(rows_per_env - seq_len, (batch_size, 1), generator=gen)
            time_index = start + torch.arange(seq_len)
            begin = time.perf_counter()
            if name == "advanced_indexing":
                block[time_index, env]
            else:
                flat.index_select(0, (time_index * num_envs + env).view(-1))
            times.append((time.perf_counter() - begin) * 1e3)
        result[name] = round(statistics.median(times), 3)
    return result


HEADER = (
    f"{'path':9} {'storage':7} {'capacity':>9} {'batch':>6} {'extend rows/s':>14} "
    f"{'sample ms (med)':>16} {'p90':>8} {'cached':>8} {'bounds':>7} {'faults':>7} "
    f"{'windows ok':>10}"
)


def print_row(row):
    cached = row.get("sample_ms_median_cached")
    bounds = row.get("boundaries_ms_median")
    print(
        f"{row['path']:9} {row['storage']:7} {row['capacity']:>9} {row['batch']:>6} "
        f"{row['extend_rows_per_s']:>14} {row['sample_ms_median']:>16.2f} "
        f"{row['sample_ms_p90']:>8.2f} {'' if cached is None else f'{cached:.2f}':>8} "
        f"{'' if bounds is None else f'{bounds:.2f}':>7} {row['page_faults_per_sample']:>7} "
        f"{row['windows_ok']:>10.2f}",
        flush=True,
    )


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "nproc": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "tensordict": tensordict.__version__,
        "platform": platform.platform(),
        # Other jobs on a 2-core machine move the numbers; the load says how busy it was.
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_markdown(path: Path, results: list[dict], info: dict, command: str, gather: dict) -> None:
    """Write the table between the BEGIN/END markers of ``path``, keeping the text around it."""
    lines = [
        BEGIN,
        f"Command: `{command}`  ",
        f"Machine: {info['cpu']}, {info['nproc']} cores; torch {info['torch']}, "
        f"torchrl {info['torchrl']}, tensordict {info['tensordict']}; load average "
        f"{info['loadavg_1min_at_start']} at start. "
        f"{results[0]['num_envs']} env streams, pixels uint8 [3, 64, 64]; median of "
        f"{results[0]['reps']} samples, each after one agent step was written.",
        "",
        f"Gather alone, 16 x 64 rows at {results[0]['capacity']} rows: advanced indexing "
        f"{gather['advanced_indexing']:.2f} ms, index_select on a flat view "
        f"{gather['index_select']:.2f} ms (median).",
        "",
        "| path | storage | capacity (rows) | batch B x T | extend rows/s | sample ms (median) "
        "| p90 | torchrl cached ms | torchrl boundaries ms | faults | windows ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cached = r.get("sample_ms_median_cached")
        bounds = r.get("boundaries_ms_median")
        lines.append(
            f"| {r['path']} | {r['storage']} | {r['capacity']} | {r['batch']} | "
            f"{r['extend_rows_per_s']} | {r['sample_ms_median']:.2f} | {r['sample_ms_p90']:.2f} | "
            f"{'' if cached is None else f'{cached:.2f}'} | "
            f"{'' if bounds is None else f'{bounds:.2f}'} | {r['page_faults_per_sample']} | "
            f"{r['windows_ok']:.2f} |"
        )
    lines.append(END)
    table = "\n".join(lines)
    text = path.read_text() if path.exists() else "# Replay benchmark (CPU)\n\n" + BEGIN + END
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + table + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


def main() -> None:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1e4 rows only, fewer repetitions")
    parser.add_argument("--capacities", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--num-envs", type=int, default=4, help="parallel env streams")
    parser.add_argument("--reps", type=int, default=100, help="timed samples per case")
    parser.add_argument("--workdir", default=None, help="where disk storages go (a temp dir)")
    parser.add_argument("--out", default="docs/results/replay_cpu", help="JSON/markdown stem")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.quick:
        args.capacities, args.reps = [10_000], 30
    logging.getLogger("torchrl").setLevel(logging.WARNING)  # silence storage-init INFO lines
    torch.manual_seed(0)
    info = machine()
    print(f"{info['cpu']} | {info['nproc']} cores | torch {info['torch']} | "
          f"torchrl {info['torchrl']} | tensordict {info['tensordict']}")  # fmt: skip
    pool = row_pool(args.num_envs, 64)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_replay_"))
    workdir.mkdir(parents=True, exist_ok=True)
    gather = gather_ms(args.capacities[0], args.num_envs, args.reps)
    print(f"gather alone, 16x64 at {args.capacities[0]} rows: {gather} ms (median)")
    print(HEADER)
    results = []
    try:
        for capacity in args.capacities:
            for storage in ("memory", "disk"):
                for kind in ("torchrl", "ours", "ours_out"):
                    results += run_case(
                        kind, capacity, args.num_envs, storage, pool, args.reps, workdir
                    )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    command = "OMP_WAIT_POLICY=PASSIVE python " + " ".join(sys.argv)
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": command,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": info,
            "pixels": [3, 64, 64],
            "action_dim": ACTION_DIM,
            "gather_16x64_ms": {"capacity": args.capacities[0], **gather},
            "results": results,
        }
        out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        write_markdown(out.with_suffix(".md"), results, info, command, gather)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
