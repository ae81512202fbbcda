"""Critic loss on imagined λ-returns (SPEC §7) as a torchrl ``LossModule``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.objectives import LossModule

from aefrl import keys
from aefrl.actor_critic import Critic


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
