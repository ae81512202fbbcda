"""Benchmark DMC pixel collection on CPU: torchrl's stock DMControlEnv vs aefrl's make_dmc_env.

Measures agent steps/s and frames/s (frames = agent steps x action repeat) with random actions,
warm-up excluded, for walker-walk and cartpole-swingup:

* ``torchrl``: ``DMControlEnv(domain, task, from_pixels=True, frame_skip=2)`` as shipped; it
  renders 240x320 HWC after every sub-step and cannot be given a render size (``render_kwargs``
  is passed on to the task, which raises ``TypeError``);
* ``torchrl-64``: ``DMControlWrapper(suite.load(...), from_pixels=True, frame_skip=2,
  render_kwargs=dict(height=64, width=64))``, the closest stock equivalent of ours;
* ``aefrl``: ``make_dmc_env(task, render="faithful" | "fast")``, and ``num_envs`` 2 and 4
  (torchrl ParallelEnv, spawn).

It also measures how far our frames are from dm_control's ``physics.render(64, 64, camera_id=0)``.
Each measurement runs in its own python process, so GL contexts and thread settings never mix.
Writes docs/results/collect_cpu.json and the table block of docs/results/collect_cpu.md.

Usage: python scripts/bench_collect.py [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waits starve 2 cores

import argparse
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from aefrl.arguments import Parser

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "results" / "collect_cpu.json"
MD_PATH = ROOT / "docs" / "results" / "collect_cpu.md"
BEGIN, END = "<!-- bench_collect:begin -->", "<!-- bench_collect:end -->"
ACTION_REPEAT = 2
WARMUP_STEPS = 10


# --- one measurement (runs in a child process) -------------------------------------------------
def _make(case: dict):
    """Build the env for ``case``; returns (env, function giving renders so far or None)."""
    domain, task = case["task"].split("-", 1)
    if case["impl"] == "aefrl":
        from aefrl.envs import make_dmc_env

        env = make_dmc_env(case["task"], render=case["render"], num_envs=case["num_envs"])
        if case["num_envs"] > 1:
            return env, lambda: None  # renders happen in the workers
        return env, lambda: env.renderer.num_renders
    # dm_control reads MUJOCO_GL when imported: choose it first, the way aefrl does.
    from aefrl.envs.gl import select_gl_backend

    select_gl_backend()
    from dm_control.mujoco import engine
    from torchrl.envs import DMControlEnv, DMControlWrapper

    renders = [0]
    original = engine.Physics.render

    def counted(self, *args, **kwargs):
        renders[0] += 1
        return original(self, *args, **kwargs)

    engine.Physics.render = counted  # this child process only
    if case["impl"] == "torchrl":
        env = DMControlEnv(domain, task, from_pixels=True, pixels_only=True, frame_skip=2)
    else:
        from dm_control import suite

        env = DMControlWrapper(
            suite.load(domain, task),
            from_pixels=True,
            pixels_only=True,
            frame_skip=2,
            render_kwargs={"height": 64, "width": 64},
        )
    return env, lambda: renders[0]


def run_case(case: dict) -> dict:
    """Time ``case["steps"]`` random agent steps after a warm-up; returns the measurements."""
    import torch

    env, renders = _make(case)
    env.rollout(WARMUP_STEPS, break_when_any_done=False)  # GL context, first episode, caches
    first = env.reset()  # untimed, so that the timed part holds agent steps only
    before = renders()
    start = time.perf_counter()
    out = env.rollout(case["steps"], break_when_any_done=False, auto_reset=False, tensordict=first)
    seconds = time.perf_counter() - start
    after = renders()
    steps = case["steps"] * case["num_envs"]
    pixels = out["next", "pixels"]
    env.close()
    return {
        **case,
        "agent_steps": steps,
        "seconds": round(seconds, 3),
        "agent_steps_per_s": round(steps / seconds, 1),
        "frames_per_s": round(steps * ACTION_REPEAT / seconds, 1),
        "renders_per_agent_step": None if before is None else (after - before) / steps,
        "pixels": f"{list(pixels.shape[-3:])} {str(pixels.dtype).replace('torch.', '')}",
        "torch_threads": torch.get_num_threads(),
    }


def pixel_diff(task: str, frames: int) -> dict:
    """Mean / max |ours - physics.render(64, 64, camera_id=0)| over ``frames`` frames, per mode."""
    import numpy as np
    import torch
    from tensordict import TensorDict

    from aefrl.envs import make_dmc_env

    domain, name = task.split("-", 1)
    result = {}
    for render in ("faithful", "fast"):
        env = make_dmc_env(task, seed=0, render=render)
        from dm_control import suite  # after make_dmc_env chose MUJOCO_GL

        raw = suite.load(domain, name, task_kwargs={"random": 0})
        g = torch.Generator().manual_seed(0)
        ours, ref = [env.reset()["pixels"]], []
        raw.reset()
        ref.append(raw.physics.render(64, 64, camera_id=0))
        for _ in range(frames - 1):
            action = torch.rand(env.action_spec.shape, generator=g) * 2 - 1
            ours.append(env.step(TensorDict({"action": action}, []))["next", "pixels"])
            for _ in range(ACTION_REPEAT):
                raw.step(action.double().numpy())
            ref.append(raw.physics.render(64, 64, camera_id=0))
        a = torch.stack(ours).permute(0, 2, 3, 1).numpy().astype(np.int16)
        d = np.abs(a - np.stack(ref).astype(np.int16))
        result[render] = {
            "mean_abs_diff": round(float(d.mean()), 4),
            "max_abs_diff": int(d.max()),
            "fraction_differing": round(float((d > 0).mean()), 5),
            "frames": frames,
        }
        env.close()
    return {"task": task, **result}


# --- driver -------------------------------------------------------------------------------------
def _child(kind: str, payload) -> dict:
    """Run one measurement in a fresh python process and return its JSON result."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(payload)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind}{payload} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    import mujoco
    import torch
    import torchrl

    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "mujoco": mujoco.__version__,
        "dm_control": importlib.metadata.version("dm-control"),
        "MUJOCO_GL": os.environ.get("MUJOCO_GL"),
        # Other people's jobs share these cores; a high load average means noisier numbers.
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }


def _cases(quick: bool) -> list[dict]:
    steps = 60 if quick else 200
    tasks = ["walker-walk"] if quick else ["walker-walk", "cartpole-swingup"]
    cases = []
    for task in tasks:
        for impl, render in [
            ("torchrl", "dm_control 240x320"),
            ("torchrl-64", "dm_control 64x64"),
            ("aefrl", "faithful"),
            ("aefrl", "fast"),
        ]:
            cases.append({"impl": impl, "task": task, "render": render, "num_envs": 1})
    for num_envs in (2,) if quick else (2, 4):
        cases.append({"impl": "aefrl", "task": "walker-walk", "render": "faithful",
                      "num_envs": num_envs})  # fmt: skip
    for case in cases:
        # Fewer steps where a step is slow, so the whole run stays near 5 minutes.
        case["steps"] = steps // 2 if case["impl"] == "torchrl" else steps
    return cases


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        BEGIN,
        f"Command: `{report['command']}` ({report['wall_seconds']:.0f} s in all). "
        f"Machine: {m['cpu']}, {m['nproc']} cores (1-min load average "
        f"{m['load_average_1min_at_start']} at start, {m['load_average_1min_at_end']} at end), "
        f"MUJOCO_GL={m['MUJOCO_GL']}; torch {m['torch']}, torchrl {m['torchrl']}, "
        f"mujoco {m['mujoco']}, dm_control {m['dm_control']}. Random actions, "
        f"action repeat {ACTION_REPEAT}, {WARMUP_STEPS} warm-up steps excluded.",
        "",
        "| env | task | render | envs | pixels | agent steps/s | frames/s | renders/step |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in report["results"]:
        renders = "-" if r["renders_per_agent_step"] is None else f"{r['renders_per_agent_step']:g}"
        lines.append(
            f"| {r['impl']} | {r['task']} | {r['render']} | {r['num_envs']} | {r['pixels']} | "
            f"{r['agent_steps_per_s']:.1f} | {r['frames_per_s']:.1f} | {renders} |"
        )
    lines += [
        "",
        "Pixels vs dm_control's `physics.render(64, 64, camera_id=0)` (same seed and actions):",
        "",
        "| task | render | mean abs diff (/255) | max | fraction of values differing | frames |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for d in report["pixel_diff"]:
        for render in ("faithful", "fast"):
            x = d[render]
            lines.append(
                f"| {d['task']} | {render} | {x['mean_abs_diff']} | {x['max_abs_diff']} | "
                f"{x['fraction_differing']} | {x['frames']} |"
            )
    lines.append(END)
    return "\n".join(lines)


def _write_markdown(block: str) -> None:
    """Replace the generated block in the md file, keeping the hand-written text around it."""
    text = (
        MD_PATH.read_text()
        if MD_PATH.exists()
        else f"# DMC collection speed (CPU)\n\n{BEGIN}\n{END}\n"
    )
    if BEGIN not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    MD_PATH.write_text(head + block + tail)


def main() -> None:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="walker only, fewer steps (~1 min)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: KIND JSON_ARGS
    args = parser.parse_args()
    if args.child:
        kind, payload = args.child
        function = {"run_case": run_case, "pixel_diff": pixel_diff}[kind]
        print(json.dumps(function(*json.loads(payload))))
        return
    start = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)
    from aefrl.envs.gl import select_gl_backend

    select_gl_backend()  # once here; every child inherits MUJOCO_GL
    results = []
    for case in _cases(args.quick):
        r = _child("run_case", [case])
        results.append(r)
        print(
            f"{r['impl']:>10} {r['task']:>16} {r['render']:>18} envs={r['num_envs']} "
            f"{r['agent_steps_per_s']:7.1f} steps/s {r['frames_per_s']:7.1f} frames/s "
            f"renders/step={r['renders_per_agent_step']}",
            flush=True,
        )
    diff_tasks = ["walker-walk"] if args.quick else ["walker-walk", "cartpole-swingup"]
    diffs = [_child("pixel_diff", [task, 10 if args.quick else 30]) for task in diff_tasks]
    for d in diffs:
        print(d["task"], {k: v for k, v in d.items() if k != "task"}, flush=True)
    report = {
        "command": "python scripts/bench_collect.py" + (" --quick" if args.quick else ""),
        "machine": {**_machine(), "load_average_1min_at_start": load_at_start},
        "action_repeat": ACTION_REPEAT,
        "warmup_steps": WARMUP_STEPS,
        "results": results,
        "pixel_diff": diffs,
    }
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(report, indent=2) + "\n")
    _write_markdown(_markdown(report))
    print(f"wrote {JSON_PATH.relative_to(ROOT)} and {MD_PATH.relative_to(ROOT)} "
          f"in {report['wall_seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
