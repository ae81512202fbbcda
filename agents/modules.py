"""A trained Dreamer agent's actor and critic as tensordict modules, and its whole policy for
torchrl rollouts; loading the agent from a checkpoint.

    from agents.modules import load_agent, policy_module, policy_transforms

    agent = load_agent("runs/cartpole-swingup/dreamer-aef/s0-...")  # run dir or checkpoint.pt
    env = TransformedEnv(make_dmc_env("cartpole-swingup"), policy_transforms(agent))
    rollout = env.rollout(500, policy_module(agent))  # the trained agent, acting as in eval.py

Keys are those of :mod:`aefrl.keys` (torchrl's vocabulary, as in
:mod:`aefrl.world_model.modules`); every module takes any batch shape ``[*B]``:

=========  =====================================  ===============================================
module     in_keys                                out_keys
=========  =====================================  ===============================================
actor      belief [*B, H], state [*B, d]          action [*B, A] in [-1, 1] (a sample under
                                                  torchrl's RANDOM exploration type, as its
                                                  collectors set; the mode otherwise)
critic     belief, state                          state_value [*B, 1] (the two-hot head's mean)
policy     pixels uint8 [*B, C, H, W], is_init,   ("next", belief), ("next", state) (h_t, z_t),
           prev_action, belief, state             posterior_mean / _std, action (a sample plus
           (a_{t-1}, h_{t-1}, z_{t-1})            the run's explore_noise, or the mode), ("next",
                                                  prev_action) (= action)
value      pixels, prev_action, belief, state     state_value (the critic at the filtered state)
=========  =====================================  ===============================================

The policy is the posterior (:func:`aefrl.world_model.modules.posterior_module`) followed by the
actor: it filters the frame o_t with h_{t-1}, z_{t-1} and a_{t-1}, acts on the new state and
keeps the action as the next step's ``prev_action``, which is what :meth:`DreamerAgent.act`
does with its carry. In a torchrl rollout that carry travels in the tensordict, in torchrl's
layout for recurrent modules: the policy reads it at the root and writes the new one under
``"next"``, so a row keeps its inputs and ``rollout["next", k][t]`` is ``rollout[k][t + 1]``
within an episode (the state that filtered o_t is ``rollout["next", "belief"][t]``).
:func:`policy_transforms` gives the env an ``InitTracker`` (episode starts, ``is_init``) and a
``TensorDictPrimer`` that creates ``belief``, ``state`` and ``prev_action`` at every reset;
without the primer a rollout stops at its first step with a KeyError (torchrl's collectors add
both themselves with ``auto_register_policy_transforms=True``: the policy's
``make_tensordict_primer()``). The policy runs without
autograd. The env must hand over pixels on the agent's device (a torchrl env's ``device``) and
of the run's size (``env.image_size`` of its ``run_config``); :func:`policy_transforms` takes
the agent's device for the carry, so move the agent first.

On a real rollout the value of a row's frame needs that frame filtered: :func:`value_module`
(posterior, then critic) gives it for the root (o_t) and for ``"next"`` (o_{t+1}, with the
carry the policy left there), as torchrl's value estimators call it (with
``deactivate_vmap=True``). :func:`critic_module`
reads a state as it is, for imagined rollouts, whose rows hold their states.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.data import Unbounded
from torchrl.envs import Compose, InitTracker, TensorDictPrimer
from torchrl.envs.utils import ExplorationType, exploration_type

from aefrl import keys
from aefrl.actor_critic import Actor, Critic
from aefrl.checkpoint import CheckpointError, load_checkpoint, load_error_summary
from aefrl.devices import usable_device
from aefrl.nn import MLP
from aefrl.world_model.modules import (
    PosteriorStep,
    autocast_dtype,
    posterior_in_keys,
    stored_action_dim,
)
from agents.base import add_explore_noise
from agents.dreamer import DreamerAgent
from agents.factory import build_agent

IS_INIT = keys.IS_INIT  # the episode-start flag torchrl's InitTracker writes; the policy's
_LATENT = [keys.BELIEF, keys.STATE]
_NEXT_LATENT = [("next", keys.BELIEF), ("next", keys.STATE)]  # the carry the policy leaves


class ActorAction(nn.Module):
    """``(belief [*B, H], state [*B, d]) -> action [*B, A]``: a sample when ``explore`` is True,
    the mode when it is False; with ``explore=None``, as torchrl's exploration type says at the
    call (a sample under ``ExplorationType.RANDOM``, which torchrl's collectors set while they
    collect; the mode under any other type or none, as in a plain ``env.rollout``). With
    autograd on, a sample is reparameterised (``rsample``): torchrl's ``DreamerActorLoss``
    samples under RANDOM and backpropagates its returns through the actions into the actor.
    ``noise [*B, A]``, optional: the sample's standard-normal draw (:meth:`Actor.act`).
    ``collect_noise``: std of the Gaussian noise added to a sample and clipped, as
    :meth:`DreamerAgent.act` does with ``explore_noise`` (acting only: refused with autograd
    on, where the loss would differentiate through a clipped action)."""

    def __init__(
        self, actor: Actor, explore: bool | None = None, collect_noise: float = 0.0
    ) -> None:
        super().__init__()
        self.actor, self.explore, self.collect_noise = actor, explore, float(collect_noise)

    def forward(
        self, belief: torch.Tensor, state: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_latent(belief, state, self.actor, "actor")
        explore = self.explore
        if explore is None:
            explore = exploration_type() == ExplorationType.RANDOM
        feat = torch.cat([belief, state], -1)
        grad = torch.is_grad_enabled()
        action = self.actor.act(feat, explore=explore, reparameterize=grad, noise=noise)
        if explore and self.collect_noise > 0:
            if grad:
                raise RuntimeError("collect_noise is for acting: run the actor without autograd")
            action = add_explore_noise(action, self.collect_noise)
        return action


class CriticValue(nn.Module):
    """``(belief [*B, H], state [*B, d]) -> value [*B, 1]``: the mean of the two-hot critic, the
    shape torchrl's value estimators read under ``"state_value"``."""

    def __init__(self, critic: Critic) -> None:
        super().__init__()
        self.critic = critic

    def forward(self, belief: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        check_latent(belief, state, self.critic, "critic")
        return self.critic(torch.cat([belief, state], -1)).mean.unsqueeze(-1)


def check_latent(belief: torch.Tensor, state: torch.Tensor, head: nn.Module, name: str) -> None:
    """Refuse in one sentence a ``(belief [*B, H], state [*B, d])`` pair ``head`` (an actor or
    critic: its MLP ``net`` reads H + d features) cannot read, before it fails deep in a matmul.
    Shapes and dtypes only: no values are read."""
    mlp = next((m for m in head.modules() if isinstance(m, MLP)), None)  # a SlowCopy's too
    features = None if mlp is None else mlp.in_dim
    for key, x in ((keys.BELIEF, belief), (keys.STATE, state)):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"{key} must be a [*B, size] tensor, got {type(x).__name__}")
    if belief.shape[:-1] != state.shape[:-1]:
        raise ValueError(
            f"belief and state must share their batch shape, got {list(belief.shape[:-1])} "
            f"and {list(state.shape[:-1])}"
        )
    if features is not None and belief.shape[-1] + state.shape[-1] != features:
        raise ValueError(
            f"the {name} reads belief and state of {features} features together (the model's "
            f"H + d), got {belief.shape[-1]} + {state.shape[-1]}"
        )
    dtype = next(head.parameters()).dtype
    for key, x in ((keys.BELIEF, belief), (keys.STATE, state)):
        # autocast asked only on a mismatch: it knows no meta device
        if x.dtype != dtype and x.dtype != autocast_dtype(x.device):
            raise ValueError(f"{key} must be {dtype} (the {name}'s dtype), got {x.dtype}")


class _PrevAction(nn.Module):
    """The action just chosen, kept as the next step's a_{t-1} (a copy: the env reads
    ``action`` and must not see it change)."""

    def forward(self, action: torch.Tensor) -> torch.Tensor:
        return action.clone()


def actor_module(actor: Actor, explore: bool | None = None) -> TensorDictModule:
    """The actor on the keys ``belief``, ``state`` -> ``action``: sampled or its mode as
    ``explore`` says, or as torchrl's exploration type says when it is None
    (:class:`ActorAction`)."""
    return TensorDictModule(ActorAction(actor, explore), in_keys=_LATENT, out_keys=[keys.ACTION])


def critic_module(critic: Critic) -> TensorDictModule:
    """The critic on ``belief``, ``state`` -> ``state_value`` ``[*B, 1]``, for torchrl's value
    estimators (``TDLambdaEstimator(..., value_network=critic_module(agent.critic))``)."""
    return TensorDictModule(CriticValue(critic), in_keys=_LATENT, out_keys=[keys.STATE_VALUE])


def policy_module(
    agent: DreamerAgent, explore: bool | None = None, is_first_key: str = IS_INIT
) -> TensorDictSequential:
    """The agent's whole policy from pixels (module docstring): posterior, actor (``explore``
    as :func:`actor_module`'s; a sample gets ``agent.explore_noise``, read when the policy is
    built, added and clipped, as :meth:`DreamerAgent.act` collects), and the action kept as the
    next step's ``prev_action``; the new carry goes under ``"next"``. ``is_first_key`` names
    the episode-start flag (torchrl's ``InitTracker`` writes ``"is_init"``; aefrl's replay rows
    hold ``"is_first"``)."""
    _require_dreamer(agent)
    posterior = PosteriorStep(agent.world_model, is_first_key)
    policy = _Acting(
        TensorDictModule(
            posterior,
            in_keys=posterior_in_keys(is_first_key),
            out_keys=[*_NEXT_LATENT, keys.POSTERIOR_MEAN, keys.POSTERIOR_STD],
        ),
        TensorDictModule(
            ActorAction(agent.actor, explore, agent.explore_noise),
            in_keys=_NEXT_LATENT,
            out_keys=[keys.ACTION],
        ),
        TensorDictModule(
            _PrevAction(), in_keys=[keys.ACTION], out_keys=[("next", keys.PREV_ACTION)]
        ),
    )
    # Sizes only (plain ints): the policy pickles for torchrl's multi-process collectors, and a
    # copy converted to another dtype or device makes its primer in its own.
    rssm = agent.world_model.rssm
    policy.carry_sizes = (rssm.deter, rssm.latent_dim, agent.action_dim)
    return policy


def value_module(agent: DreamerAgent) -> TensorDictModule:
    """``state_value [*B, 1]`` of the frame a real rollout's row holds (:class:`FilteredValue`:
    the posterior filters ``pixels`` with the carry beside it, the critic reads the filtered
    state; nothing else is written). Given a rollout of :func:`policy_module`, torchrl's value
    estimators get V(s_t) at the root and V(s_{t+1}) under ``"next"``; build them with
    ``deactivate_vmap=True`` (``TDLambdaEstimator(..., value_network=value_module(agent),
    deactivate_vmap=True)``): the filter writes in place, which ``torch.vmap`` refuses."""
    _require_dreamer(agent)
    return TensorDictModule(
        FilteredValue(agent),
        in_keys=[keys.PIXELS, keys.PREV_ACTION, *_LATENT],
        out_keys=[keys.STATE_VALUE],
    )


class FilteredValue(nn.Module):
    """``(pixels [*B, C, H, W] uint8, prev_action [*B, A], belief [*B, H], state [*B, d]) ->
    value [*B, 1]``: the critic's mean at the posterior state that filters the frame with the
    given carry (h_{t-1}, z_{t-1}, a_{t-1}). No episode-start flag: at a start the carry is the
    primer's zeros, which is what the flag would make of it (torchrl's estimators also mark the
    ``"next"`` row after a start as one, for sequence RNNs, which would zero a real carry). The
    VAE posterior samples z; with autograd on, gradients reach the world model too."""

    def __init__(self, agent: DreamerAgent) -> None:
        super().__init__()
        self.posterior = PosteriorStep(agent.world_model)
        self.value = CriticValue(agent.critic)

    def forward(self, pixels, prev_action, belief, state):
        if _in_vmap(pixels):
            raise RuntimeError(
                "value_module cannot run under torch.vmap (its filter writes in place); build "
                "torchrl's value estimator with deactivate_vmap=True"
            )
        first = torch.zeros(*belief.shape[:-1], 1, dtype=torch.bool, device=belief.device)
        h, z, _, _ = self.posterior(pixels, prev_action, first, belief, state)
        return self.value(h, z)


def _in_vmap(x: torch.Tensor) -> bool:
    """Whether ``x`` is a tensor batched by ``torch.vmap`` (torch has no public query)."""
    try:
        return bool(torch._C._functorch.is_batchedtensor(x))
    except AttributeError:  # a torch without the query: the in-place error stands
        return False


class _Acting(TensorDictSequential):
    """A policy that acts: no autograd graph (the carried belief would otherwise chain every
    step's graph, encoder included, to the next for the whole rollout).

    ``make_tensordict_primer()`` is torchrl's hook for recurrent modules: its collectors (with
    ``auto_register_policy_transforms=True``, the default from torchrl 0.15) and
    ``torchrl.modules.utils.get_env_transforms_from_module`` find it and give the env an
    ``InitTracker`` and this primer, as :func:`policy_transforms` does."""

    carry_sizes: tuple[int, int, int] | None = None  # (H, d, A), set by policy_module

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)

    def make_tensordict_primer(self) -> TensorDictPrimer:
        if self.carry_sizes is None:
            raise RuntimeError("this policy was not built by policy_module: it has no carry")
        return _carry_primer(self.carry_sizes, next(self.parameters()))


def carry_primer(agent: DreamerAgent) -> TensorDictPrimer:
    """A primer of the policy's recurrent carry, ``belief``, ``state`` and ``prev_action``:
    zeros at every reset, expanded to the env's batch (one carry per env of a batched env), on
    the agent's device and in its dtype (read when it is built)."""
    _require_dreamer(agent)
    rssm = agent.world_model.rssm
    sizes = (rssm.deter, rssm.latent_dim, agent.action_dim)
    return _carry_primer(sizes, next(agent.parameters()))


def _carry_primer(sizes: tuple[int, int, int], like: torch.Tensor) -> TensorDictPrimer:
    names = (keys.BELIEF, keys.STATE, keys.PREV_ACTION)
    specs = {
        name: Unbounded((size,), device=like.device, dtype=like.dtype)
        for name, size in zip(names, sizes, strict=True)
    }
    return TensorDictPrimer(specs, default_value=0.0, expand_specs=True)


def policy_transforms(agent: DreamerAgent) -> Compose:
    """The transforms a torchrl env needs to run :func:`policy_module` in ``env.rollout``: an
    ``InitTracker`` and :func:`carry_primer` (the posterior zeroes the carry at ``is_init``
    anyway; between resets the policy writes it under ``"next"``, which torchrl moves to the
    next step's root). torchrl's collectors can add them themselves
    (``auto_register_policy_transforms=True``; :class:`_Acting`)."""
    return Compose(InitTracker(init_key=IS_INIT), carry_primer(agent))


def load_agent(path: str | os.PathLike, map_location="cpu", compile: bool = False) -> nn.Module:
    """The agent of a run directory or ``checkpoint.pt`` written by ``scripts/train.py``
    (a :class:`DreamerAgent`, or the planner of an ``agent=planner`` run), built from the run's
    configuration with its trained weights, in eval mode, on the device ``map_location`` names
    (checked first: :func:`aefrl.devices.usable_device`, a ValueError for a device this machine
    lacks). ``compile``: torch.compile its RSSM steps and heads, whatever the run trained with
    (compiling costs seconds to minutes at the first calls; ``agent.compile`` is a training
    choice). Raises :class:`~aefrl.checkpoint.CheckpointError` with one sentence when the
    checkpoint can't give one."""
    if not isinstance(map_location, str | torch.device):  # torch.load's dict / callable forms
        state = load_checkpoint(Path(path), map_location=map_location)
        return agent_from_checkpoint(state, compile=compile)
    device = usable_device(map_location, "map_location=", other_types=True)
    state = load_checkpoint(Path(path), map_location="cpu")  # replay and all: keep it off the GPU
    return agent_from_checkpoint(state, compile=compile).to(device)


def agent_from_checkpoint(
    state: dict, action_dim: int | None = None, compile: bool = False
) -> nn.Module:
    """The agent of a loaded checkpoint (:func:`~aefrl.checkpoint.load_checkpoint`), in eval
    mode on the CPU. Its action size is read off the weights; ``action_dim``, when given (the
    env's), must agree. ``compile`` as :func:`load_agent`'s (the run's own setting is not
    used). One-sentence :class:`~aefrl.checkpoint.CheckpointError` otherwise."""
    # The task's action size is compared last: a checkpoint whose weights are not its
    # configuration's reads a wrong size off them, and was refused for the task's actions.
    acts = stored_action_dim(state)  # also checks the checkpoint's layout
    try:
        conf = state["run_config"]
        agent_conf, obs_conf = {**conf["agent"], "compile": compile}, conf["obs_model"]
        size = int(conf["env"]["image_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"not an aefrl training checkpoint (missing or bad {exc}); expected one written by "
            "scripts/train.py"
        ) from None
    try:
        agent = build_agent(agent_conf, obs_conf, (3, size, size), acts)
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's configuration is not valid: {exc}") from None
    try:
        agent.load_state_dict(state["agent"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"the checkpoint's weights do not match its configuration: {load_error_summary(exc)}"
        ) from None
    except (KeyError, ValueError) as exc:  # the optimiser states
        raise CheckpointError(
            f"the checkpoint's optimiser states do not match its agent ({type(exc).__name__}: "
            f"{exc})"
        ) from None
    stored_action_dim(state, action_dim)
    return agent.eval()


def _require_dreamer(agent) -> None:
    if not isinstance(agent, DreamerAgent):
        raise TypeError(
            f"a Dreamer agent has an actor to act with; got {type(agent).__name__} (a planner "
            "acts by planning: aefrl.envs.ImaginationEnv with torchrl's CEMPlanner, "
            "docs/reuse.md)"
        )
