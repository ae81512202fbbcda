"""Build an agent from plain configuration dicts (the ``agent`` and ``obs_model`` groups)."""

from __future__ import annotations

from agents.dreamer import DreamerAgent
from agents.planner import build_planner


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
    try:
        return AGENTS[name](agent, obs_model, obs_shape, action_dim)
    except TypeError as exc:  # an unknown key deep in the config
        raise ValueError(f"bad agent configuration: {exc}") from None
