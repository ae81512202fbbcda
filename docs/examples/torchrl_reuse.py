"""Drive an aefrl world model from plain torchrl code: plan one DMC episode with CEMPlanner.

    python docs/examples/torchrl_reuse.py runs/cartpole-swingup/dreamer-aef/s0-...  # a trained run
    python docs/examples/torchrl_reuse.py  # no checkpoint: fits a tiny world model first (CI)

The world model filters each real frame with its posterior (a TensorDictModule on the keys
pixels / prev_action / is_first / belief / state), torchrl's CEMPlanner searches actions in
imagination (aefrl's ImaginationEnv, a torchrl ModelBasedEnvBase scored by the reward head), and
the first planned action is executed in the real DMC env. Prints the episode's return and
length (agent steps).
See docs/reuse.md.
"""

import argparse

import torch
from tensordict import TensorDict
from torchrl.envs.utils import step_mdp
from torchrl.modules import CEMPlanner

from aefrl.checkpoint import CheckpointError, load_checkpoint
from aefrl.envs import ImaginationEnv, make_dmc_env
from aefrl.layout import arrival_rows
from aefrl.objectives import WorldModelLoss
from aefrl.world_model import WorldModel
from aefrl.world_model.modules import world_model_from_checkpoint, world_model_modules


def tiny_world_model(env, updates: int = 30) -> WorldModel:
    """Fit a tiny AEF world model to one random episode: enough to run, not to plan well."""
    ep = env.rollout(10_000)  # random actions until the episode ends; torchrl's step layout
    batch = arrival_rows(ep).unsqueeze(0)  # aefrl's arrival layout, [B=1, T + 1]
    wm = WorldModel((3, 64, 64), ep["action"].shape[-1], latent_dim=4, deter=32, hidden=32, depth=8)
    loss, opt = WorldModelLoss(wm), torch.optim.Adam(wm.parameters(), lr=3e-3)
    for _ in range(updates):
        opt.zero_grad()
        loss.total(loss(batch)).backward()
        opt.step()
    return wm.eval()


def main(checkpoint: str | None = None) -> float:
    torch.manual_seed(0)
    if checkpoint:  # a run directory or checkpoint.pt written by scripts/train.py
        state = load_checkpoint(checkpoint)
        wm = world_model_from_checkpoint(state)  # first: it checks that the file is a run's
        conf = state["run_config"]["env"]  # the run's task, frames and episode length
        settings = ("image_size", "action_repeat", "render", "time_limit")
        env = make_dmc_env(conf["task"], **{k: conf[k] for k in settings if k in conf})
    else:
        env = make_dmc_env("cartpole-swingup", render="fast", time_limit=1.0)
        wm = tiny_world_model(env)
    posterior = world_model_modules(wm)["posterior"]  # filters o_t into belief h_t, state z_t
    # PlaNet plans with 10 iterations x 1000 candidates; these sizes are cheaper for a CPU.
    planner = CEMPlanner(ImaginationEnv(wm), 12, optim_steps=5, num_candidates=300, top_k=30)
    carry = TensorDict(belief=torch.zeros(wm.rssm.deter), state=torch.zeros(wm.rssm.latent_dim))
    carry.update(prev_action=torch.zeros(wm.action_dim), is_first=torch.ones(1, dtype=torch.bool))
    td, total, steps = env.reset(), 0.0, 0
    with torch.no_grad():
        while True:
            carry = posterior(carry.set("pixels", td["pixels"]))
            action = planner(carry.select("belief", "state"))["action"]  # [A] in [-1, 1]
            td = env.step(td.set("action", action))
            total, steps = total + td["next", "reward"].item(), steps + 1
            if td["next", "done"].any():
                break
            td = step_mdp(td)  # the next observation becomes the current one
            carry.update(prev_action=action, is_first=torch.zeros(1, dtype=torch.bool))
    env.close()
    print(f"return {total:.2f} over {steps} steps")  # agent steps of action_repeat frames
    return total


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint",
        nargs="?",
        help="a run directory written by scripts/train.py, or its checkpoint.pt (default: none, "
        "fit a tiny world model first)",
    )
    try:
        main(parser.parse_args().checkpoint)
    except CheckpointError as exc:  # missing, or not a run's: one sentence, not a traceback
        parser.exit(2, f"error: {exc}\n")
