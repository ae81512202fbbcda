"""Build an agent from plain configuration dicts (the ``agent`` and ``obs_model`` groups).

Every ValueError of :func:`build_agent` names the full configuration key the user sets
(``agent.actor_loss.gamma``, ``obs_model.options.sigma_x``): sizes and groups of settings are
checked here by key, and the components' own messages, which name their arguments (``gamma
must lie in (0, 1]``), get those names replaced by the keys they came from (:func:`name_keys`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from aefrl.nn import check_size
from aefrl.objectives.world_model import VAE_ONLY
from aefrl.obs_models import OBS_MODELS, accepted_options
from aefrl.resume_overrides import typed_leaves
from aefrl.world_model.modules import world_model_kwargs
from agents.dreamer import DreamerAgent
from agents.planner import DREAMER_ONLY, build_planner

# Network sizes anywhere in the agent config, with their smallest valid value: checked by key so
# that the error names the setting (``agent.actor.hidden``), not the module it reaches.
SIZE_KEYS = {
    **{"deter": 1, "hidden": 1, "layers": 0, "depth": 1, "bins": 2, "reward_bins": 2},
    **{"horizon": 1, "candidates": 1, "top_k": 1, "iterations": 1},  # imagination, planning
    "latent_dim": 1,  # obs_model.latent_dim
    **{"rssm_hidden": 1, "posterior_hidden": 1},  # null: the same as hidden
}
# Size keys whose null means "the width of hidden".
NULLABLE_SIZES = ("rssm_hidden", "posterior_hidden")
# Keys that hold a group of settings (a mapping, or null for the defaults), not a value.
GROUP_KEYS = (
    *("agent.world_model", "agent.actor", "agent.critic", "agent.wm_loss", "agent.actor_loss"),
    *("agent.value_loss", "agent.lr", "agent.grad_clip", "agent.planner"),
    *("agent.wm_loss.loss_scales", "obs_model.options"),
)


def check_sizes(config: dict, prefix: str = "agent") -> None:
    """ValueError naming the first size key in ``config`` that is not an integer in range."""
    for key, value in config.items():
        if isinstance(value, Mapping):
            check_sizes(value, f"{prefix}.{key}")
        elif key in SIZE_KEYS and not (value is None and key in NULLABLE_SIZES):
            check_size(f"{prefix}.{key}", value, SIZE_KEYS[key])


def check_groups(sections: dict[str, dict]) -> None:
    """ValueError naming a group of settings that was given a value (``agent.world_model=5``)."""
    for path in GROUP_KEYS:
        node = sections
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None and not isinstance(node, Mapping):
            raise ValueError(
                f"{path} is a group of settings, not a value: set its keys "
                f"({path}.<key>=<value>), got {node!r}"
            )


def check_obs_options(obs_model: dict) -> None:
    """ValueError naming an ``obs_model.options`` key that the chosen model does not take, and
    the models that do (``proposal_scale`` is the expansion AEF's)."""
    kind = obs_model.get("kind")
    if kind not in OBS_MODELS:
        return  # make_obs_model names the accepted kinds
    accepted = accepted_options(kind)
    for name in obs_model.get("options") or {}:
        if name in accepted:
            continue
        owners = [k for k in sorted(OBS_MODELS) if name in accepted_options(k)]
        key = f"obs_model.options.{name}"
        if owners:
            raise ValueError(
                f"{key} is an option of obs_model={' and '.join(owners)} only, not of {kind}"
            )
        raise ValueError(
            f"{key} is not an option of any observation model; {kind} takes {', '.join(accepted)}"
        )


def _leaf_keys(config: dict, prefix: str) -> list[str]:
    keys = []
    for key, value in config.items():
        path = f"{prefix}.{key}"
        keys += _leaf_keys(value, path) if isinstance(value, Mapping) else [path]
    return keys


# Words that may be argument names: identifiers, dotted ones included (lr.model); quoted text
# ('fixed') is matched as a whole so that values are left alone.
_WORD = re.compile(r"(?<!\w)'[^']*'|(?<![\w.])[A-Za-z_][\w.]*\w|(?<![\w.])[A-Za-z_]")


def name_keys(message: str, sections: dict[str, dict]) -> str:
    """``message`` with the argument names it mentions replaced by their configuration keys.

    ``sections`` maps a top-level key to its settings: ``{"agent": {...}, "obs_model": {...}}``.
    A word is replaced by the one key whose last components it equals (``gamma`` ->
    ``agent.actor_loss.gamma``, ``lr.model`` -> ``agent.lr.model``), once; words that match no
    key or several are left alone. Candidates are the message's first word (its subject, e.g.
    ``method must be ...``), words with ``_`` or ``.`` (``need 0 < min_std < max_std``), and
    words naming another setting of a section already named (``top_k (50) must not exceed
    candidates (10)``). Lists of accepted names (after ``accepted``) are left as they are.
    """
    keys = [k for name, section in sections.items() for k in _leaf_keys(section, name)]
    head, sep, tail = message.partition("accepted")

    def key_of(word: str) -> str | None:
        found = [k for k in keys if k == word or k.endswith(f".{word}")]
        return found[0] if len(found) == 1 else None

    words = [(m.start(), m.group()) for m in _WORD.finditer(head) if m.group()[0] != "'"]
    full = {}
    for start, word in words:
        if start == 0 or "_" in word or "." in word:
            key = key_of(word)
            if key is not None:
                full.setdefault(word, key)
    named = {k.rpartition(".")[0] for k in full.values()}
    for _, word in words:
        key = key_of(word)
        if word not in full and key is not None and key.rpartition(".")[0] in named:
            full[word] = key
    done: set[str] = set()

    def replace(match: re.Match) -> str:
        word = match.group()
        if word in full and word not in done:
            done.add(word)
            return full[word]
        return word

    return _WORD.sub(replace, head) + sep + tail


def build_dreamer(agent: dict, obs_model: dict, obs_shape, action_dim: int) -> DreamerAgent:
    """A :class:`~agents.dreamer.DreamerAgent`; ``obs_model`` supplies the one switch
    (``kind``), ``latent_dim`` and the observation-model options."""
    kwargs = {k: v for k, v in agent.items() if k != "name"}
    kwargs["world_model"] = world_model_kwargs(agent, obs_model)
    return DreamerAgent(obs_shape, action_dim, **kwargs)


AGENTS = {"dreamer": build_dreamer, "planner": build_planner}
# Sections of the agent configuration each agent ignores (planner.yaml inherits Dreamer's).
IGNORED = {"dreamer": (), "planner": DREAMER_ONLY}
# The optimiser groups each agent trains: the entries of agent.lr and agent.grad_clip it reads.
OPTIMIZED = {"dreamer": ("model", "actor", "critic"), "planner": ("model",)}


def check_read_settings(conf, overrides: list[str]) -> None:
    """Refuse a setting given on the command line that this run never reads: accepted, it was
    recorded in run_config.yaml and did nothing (``agent=planner agent.actor_loss.gamma=5``,
    the VAE's KL settings for an AEF, ``agent.name=planner``, which chose the planner with
    Dreamer's sizes instead of configs/agent/planner.yaml's). ``conf``: the composed
    configuration (its agent.name and obs_model.kind); :func:`aefrl.overrides.check_overrides`
    applies it to every job of a sweep before the first one trains. A ValueError names the
    setting."""
    if not overrides:
        return
    agent, kind = conf["agent"]["name"], conf["obs_model"]["kind"]
    given = sorted(set().union(*(typed_leaves(o) for o in overrides)))
    for key in given:
        parts = [*key.split("."), ""]  # a group choice (agent=planner) is one part
        if key == "agent.name":
            raise ValueError(
                "agent.name is set by the agent's config group: choose the agent with "
                "agent=dreamer or agent=planner"
            )
        if parts[0] == "agent" and (
            parts[1] in IGNORED.get(agent, ())
            or (
                parts[1] in ("lr", "grad_clip")
                and parts[2] not in ("", *OPTIMIZED.get(agent, (parts[2],)))
            )
        ):
            raise ValueError(
                f"{key} is a setting of the Dreamer agent's actor-critic, which agent={agent} "
                "does not have: leave it out"
            )
        if kind != "vae" and parts[:2] == ["agent", "wm_loss"] and parts[2] in VAE_ONLY:
            raise ValueError(
                f"{key} applies to obs_model=vae only (its KL term), and this run's obs_model "
                f"is {kind}: leave it out"
            )


def build_agent(agent: dict, obs_model: dict, obs_shape, action_dim: int):
    """Build the agent named ``agent["name"]``; a ValueError names the configuration key that
    is wrong (``agent.lr.model must be > 0, got -1``) or the accepted agents."""
    name = agent.get("name")
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; accepted: {', '.join(sorted(AGENTS))}")
    check_groups({"agent": agent, "obs_model": obs_model})
    check_sizes(agent)
    check_sizes(obs_model, "obs_model")
    check_obs_options(obs_model)
    used = {k: v for k, v in agent.items() if k not in IGNORED[name]}
    try:
        return AGENTS[name](agent, obs_model, obs_shape, action_dim)
    except TypeError as exc:  # an unknown key deep in the config
        raise ValueError(f"bad agent configuration: {exc}") from None
    except ValueError as exc:  # a component's message names its argument: name the key
        raise ValueError(name_keys(str(exc), {"agent": used, "obs_model": obs_model})) from exc
