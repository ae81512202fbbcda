"""What planning with torchrl over aefrl's imagination env costs here (the tables in docs/reuse.md).

    OMP_WAIT_POLICY=PASSIVE python docs/examples/plan_cost.py            # ~5 min on 2 CPU cores

Prints both tables and writes them, with the machine and load, to
``docs/results/reuse/plan_cost.{json,md}`` (another path as the first argument).

1. Seconds per plan (one environment step of the planner agent) for the world-model sizes of
   exp=smoke, exp=cpu and the default configuration, with PlaNet's CEM budget (horizon 12,
   1000 candidates, top 100, 10 iterations), the same budget with MPPI, and a cheaper CEM.
   Median and minimum of 5 plans after a warm-up, untrained weights (the cost does not depend
   on them).
2. Milliseconds per step of a 12-step rollout of 1000 candidates: the networks alone, through
   torchrl's ``env.rollout``, and through it with the TensorDictModules in the step (what
   ``ModelBasedEnvBase._step`` would do); best of 40, interleaved.
"""

import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tensordict import TensorDict
from torchrl.envs.model_based import ModelBasedEnvBase

from aefrl.bench.timing import load_average
from aefrl.envs import ImaginationEnv
from aefrl.provenance import command_line, machine_info, write_result
from aefrl.world_model import RSSMState, WorldModel
from agents.planner import PlannerAgent

SIZES = {
    "smoke": dict(deter=32, hidden=32, layers=1, depth=4, latent_dim=4),
    "cpu": dict(deter=200, hidden=200, depth=16, latent_dim=32),
    "default": dict(deter=256, hidden=256, depth=32, latent_dim=32),
}
PLANS = {
    "CEM 12 x 1000 x 10, top 100 (PlaNet)": dict(method="cem"),
    "MPPI 12 x 1000 x 10, top 100": dict(method="mppi"),
    "CEM 12 x 300 x 5, top 30": dict(method="cem", candidates=300, top_k=30, iterations=5),
}


OUT = Path(__file__).resolve().parents[1] / "results" / "reuse" / "plan_cost.json"


def plan_seconds() -> list[dict]:
    """One row per world-model size and planner: ``{world_model, planner, times_s, median_s,
    min_s}``."""
    rows = []
    for size, wm in SIZES.items():
        for name, plan in PLANS.items():
            torch.manual_seed(0)
            agent = PlannerAgent((3, 64, 64), 1, world_model=wm, planner=plan)
            h, z = torch.zeros(1, wm["deter"]), torch.zeros(1, wm["latent_dim"])
            agent.plan(h, z)  # warm-up
            times = []
            for _ in range(5):
                start = time.perf_counter()
                agent.plan(h, z)
                times.append(time.perf_counter() - start)
            rows.append(
                {
                    "world_model": size,
                    "planner": name,
                    "times_s": [round(t, 4) for t in times],
                    "median_s": round(statistics.median(times), 4),
                    "min_s": round(min(times), 4),
                }
            )
            print(rows[-1])
    return rows


class _Actions:
    """Feeds precomputed actions to ``env.rollout``, as torchrl's planners do."""

    def __init__(self, actions: torch.Tensor) -> None:
        self.actions, self.t = actions, 0

    def __call__(self, tensordict):
        tensordict.set("action", self.actions[:, self.t])
        self.t += 1
        return tensordict


@torch.no_grad()
def rollout_overhead(candidates: int = 1000, horizon: int = 12, reps: int = 40) -> dict[str, float]:
    """Best milliseconds per rollout step of each way of stepping the imagination."""
    torch.manual_seed(0)
    wm = WorldModel((3, 64, 64), 1, **SIZES["smoke"])
    actions = torch.rand(candidates, horizon, 1) * 2 - 1
    start = RSSMState(torch.randn(candidates, 32), torch.randn(candidates, 4))
    env, with_modules = ImaginationEnv(wm), ImaginationEnv(wm)
    with_modules._step = lambda td: ModelBasedEnvBase._step(with_modules, td)
    td = env.reset(TensorDict({"belief": start.h, "state": start.z}, [candidates]), set_state=True)

    def networks():
        state = start
        for t in range(horizon):
            state = wm.rssm.img_step(state, actions[:, t])
            wm.reward_head(state.feat).mean  # noqa: B018

    def rollout(e):
        return lambda: e.rollout(
            horizon, _Actions(actions), auto_reset=False, tensordict=td.clone()
        )

    runs = {
        "networks only": networks,
        "env.rollout": rollout(env),
        "env.rollout, TensorDictModules in the step": rollout(with_modules),
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(reps):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: round(seconds / horizon * 1e3, 3) for name, seconds in best.items()}


def markdown(result: dict) -> str:
    m, la = result["machine"], result["load_average"]
    lines = [
        f"Command: `{result['command']}` (started {result['started']}).  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, GPU "
        f"{m['gpu'] or 'none'}; torch {m['torch']}, torchrl {m['torchrl']}; git {m['git']}. "
        f"Load average {la['start']} at start, {la['end']} at end.",
        "",
        "Seconds per plan (median and minimum of 5 after a warm-up), horizon x candidates x "
        "iterations:",
        "",
        "| world model | planner | median | min |",
        "|---|---|---|---|",
    ]
    for r in result["plan_seconds"]:
        lines.append(
            f"| {r['world_model']} | {r['planner']} | {r['median_s']:.2f} s | {r['min_s']:.2f} s |"
        )
    lines += ["", "| exp=smoke sizes, 1000 candidates | ms per step |", "|---|---|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in result["rollout_ms_per_step"].items()]
    return "\n".join(lines) + "\n"


def main(out: Path = OUT) -> dict:
    result = {
        "command": command_line("docs/examples/plan_cost.py"),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average": {"start": load_average()},
    }
    result["plan_seconds"] = plan_seconds()
    result["rollout_ms_per_step"] = rollout_overhead()
    result["load_average"]["end"] = load_average()
    md = markdown(result)
    write_result(out, result, md)
    print(md)
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
