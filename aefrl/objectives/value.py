"""Critic losses as torchrl ``LossModule``s: on imagined λ-returns (SPEC §7), and on replayed
real returns (DreamerV3's ``repval``, an option)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl.objectives import LossModule

from aefrl import keys
from aefrl.actor_critic import Critic, lambda_returns
from aefrl.objectives.actor import check_returns


class DreamerValueLoss(LossModule):
    """``loss_value = −mean_k w_k · [log v(s_k)(R^λ_k) + β_slow · log v(s_k)(v_slow(s_k))]``.

    Reads the trajectory written by :class:`~aefrl.objectives.actor.DreamerActorLoss`
    (``belief``, ``state`` ``[N, K+1, ·]`` for the horizon K; ``lambda_return``,
    ``slow_value``, ``weight`` ``[N, K]``). The slow-critic term keeps the critic near its own
    moving average (DreamerV3).
    """

    @dataclass
    class _AcceptedKeys:
        belief: str = keys.BELIEF
        state: str = keys.STATE
        lambda_return: str = "lambda_return"
        slow_value: str = "slow_value"
        weight: str = "weight"

    default_keys = _AcceptedKeys

    def __init__(self, critic: Critic, *, slow_reg: float = 1.0) -> None:
        super().__init__()
        self.critic = critic
        if not slow_reg >= 0:  # a negative pull pushes the critic away from its own average
            raise ValueError(f"slow_reg must be >= 0, got {slow_reg}")
        self.slow_reg = float(slow_reg)

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def forward(self, traj: TensorDictBase) -> TensorDict:
        k = self.tensor_keys
        returns = traj[k.lambda_return]
        horizon = returns.shape[1]
        feat = torch.cat([traj[k.belief][:, :horizon], traj[k.state][:, :horizon]], -1).detach()
        dist = self.critic(feat)
        nll = -dist.log_prob(returns) - self.slow_reg * dist.log_prob(traj[k.slow_value])
        return TensorDict(
            {
                "loss_value": (traj[k.weight] * nll).mean(),
                "value_mae": (dist.mean.detach() - returns).abs().mean(),
            },
            batch_size=[],
        )


class ReplayValueLoss(LossModule):
    """DreamerV3's ``repval``: the critic also learns on the replayed sequence itself.

    ``loss_repval = −mean_{b, t<T−1} w_t · [log v(s_t)(G_t) + β_slow · log v(s_t)(v_slow(s_t))]``

    on the posterior states ``s_t`` of a ``[B, T]`` replay window, towards λ-returns of its real
    rewards that bootstrap at every step from the imagined return ``B_t`` (``R^λ_0`` of the
    imagination started at ``s_t``, the actor loss's ``lambda_return[:, 0]``)::

        G_t = r_{t+1} + γ·(1 − term_{t+1})·((1 − λ_{t+1})·B_{t+1} + λ_{t+1}·G_{t+1}),
        λ_{t+1} = 0 where row t+1 ends its episode, else λ;   G_{T−1} = B_{T−1}

    and ``w_t = 0`` for a row that ends its episode (the next row is another episode's start),
    else 1. Rewards arrive with their frame (``r_{t+1}`` with ``o_{t+1}``: the replay's arrival
    layout), as in DreamerV3's replay. The states are detached (the world model learns from its
    own loss only) unless ``state_grad``: then this loss's gradient also reaches whatever
    computed ``belief`` and ``state`` (DreamerV3's ``repval_grad``; the agent then steps the
    world model after this loss, :class:`~agents.dreamer.DreamerAgent`). The slow critic's
    target carries no gradient either way.

    Reads ``belief [B, T, H]``, ``state [B, T, d]``, ``reward``, ``is_first``, ``terminated``
    ``[B, T, 1]`` and ``imag_return [B, T]``.
    """

    @dataclass
    class _AcceptedKeys:
        belief: str = keys.BELIEF
        state: str = keys.STATE
        reward: str = keys.REWARD
        is_first: str = keys.IS_FIRST
        terminated: str = keys.TERMINATED
        imag_return: str = "imag_return"

    default_keys = _AcceptedKeys

    def __init__(
        self,
        critic: Critic,
        slow_critic: nn.Module,
        *,
        gamma: float = 0.997,
        lmbda: float = 0.95,
        slow_reg: float = 1.0,
        state_grad: bool = False,
    ) -> None:
        super().__init__()
        check_returns(gamma, lmbda)
        if not slow_reg >= 0:
            raise ValueError(f"slow_reg must be >= 0, got {slow_reg}")
        self.critic = critic
        self.state_grad = bool(state_grad)
        self.slow_ref = [slow_critic]  # the agent owns and saves it
        self.gamma, self.lmbda, self.slow_reg = float(gamma), float(lmbda), float(slow_reg)

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def returns(self, replay: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, w)``, each ``[B, T−1]``: the targets and weights of rows ``0..T−2``."""
        k = self.tensor_keys
        first = replay[k.is_first][..., 0]
        boot = replay[k.imag_return]
        dtype = boot.dtype
        # Row t ends its episode where row t + 1 starts the next one; the last row's end is
        # not in the window, and G_{T-2} does not depend on it (G_{T-1} = B_{T-1} either way).
        ends = torch.cat([first[:, 2:], torch.zeros_like(first[:, :1])], 1)  # of rows 1..T-1
        discount = self.gamma * (1.0 - replay[k.terminated][:, 1:, 0].to(dtype))
        rewards = replay[k.reward][:, 1:, 0].to(dtype)
        returns = lambda_returns(rewards, boot[:, 1:], discount, self.lmbda, done=ends)
        return returns, 1.0 - first[:, 1:].to(dtype)

    def forward(self, replay: TensorDictBase) -> TensorDict:
        k = self.tensor_keys
        returns, weight = self.returns(replay)
        feat = torch.cat([replay[k.belief][:, :-1], replay[k.state][:, :-1]], -1)
        if not self.state_grad:
            feat = feat.detach()
        dist = self.critic(feat)
        with torch.no_grad():
            slow_value = self.slow_ref[0](feat).mean
        nll = -dist.log_prob(returns) - self.slow_reg * dist.log_prob(slow_value)
        return TensorDict(
            {
                "loss_repval": (weight * nll).mean(),
                "repval_return": (weight * returns).sum() / weight.sum().clamp_min(1.0),
            },
            batch_size=[],
        )
