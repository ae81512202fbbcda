"""Dreamer agent: RSSM world model (VAE or AEF observation model) + actor-critic in imagination.

The training loop talks to it through five methods only (danijar/dreamerv3's narrow agent
interface): :meth:`DreamerAgent.initial_carry`, :meth:`~DreamerAgent.act`,
:meth:`~DreamerAgent.train_step`, :meth:`~DreamerAgent.report` and ``state_dict`` /
``load_state_dict`` (models, optimisers, return scale); all but ``act`` and ``train_step`` come
from :class:`~agents.base.WorldModelAgent`.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase

from aefrl import keys
from aefrl.actor_critic import Actor, Critic, ReturnNormalizer, SlowCopy
from aefrl.compiled import compile_steps
from aefrl.objectives import DreamerActorLoss, DreamerValueLoss, ReplayValueLoss, WorldModelLoss
from aefrl.precision import check_autocast
from aefrl.world_model import WorldModel
from aefrl.world_model.modules import filter_step
from agents.base import (
    ACT_MODES,
    Carry,
    WorldModelAgent,
    add_explore_noise,
    check_explore_noise,
    check_replay_context,
    check_wm_loss,
    context_updates,
    loss_scalars,
    placeholder_action,
)


class DreamerAgent(WorldModelAgent):
    """World model + actor + critic (+ slow critic), their losses and optimisers.

    Args:
        obs_shape: ``(C, H, W)`` pixels.
        action_dim: A (actions in ``[-1, 1]``).
        world_model: kwargs of :class:`~aefrl.world_model.WorldModel`.
        actor: kwargs of :class:`~aefrl.actor_critic.Actor` (besides dims).
        critic: kwargs of :class:`~aefrl.actor_critic.Critic` (besides dims).
        wm_loss: kwargs of :class:`~aefrl.objectives.WorldModelLoss`.
        actor_loss: kwargs of :class:`~aefrl.objectives.DreamerActorLoss`.
        value_loss: kwargs of :class:`~aefrl.objectives.DreamerValueLoss`, and ``repval``: the
            scale of :class:`~aefrl.objectives.value.ReplayValueLoss` in the critic's loss, and
            ``repval_grad``: that loss trains the world model through its posteriors too
            (DreamerV3's ``repval_grad``; needs ``repval`` > 0). The world model then steps
            after imagination, on one backward with the critic's loss, so that imagination
            starts from the model before this update's step, as in DreamerV3's single loss.
        slow_critic_tau: EMA rate of the slow critic.
        lr: learning rates ``{"model", "actor", "critic"}``.
        grad_clip: max grad norms ``{"model", "actor", "critic"}``.
        adam_eps: Adam's epsilon.
        compile: ``torch.compile`` the RSSM steps and MLP heads (:mod:`aefrl.compiled`).
        autocast: ``"none"`` or ``"bf16"``: the MLPs and conv trunks of the updates in bf16,
            the rest in float32 (:mod:`aefrl.precision`).
        explore_noise: std of Gaussian noise added to the actor's sampled actions while
            collecting (``"explore"`` mode; clipped to [-1, 1]): DreamerV1's 0.3; 0 (the
            default, DreamerV3's) collects with the actor's own samples.
        replay_context: start each replayed window from the latent stored with its first row
            instead of zeros (DreamerV3's ``replay_context``): the collector stores the policy's
            latents, and :meth:`train_step` returns its posteriors for the loop to write back
            (:func:`~agents.base.context_updates`).
    """

    def __init__(
        self,
        obs_shape,
        action_dim: int,
        *,
        world_model: dict | None = None,
        actor: dict | None = None,
        critic: dict | None = None,
        wm_loss: dict | None = None,
        actor_loss: dict | None = None,
        value_loss: dict | None = None,
        slow_critic_tau: float = 0.02,
        lr: dict | None = None,
        grad_clip: dict | None = None,
        adam_eps: float = 1e-6,
        compile: bool = False,
        autocast: str = "none",
        explore_noise: float = 0.0,
        replay_context: bool = False,
    ) -> None:
        super().__init__()
        self.autocast = check_autocast(autocast)
        self.explore_noise = check_explore_noise(explore_noise)
        self.replay_context = check_replay_context(replay_context)
        self.world_model = WorldModel(tuple(obs_shape), action_dim, **(world_model or {}))
        feat = self.world_model.feat_dim
        self.actor = Actor(feat, action_dim, **(actor or {}))
        self.critic = Critic(feat, **(critic or {}))
        if not 0 < slow_critic_tau <= 1:  # SlowCopy's own message would say only "tau"
            raise ValueError(f"slow_critic_tau must lie in (0, 1], got {slow_critic_tau}")
        self.slow_critic = SlowCopy(self.critic, slow_critic_tau)
        self.return_norm = ReturnNormalizer()
        value_loss = dict(value_loss or {})
        repval = value_loss.pop("repval", 0.0)
        repval_grad = value_loss.pop("repval_grad", False)
        if not repval >= 0:
            raise ValueError(f"repval must be >= 0, got {repval}")
        if not isinstance(repval_grad, bool):
            raise ValueError(f"repval_grad must be true or false, got {repval_grad!r}")
        if repval_grad and not repval:
            raise ValueError(
                "repval_grad=true trains the world model through the replay value loss, which "
                "repval=0 turns off; set repval > 0 (DreamerV3: 0.3) or repval_grad=false"
            )
        # With repval_grad the world-model loss hands its posteriors over with their graph.
        self.wm_loss = WorldModelLoss(
            self.world_model, **check_wm_loss(wm_loss), state_grad=repval_grad
        )
        self.actor_loss = DreamerActorLoss(
            self.world_model,
            self.actor,
            self.slow_critic,
            self.return_norm,
            critic=self.critic,
            **(actor_loss or {}),
        )
        self.value_loss = DreamerValueLoss(self.critic, **value_loss)
        # DreamerV3's replay value loss, scaled by repval (0: the critic learns in imagination
        # only); its returns take the imagined returns' γ and λ as configured here (a later
        # actor_loss.make_value_estimator does not reach them).
        self.repval = float(repval)
        self.repval_grad = repval_grad
        self.replay_value_loss = ReplayValueLoss(
            self.critic,
            self.slow_critic,
            gamma=self.actor_loss.gamma,
            lmbda=self.actor_loss.lmbda,
            slow_reg=self.value_loss.slow_reg,
            state_grad=repval_grad,
        )
        self._init_optimizers(
            {"model": self.world_model, "actor": self.actor, "critic": self.critic},
            {"model": 3e-4, "actor": 8e-5, "critic": 8e-5, **(lr or {})},
            {"model": 1000.0, "actor": 100.0, "critic": 100.0, **(grad_clip or {})},
            adam_eps,
        )
        self.action_dim = int(action_dim)
        if compile:
            compile_steps(self.world_model, self.actor, self.critic, self.slow_critic.copy)

    # --- acting ----------------------------------------------------------------------------------
    @torch.no_grad()
    def act(
        self, pixels: torch.Tensor, is_first: torch.Tensor, carry: Carry, mode: str = "explore"
    ) -> tuple[torch.Tensor, Carry]:
        """One policy step. ``pixels`` uint8 ``[N, C, H, W]`` (o_t), ``is_first`` ``[N, 1]``.

        Filters o_t with the posterior (sampled in VAE mode, deterministic in AEF modes), then
        samples ``a_t ~ π(feat_t)``, plus ``N(0, explore_noise²)`` clipped to [-1, 1]
        (``"explore"``), or takes its mode (``"eval"``); ``"random"`` skips the actor and
        returns zeros for the caller to replace (see :data:`ACT_MODES`).
        Returns ``a_t [N, A]`` and the new carry.
        """
        if mode not in ACT_MODES:
            raise ValueError(f"mode must be one of {ACT_MODES}, got {mode!r}")
        state, _, _ = filter_step(
            self.world_model, carry.state, carry.prev_action, pixels, is_first
        )
        if mode == "random":
            action = placeholder_action(carry)
            return action, Carry(state, action)
        action = self.actor.act(state.feat, explore=mode == "explore")
        if mode == "explore":
            action = add_explore_noise(action, self.explore_noise)
        return action, Carry(state, action)

    # --- training --------------------------------------------------------------------------------
    def train_step(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """One update of world model, actor and critic on a ``[B, T]`` replay batch.

        Returns detached scalar metrics (losses, diagnostics, grad norms and clipping), and with
        ``replay_context`` the rows' new contexts (:func:`~agents.base.context_updates`).
        """
        with self.precision():
            wm_out = self.wm_loss(batch)
        model_loss = self.wm_loss.total(wm_out)
        if self.repval_grad:  # the world model steps with the critic, after imagination
            metrics = {}
        else:
            metrics, model_loss = self._step("model", model_loss), None
        metrics.update(loss_scalars(wm_out))
        if self.replay_context:
            metrics.update(context_updates(batch, wm_out))
        belief, state = wm_out[keys.BELIEF], wm_out[keys.STATE]  # with their graph: repval_grad
        start = TensorDict(
            {
                keys.BELIEF: belief.detach().flatten(0, 1),
                keys.STATE: state.detach().flatten(0, 1),
                keys.TERMINATED: batch[keys.TERMINATED].flatten(0, 1),
            },
            batch_size=[],
        )
        replay = None
        if self.repval:  # the window itself, for the critic's replay loss
            replay = batch.select(keys.REWARD, keys.IS_FIRST, keys.TERMINATED).update(
                {keys.BELIEF: belief, keys.STATE: state}
            )
        metrics.update(self.train_actor_critic(start, replay, model_loss))
        return metrics

    def train_actor_critic(
        self,
        start: TensorDictBase,
        replay: TensorDictBase | None = None,
        model_loss: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The second half of :meth:`train_step`: one actor and one critic update in imagination
        from ``start`` (posterior states ``belief [N, H]``, ``state [N, d]`` and ``terminated
        [N, 1]`` of their rows), then the slow critic's step. Returns detached scalar metrics.

        With ``agent.value_loss.repval`` > 0, ``replay`` is the ``[B, T]`` window ``start``
        came from (``belief``, ``state``, ``reward``, ``is_first``, ``terminated``; N = B·T in
        its order): the critic's loss adds ``repval`` times :class:`ReplayValueLoss`'s. With
        ``repval_grad``, ``model_loss`` is the world model's loss not yet stepped (and
        ``replay``'s states carry its graph): one backward of the two losses steps the world
        model and the critic."""
        if self.repval_grad and (model_loss is None or replay is None):
            raise ValueError("repval_grad needs the world model's loss and the replay window")
        if model_loss is not None and not self.repval_grad:
            raise ValueError(
                "model_loss is stepped here with repval_grad only; without it train_step "
                "steps the world model before imagination"
            )
        with self.precision():  # it only sets the trunks' forward precision
            actor_out = self.actor_loss(start)
            metrics = self._step("actor", actor_out["loss_actor"])
            value_out = self.value_loss(actor_out)
            loss = value_out["loss_value"]
            outs = [actor_out, value_out]
            if self.repval:
                if replay is None:
                    raise ValueError("repval > 0 needs the replay window the starts came from")
                boot = actor_out["lambda_return"][:, 0].reshape(replay.shape)
                outs.append(self.replay_value_loss(replay.set("imag_return", boot)))
                loss = loss + self.repval * outs[-1]["loss_repval"]
            if self.repval_grad:
                metrics.update(self._step(("model", "critic"), model_loss + loss))
            else:
                metrics.update(self._step("critic", loss))
        self.slow_critic.update()
        for out in outs:
            metrics.update(loss_scalars(out))
        return metrics
