"""agents.factory: sizes in the agent config are refused by their config key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agents.factory import build_agent

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def config(*overrides):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        preset = [] if any(o.startswith("exp=") for o in overrides) else ["exp=smoke"]
        cfg = compose("config", overrides=[*preset, *overrides])
    return OmegaConf.to_container(cfg.agent), OmegaConf.to_container(cfg.obs_model)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["agent.actor.hidden=0"], "agent.actor.hidden must be an integer >= 1, got 0"),
        (["agent.world_model.deter=-3"], "agent.world_model.deter must be an integer >= 1"),
        (["agent.critic.layers=2.5"], "agent.critic.layers must be an integer >= 0, got 2.5"),
        (["agent.world_model.reward_bins=1"], "reward_bins must be an integer >= 2"),
        (["agent.actor_loss.horizon=0"], "agent.actor_loss.horizon must be an integer >= 1"),
        (["agent=planner", "agent.planner.candidates=0"], "agent.planner.candidates must be"),
    ],
)
def test_bad_sizes_name_their_key(overrides, message):
    agent, obs_model = config(*overrides)
    with pytest.raises(ValueError, match=message):
        build_agent(agent, obs_model, (3, 64, 64), 1)


def test_the_presets_pass():
    for exp in ("smoke", "cpu", "default"):
        for name in ("dreamer", "planner"):
            agent, obs_model = config(f"exp={exp}", f"agent={name}")
            built = build_agent(agent, obs_model, (3, 64, 64), 2)
            assert type(built).__name__.lower().startswith(name)
