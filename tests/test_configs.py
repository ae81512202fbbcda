"""The shipped configuration (configs/) against SPEC §7 and docs/math.md, and the library's
code defaults against the shipped configuration (a library user gets the trained agent)."""

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from aefrl.envs.dmc import make_dmc_env
from aefrl.loop import LoopConfig
from agents.dreamer import DreamerAgent
from tests.world_model.conftest import ACTIONS, OBS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def cfg() -> dict:
    """``configs/config.yaml`` with its default groups, as scripts/train.py composes it."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("config"), resolve=False)


def test_shipped_defaults_are_the_specs(cfg):
    """SPEC §7: λ = 0.95, γ = 0.997, horizon 15, batch 16 × 64, train ratio 512, action
    repeat 2, 255-bin symlog two-hot reward and critic heads, a tanh-squashed Gaussian actor;
    SPEC §1: 64 × 64 frames; docs/math.md: the VAE's KL balanced 0.5 / 0.1 with 1 free nat.
    Fails if a config file drifts from the documented recipe."""
    agent = cfg["agent"]
    assert agent["name"] == "dreamer" and cfg["obs_model"]["kind"] == "aef"
    assert agent["actor_loss"]["lmbda"] == 0.95
    assert agent["actor_loss"]["gamma"] == 0.997
    assert agent["actor_loss"]["horizon"] == 15
    assert (cfg["replay"]["batch_size"], cfg["replay"]["seq_len"]) == (16, 64)
    assert cfg["loop"]["train_ratio"] == 512
    assert cfg["env"]["action_repeat"] == 2 and cfg["env"]["image_size"] == 64
    assert agent["world_model"]["reward_bins"] == 255 and agent["critic"]["bins"] == 255
    assert agent["actor"]["dist"] == "tanh_normal"
    wm_loss = agent["wm_loss"]
    assert wm_loss["kl_dyn_scale"] == 0.5 and wm_loss["kl_rep_scale"] == 0.1
    assert wm_loss["free_nats"] == 1.0
    assert wm_loss["loss_scales"] == {"obs": 1.0, "latent": 1.0, "reward": 1.0, "continue": 1.0}


def test_library_defaults_are_the_shipped_config(cfg):
    """A DreamerAgent built without the config's loss, optimiser and critic settings (tiny
    networks only) has the shipped values: the world-model loss's free nats and KL scales, the
    actor loss's γ, λ, horizon, entropy bonus and bootstrap, the value loss's pull, the slow
    critic's rate and each optimiser's learning rate, clip norm and ε. LoopConfig and
    make_dmc_env default to the shipped schedule and action repeat. Fails if a code default and
    the config part ways (a library user would train another agent than scripts/train.py)."""
    a = cfg["agent"]
    agent = DreamerAgent(
        OBS,
        ACTIONS,
        world_model=dict(latent_dim=3, deter=8, hidden=16, layers=1, depth=4),
        actor=dict(hidden=16, layers=1),
        critic=dict(hidden=16, layers=1),
    )
    wm_loss = agent.wm_loss
    assert wm_loss.free_nats == a["wm_loss"]["free_nats"]
    assert wm_loss.kl_dyn_scale == a["wm_loss"]["kl_dyn_scale"]
    assert wm_loss.kl_rep_scale == a["wm_loss"]["kl_rep_scale"]
    assert wm_loss.loss_scales == a["wm_loss"]["loss_scales"]
    actor_loss = agent.actor_loss
    assert actor_loss.gamma == a["actor_loss"]["gamma"]
    assert actor_loss.lmbda == a["actor_loss"]["lmbda"]
    assert actor_loss.horizon == a["actor_loss"]["horizon"]
    assert actor_loss.entropy_coef == a["actor_loss"]["entropy_coef"]
    assert actor_loss.bootstrap == a["actor_loss"]["bootstrap"]
    assert actor_loss.actor_input_grad == a["actor_loss"]["actor_input_grad"]
    assert agent.value_loss.slow_reg == a["value_loss"]["slow_reg"]
    assert agent.slow_critic.tau == a["slow_critic_tau"]
    assert agent.actor.dist == a["actor"]["dist"]
    for name, opt in agent.optimizers.items():
        group = opt.param_groups[0]
        assert group["lr"] == a["lr"][name], name
        assert group["eps"] == a["adam_eps"], name
        assert agent.grad_clip[name] == a["grad_clip"][name], name
    loop = LoopConfig()
    assert loop.train_ratio == cfg["loop"]["train_ratio"]
    assert (loop.batch_size, loop.seq_len) == (
        cfg["replay"]["batch_size"],
        cfg["replay"]["seq_len"],
    )
    assert loop.action_repeat == cfg["env"]["action_repeat"]
    assert loop.prefill_steps == cfg["loop"]["prefill_steps"]
    env_defaults = inspect.signature(make_dmc_env).parameters
    assert env_defaults["action_repeat"].default == cfg["env"]["action_repeat"]
    assert env_defaults["image_size"].default == cfg["env"]["image_size"]
