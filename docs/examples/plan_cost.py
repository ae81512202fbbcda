"""What planning with torchrl over aefrl's imagination env costs here (the tables in docs/reuse.md).

    OMP_WAIT_POLICY=PASSIVE python docs/examples/plan_cost.py            # ~5 min on 2 CPU cores

1. Seconds per plan (one environment step of the planner agent) for the world-model sizes of
   exp=smoke, exp=cpu and the default configuration, with PlaNet's CEM budget (horizon 12,
   1000 candidates, top 100, 10 iterations), the same budget with MPPI, and a cheaper CEM.
   Median and minimum of 5 plans after a warm-up, untrained weights (the cost does not depend
   on them).
2. Milliseconds per step of a 12-step rollout of 1000 candidates: the networks alone, through
   torchrl's ``env.rollout``, and through it with the TensorDictModules in the step (what
   ``ModelBasedEnvBase._step`` would do); best of 40, interleaved.
"""

import os
import statistics
import time

import torch
from tensordict import TensorDict
from torchrl.envs.model_based import ModelBasedEnvBase

from aefrl.envs import ImaginationEnv
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


def plan_seconds() -> None:
    print("| world model | planner | median | min |\n|---|---|---|---|")
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
            print(f"| {size} | {name} | {statistics.median(times):.2f} s | {min(times):.2f} s |")


class _Actions:
    """Feeds precomputed actions to ``env.rollout``, as torchrl's planners do."""

    def __init__(self, actions: torch.Tensor) -> None:
        self.actions, self.t = actions, 0

    def __call__(self, tensordict):
        tensordict.set("action", self.actions[:, self.t])
        self.t += 1
        return tensordict


@torch.no_grad()
def rollout_overhead(candidates: int = 1000, horizon: int = 12) -> None:
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
    for _ in range(40):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
    print("\n| exp=smoke sizes, 1000 candidates | ms per step |\n|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds / horizon * 1e3:.2f} |")


if __name__ == "__main__":
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}\n")
    plan_seconds()
    rollout_overhead()
