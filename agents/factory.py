"""Build an agent from plain configuration dicts (the ``agent`` and ``obs_model`` groups)."""

from __future__ import annotations

from aefrl.nn import check_size
from agents.dreamer import DreamerAgent
from agents.planner import build_planner

# Network sizes anywhere in the agent config, with their smallest valid value: checked by key so
# that the error names the setting (``agent.actor.hidden``), not the module it reaches.
SIZE_KEYS = {
    **{"deter": 1, "hidden": 1, "layers": 0, "depth": 1, "bins": 2, "reward_bins": 2},
    **{"horizon": 1, "candidates": 1, "top_k": 1, "iterations": 1},  # imagination, planning
}


def check_sizes(config: dict, prefix: str = "agent") -> None:
    """ValueError naming the first size key in ``config`` that is not an integer in range."""
    for key, value in config.items():
        if isinstance(value, dict):
            check_sizes(value, f"{prefix}.{key}")
        elif key in SIZE_KEYS:
            check_size(f"{prefix}.{key}", value, SIZE_KEYS[key])


def build_dreamer(agent: dict, obs_model: dict, obs_shape, action_dim: int) -> DreamerAgent:
    """A :class:`~agents.dreamer.DreamerAgent`; ``obs_model`` supplies the one switch
    (``kind``), ``latent_dim`` and the observation-model options."""
    kwargs = {k: v for k, v in agent.items() if k != "name"}
    kwargs["world_model"] = {
        **kwargs.get("world_model", {}),
        "obs_model": obs_model["kind"],
        "latent_dim": obs_model["latent_dim"],
        "obs_options": dict(obs_model.get("options") or {}),
    }
    return DreamerAgent(obs_shape, action_dim, **kwargs)


AGENTS = {"dreamer": build_dreamer, "planner": build_planner}


def build_agent(agent: dict, obs_model: dict, obs_shape, action_dim: int):
    """Build the agent named ``agent["name"]``; ValueError names the accepted agents."""
    name = agent.get("name")
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; accepted: {', '.join(sorted(AGENTS))}")
    check_sizes(agent)
    try:
        return AGENTS[name](agent, obs_model, obs_shape, action_dim)
    except TypeError as exc:  # an unknown key deep in the config
        raise ValueError(f"bad agent configuration: {exc}") from None
