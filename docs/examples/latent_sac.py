"""Train torchrl's SAC on a trained aefrl world model's latents (model-free reuse).

    python docs/examples/latent_sac.py runs/cartpole-swingup/dreamer-aef/s0-... --steps 50000
    python docs/examples/latent_sac.py --steps 150  # no checkpoint: an untrained tiny model (CI)

Every frame of a real DMC env is filtered by the run's frozen world model
(aefrl.envs.LatentObservation), and torchrl's own SAC pieces learn on [h_t, z_t]: Collector
(whose random first steps the latents follow too: the transform filters with the action the env
executed), ReplayBuffer, SACLoss with two Q-networks, SoftUpdate. The env is the run's own
(task, image size, action repeat, renderer, episode length from its run_config). Prints the
mean return of the training episodes finished and one deterministic evaluation episode's.
See docs/reuse.md.
"""

import argparse

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.envs import CatTensors, Compose, RewardSum, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import SACLoss, SoftUpdate

from aefrl.checkpoint import CheckpointError, load_checkpoint
from aefrl.envs import LatentObservation, make_dmc_env
from aefrl.world_model import WorldModel
from aefrl.world_model.modules import world_model_from_checkpoint

ENV_SETTINGS = ("image_size", "action_repeat", "render", "time_limit")


def world_model_and_env(checkpoint: str | None, seed: int):
    """The run's world model and a fresh env of its own settings; without a checkpoint an
    untrained tiny AEF model and cartpole-swingup in 1 s episodes (fast rendering)."""
    if checkpoint is None:
        wm = WorldModel((3, 64, 64), 1, "aef", latent_dim=4, deter=32, hidden=32, depth=4)
        return wm, make_dmc_env("cartpole-swingup", render="fast", time_limit=1.0, seed=seed)
    state = load_checkpoint(checkpoint)
    wm = world_model_from_checkpoint(state)
    conf = state["run_config"]["env"]
    return wm, make_dmc_env(conf["task"], seed=seed, **{k: conf[k] for k in ENV_SETTINGS})


def sac(features: int, env, hidden: int = 256) -> tuple[ProbabilisticActor, SACLoss]:
    """A tanh-Gaussian actor and SAC's loss with two Q-networks on ``observation [F]``."""
    actions = env.action_spec.shape[-1]
    actor = ProbabilisticActor(
        TensorDictModule(
            nn.Sequential(
                MLP(in_features=features, out_features=2 * actions, num_cells=[hidden, hidden]),
                NormalParamExtractor(),
            ),
            in_keys=["observation"],
            out_keys=["loc", "scale"],
        ),
        in_keys=["loc", "scale"],
        spec=env.action_spec,
        distribution_class=TanhNormal,
    )
    qvalue = ValueOperator(
        MLP(in_features=features + actions, out_features=1, num_cells=[hidden, hidden]),
        in_keys=["observation", "action"],
    )
    return actor, SACLoss(actor, qvalue, num_qvalue_nets=2, action_spec=env.action_spec)


def main(checkpoint: str | None, steps: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    wm, base = world_model_and_env(checkpoint, seed)
    latents = Compose(
        LatentObservation(wm),
        CatTensors(["belief", "state"], "observation", del_keys=False),
        RewardSum(),
    )
    env = TransformedEnv(base, latents)
    features = env.observation_spec["observation"].shape[-1]
    actor, loss = sac(features, env)
    target = SoftUpdate(loss, eps=0.995)
    optimiser = torch.optim.Adam(loss.parameters(), lr=3e-4)
    batch = 64  # agent steps per collection, and updates after it
    batches = -(-steps // batch)  # torchrl collects whole batches
    collector = Collector(
        env,
        actor,
        frames_per_batch=batch,
        total_frames=batches * batch,
        init_random_frames=min(1000 // batch, batches // 2) * batch,  # uniform random actions
        auto_register_policy_transforms=False,  # the actor is not recurrent: it needs none
    )
    # Only the latents go to the replay: the frames have done their work.
    replay = ReplayBuffer(storage=LazyTensorStorage(100_000), batch_size=256)
    returns, updates = [], 0
    for data in collector:
        data = data.reshape(-1).exclude("pixels", ("next", "pixels"))
        replay.extend(data)
        done = data["next", "done"].squeeze(-1)
        returns += data["next", "episode_reward"][done].squeeze(-1).tolist()
        if len(replay) < collector.init_random_frames:
            continue
        for _ in range(batch):  # one update per agent step
            out = loss(replay.sample())
            total = out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]
            optimiser.zero_grad()
            total.backward()
            optimiser.step()
            target.step()
            updates += 1
    collector.shutdown(close_env=False)  # the evaluation below runs on it
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        episode = env.rollout(10_000, actor)  # to the episode's end
    env.close()
    print(f"{collector.total_frames} steps, {updates} SAC updates")
    if returns:
        print(f"train return {sum(returns) / len(returns):.2f} over {len(returns)} episodes")
    else:
        print("no training episode finished")
    print(f"eval return {episode['next', 'reward'].sum().item():.2f} over {len(episode)} steps")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint",
        nargs="?",
        help="a run directory written by scripts/train.py, or its checkpoint.pt (default: none, "
        "an untrained tiny world model)",
    )
    parser.add_argument("--steps", type=int, default=50_000, help="agent steps to collect")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 1:
        parser.exit(2, f"error: --steps must be at least 1, got {args.steps}\n")
    try:
        main(args.checkpoint, args.steps, args.seed)
    except CheckpointError as exc:  # missing, or not a run's: one sentence, not a traceback
        parser.exit(2, f"error: {exc}\n")
