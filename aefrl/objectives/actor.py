"""Actor loss in imagination (SPEC §7) as a torchrl ``LossModule``.

From every posterior state of a replay batch, imagine ``horizon`` steps with the actor, score
them with the reward and continue heads and a critic (the slow one by default, DreamerV2's
target network; the trained one with ``bootstrap="fast"``, as DreamerV3 does), form λ-returns,
normalise them by the return scale ``max(1, S)``, and maximise them by backpropagating through
the (frozen) world model — "dynamics backprop", the choice of DreamerV1/V2 and of the 2023
DreamerV3 code for continuous actions — or, with ``gradient="reinforce"``, by the score function
of the normalised advantages (the current DreamerV3 code's choice for every action space); plus
an entropy bonus. As in every Dreamer, the actor sees the imagined states with their gradient
stopped (``actor_input_grad=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators

from aefrl import keys
from aefrl.actor_critic import (
    Actor,
    Critic,
    ReturnNormalizer,
    SlowCopy,
    imagine,
    lambda_returns,
    sample_from_noise,
    score_log_prob,
)
from aefrl.nn import check_size, frozen
from aefrl.world_model import RSSMState, WorldModel

#: Which critic's values the λ-returns bootstrap from (:class:`DreamerActorLoss`).
BOOTSTRAPS = ("slow", "fast")
#: How the actor's gradient is estimated (:class:`DreamerActorLoss`).
GRADIENTS = ("backprop", "reinforce")


def check_returns(gamma: float, lmbda: float) -> None:
    """γ in (0, 1] and λ in [0, 1], or a ValueError naming the one that is not."""
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
    if not 0 <= lmbda <= 1:
        raise ValueError(f"lmbda must lie in [0, 1], got {lmbda}")


class DreamerActorLoss(LossModule):
    """``loss_actor = −mean_k w_k · (R^λ_k / max(1, S) + η·H_k)``.

    ``w_k = (1 − terminated(s_0))·Π_{j<k} γ·c_j`` discounts steps that imagination believes
    come after an episode end; ``H_k = −log π(a_k | s_k)`` is a one-sample entropy estimate
    (the tanh-Gaussian has no closed form; for the bounded normal its reparameterised gradient
    is the closed form's).

    The actor acts on ``sg(s_k)`` (``actor_input_grad=False``, DreamerV1-V3): ``a_k``'s
    gradient comes from the rewards and values of the states after it through the frozen
    dynamics, and ``H_k``'s from π at a fixed state. ``actor_input_grad=True`` differentiates
    through the actor's input as well — the full pathwise derivative of the imagined return,
    with feedback through every later action and an entropy bonus that also rewards steering
    into states where π is wide; the project's learning runs before the option existed used it.

    ``gradient="reinforce"`` (the current DreamerV3 code, for every action space) maximises
    ``sg(A_k)·log π(sg(a_k) | s_k) + η·H_k`` instead, with the advantage
    ``A_k = (R^λ_k − v(s_k)) / max(1, S)`` against the bootstrap critic's value: nothing is
    differentiated through the world model or the critics, so imagination runs without a graph
    (its noise drawn up front) and the actor is evaluated again, batched, on the imagined
    states; ``H_k`` keeps its reparameterised gradient. ``actor_input_grad`` needs
    ``"backprop"``.

    ``R^λ_k`` bootstraps from ``v(s_{k+1})`` of the slow critic (``bootstrap="slow"``, the
    default: DreamerV2's target network, ~1/τ updates behind) or of the trained ``critic``
    (``"fast"``: DreamerV3, whose slow critic only regularises the critic). A bootstrap that
    lags the critic adds its lag to every round of value propagation; with the critic's pull
    towards the slow copy (``slow_reg``) on top, values grow slowly when few updates are made.

    The returned TensorDict also carries the imagined trajectory (``belief``, ``state``
    ``[N, K+1, ·]`` for the horizon K, detached) with ``lambda_return``, ``slow_value`` (the
    slow critic's values of ``s_0..s_{K-1}``, the regulariser's target) and ``weight``
    ``[N, K]`` for :class:`~aefrl.objectives.value.DreamerValueLoss`.
    """

    @dataclass
    class _AcceptedKeys:
        belief: str = keys.BELIEF
        state: str = keys.STATE
        terminated: str = keys.TERMINATED

    default_keys = _AcceptedKeys
    # The returns are TD(λ) with continue-weighted discounts γ·c(s_{k+1}) (SPEC §7), computed by
    # torchrl's td_lambda_return_estimate; make_value_estimator sets γ and λ.
    default_value_estimator = ValueEstimators.TDLambda

    def __init__(
        self,
        world_model: WorldModel,
        actor: Actor,
        slow_critic: SlowCopy,
        return_norm: ReturnNormalizer,
        *,
        horizon: int = 15,
        gamma: float = 0.997,
        lmbda: float = 0.95,
        entropy_coef: float = 3e-4,
        bootstrap: str = "slow",
        critic: Critic | None = None,
        actor_input_grad: bool = False,
        gradient: str = "backprop",
    ) -> None:
        super().__init__()
        horizon = check_size("horizon", horizon)
        check_returns(gamma, lmbda)
        if not entropy_coef >= 0:
            raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef}")
        if bootstrap not in BOOTSTRAPS:
            raise ValueError(f"bootstrap must be one of {', '.join(BOOTSTRAPS)}, got {bootstrap!r}")
        if bootstrap == "fast" and critic is None:
            raise ValueError('bootstrap="fast" needs the critic (critic=...)')
        if not isinstance(actor_input_grad, bool):
            raise ValueError(f"actor_input_grad must be true or false, got {actor_input_grad!r}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        if gradient == "reinforce" and actor_input_grad:
            raise ValueError(
                "actor_input_grad=true differentiates through the imagined states, which "
                "gradient=reinforce does not; set one of them back"
            )
        self.world_model = world_model
        self.actor = actor
        self.slow_critic = slow_critic
        self.return_norm = return_norm
        self.horizon, self.gamma, self.lmbda = int(horizon), float(gamma), float(lmbda)
        self.entropy_coef = float(entropy_coef)
        self.bootstrap = bootstrap
        self.actor_input_grad = actor_input_grad
        self.gradient = gradient
        # A list keeps the critic out of this loss's state_dict (like SlowCopy.source): the
        # agent owns and saves it, and checkpoints do not depend on the bootstrap choice.
        self.critic_ref = [critic] if bootstrap == "fast" else []

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def make_value_estimator(self, value_type=None, **hyperparams) -> DreamerActorLoss:
        """torchrl's way to set the returns' ``gamma`` and ``lmbda``
        (``loss.make_value_estimator(ValueEstimators.TDLambda, gamma=0.99)``); TD(λ) over the
        imagined trajectory is the only estimator this loss computes."""
        if value_type not in (None, ValueEstimators.TDLambda):
            raise NotImplementedError(
                f"DreamerActorLoss computes TD(lambda) returns over imagined trajectories only, "
                f"not {value_type}"
            )
        unknown = sorted(set(hyperparams) - {"gamma", "lmbda"})
        if unknown:
            raise TypeError(f"the TD(lambda) returns take gamma and lmbda, not {unknown}")
        gamma = float(hyperparams.get("gamma", self.gamma))
        lmbda = float(hyperparams.get("lmbda", self.lmbda))
        check_returns(gamma, lmbda)
        self.gamma, self.lmbda = gamma, lmbda
        self.value_type = ValueEstimators.TDLambda
        return self

    def forward(self, start: TensorDictBase) -> TensorDict:
        """``start``: posterior states ``belief [N, H]``, ``state [N, d]`` and ``terminated
        [N, 1]`` of the rows they came from (imagination from a terminal state counts zero)."""
        wm = self.world_model
        s0 = RSSMState(start[self.tensor_keys.belief], start[self.tensor_keys.state])
        if self.gradient == "reinforce":
            return self._reinforce(start, s0)
        with frozen(wm, self.slow_critic, *self.critic_ref):
            states, actions, log_probs = imagine(
                wm.rssm, self.actor, s0, self.horizon, input_grad=self.actor_input_grad
            )
            feat = states.feat  # [N, K+1, F]
            # One contiguous copy: a strided [N, K, F] slice turns each head's first Linear
            # into a batched matmul over N (slower than one matmul over N*H rows, both ways).
            after = feat[:, 1:].contiguous()
            reward = wm.reward_head(after).mean
            cont = wm.continue_head(after).mean
            if self.critic_ref:  # fast: bootstrap from the critic, regularise towards the slow one
                value = self.critic_ref[0](after).mean  # v(s_1..s_K) [N, K]
                slow_value = self.slow_critic(feat[:, :-1].contiguous()).mean.detach()
            else:
                slow = self.slow_critic(feat).mean  # [N, K+1]
                value, slow_value = slow[:, 1:], slow[:, :-1].detach()
        returns, weight = self._returns(start, reward, value, cont)
        scale = self.return_norm.update(returns)
        entropy = -log_probs
        objective = self.return_norm(returns) + self.entropy_coef * entropy
        return self._output(
            objective, weight, entropy, actions, returns, reward, slow_value, scale, states
        )

    def _reinforce(self, start: TensorDictBase, s0: RSSMState) -> TensorDict:
        """:meth:`forward` with ``gradient="reinforce"``."""
        wm, n, horizon = self.world_model, s0.h.shape[0], self.horizon
        # The draws of the actions and the prior states, so that the actor can be evaluated
        # again after the rollout at the very samples the dynamics took.
        action_noise = s0.h.new_empty(n, horizon, wm.rssm.action_dim).normal_()
        state_noise = s0.z.new_empty(n, horizon, s0.z.shape[-1]).normal_()
        with torch.no_grad():
            states, actions, _ = imagine(
                wm.rssm, self.actor, s0, horizon, noise=(action_noise, state_noise)
            )
            feat = states.feat  # [N, K+1, F]
            after = feat[:, 1:].contiguous()
            reward = wm.reward_head(after).mean
            cont = wm.continue_head(after).mean
            slow = self.slow_critic(feat).mean  # [N, K+1]
            slow_value = slow[:, :-1]
            # v(s_0..s_K) of the bootstrap critic: v(s_k) is the baseline, v(s_{k+1}) the bootstrap
            values = self.critic_ref[0](feat).mean if self.critic_ref else slow
            returns, weight = self._returns(start, reward, values[:, 1:], cont)
            scale = self.return_norm.update(returns)
            advantage = self.return_norm(returns - values[:, :-1])
        dist = self.actor(feat[:, :-1].contiguous())  # π(· | s_k), batched over N x K
        _, log_probs = sample_from_noise(dist, action_noise)  # reparameterised: the entropy's
        entropy = -log_probs
        objective = advantage * score_log_prob(dist, action_noise) + self.entropy_coef * entropy
        return self._output(
            objective, weight, entropy, actions, returns, reward, slow_value, scale, states
        )

    def _returns(
        self, start: TensorDictBase, reward: torch.Tensor, value: torch.Tensor, cont: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """λ-returns ``[N, K]`` from rewards, bootstrap values ``v(s_1..s_K)`` and continue
        probabilities ``[N, K]`` of ``s_1..s_K``, and the steps' weights ``[N, K]``."""
        discount = self.gamma * cont
        returns = lambda_returns(reward, value, discount, self.lmbda)  # [N, K]
        alive = 1.0 - start[self.tensor_keys.terminated].to(reward.dtype)  # [N, 1]
        weight = torch.cumprod(torch.cat([alive, discount[:, :-1]], 1), 1).detach()
        return returns, weight

    @staticmethod
    def _output(
        objective: torch.Tensor,
        weight: torch.Tensor,
        entropy: torch.Tensor,
        actions: torch.Tensor,
        returns: torch.Tensor,
        reward: torch.Tensor,
        slow_value: torch.Tensor,
        scale: torch.Tensor,
        states: RSSMState,
    ) -> TensorDict:
        """The loss ``−mean(weight · objective)`` (all ``[N, K]``), its diagnostics, and the
        imagined trajectory with its returns for the critic's loss."""
        out = TensorDict(
            {
                "loss_actor": -(weight * objective).mean(),
                "actor_entropy": entropy.detach().mean(),
                # Share of imagined actions at the bounds: near 1, exploration has collapsed
                # (a tanh_normal in tanh's tails) and the actor's gradients through the
                # action vanish.
                "action_saturation": (actions.detach().abs() > 0.99).float().mean(),
                "imag_return": returns.detach().mean(),
                "imag_reward": reward.detach().mean(),
                "imag_value": slow_value.mean(),
                "return_scale": scale.detach().clone(),
                keys.BELIEF: states.h.detach(),
                keys.STATE: states.z.detach(),
                "lambda_return": returns.detach(),
                "slow_value": slow_value,
                "weight": weight,
            },
            batch_size=[],
        )
        return out
