"""Dreamer agent: RSSM world model (VAE or AEF observation model) + actor-critic in imagination.

The training loop talks to it through five methods only (danijar/dreamerv3's narrow agent
interface): :meth:`DreamerAgent.initial_carry`, :meth:`~DreamerAgent.act`,
:meth:`~DreamerAgent.train_step`, :meth:`~DreamerAgent.report` and ``state_dict`` /
``load_state_dict`` (models, optimisers, return scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from aefrl import keys
from aefrl.actor_critic import Actor, Critic, ReturnNormalizer, SlowCopy
from aefrl.compiled import compile_steps
from aefrl.objectives import DreamerActorLoss, DreamerValueLoss, WorldModelLoss
from aefrl.precision import check_autocast, trunk_precision
from aefrl.world_model import RSSMState, WorldModel
from aefrl.world_model.evaluation import open_loop_prediction, sequence_bits_per_dim
from aefrl.world_model.modules import filter_step

# "random": filter o_t only and return a placeholder zero action; the caller (the collector's
# prefill) draws the action and writes it into the carry, so no policy runs for nothing.
ACT_MODES = ("explore", "eval", "random")


def check_optimizer_settings(lr: dict, grad_clip: dict, adam_eps: float) -> None:
    """Refuse settings that silently stop learning: a clip norm of 0 zeroes every update."""
    for group, values in (("lr", lr), ("grad_clip", grad_clip)):
        for name, value in values.items():
            if not value > 0:
                raise ValueError(f"{group}.{name} must be > 0, got {value}")
    if not adam_eps > 0:  # eps = 0 divides by zero where a gradient is zero
        raise ValueError(f"adam_eps must be > 0, got {adam_eps}")


def _scalars(out: TensorDictBase) -> dict[str, torch.Tensor]:
    """The 0-d entries of a loss module's output, detached (the metrics of an update)."""
    return {
        key: value.detach()
        for key, value in out.items()
        if isinstance(key, str) and value.dim() == 0
    }


def shared_entries(module: nn.Module) -> dict[str, str]:
    """``{alias: name}`` for the ``state_dict`` entries of ``module`` that are the same tensor
    as an entry of an earlier child (``wm_loss.world_model.*`` and ``world_model.*``: the loss
    modules hold the networks they train). Sharing inside one child (the RSSM holds the world
    model's observation model) is that child's own layout and stays."""
    first: dict[int, str] = {}
    aliases = {}
    # keep_vars: the parameters and buffers themselves, one object however often registered
    # (data pointers would not do: every meta tensor's, and every empty one's, is 0).
    for name, value in nn.Module.state_dict(module, keep_vars=True).items():
        ident = id(value)
        if ident not in first:
            first[ident] = name
        elif first[ident].split(".", 1)[0] != name.split(".", 1)[0]:
            aliases[name] = first[ident]
    return aliases


def placeholder_action(carry: Carry) -> torch.Tensor:
    """The zero action ``[N, A]`` of ``act(..., mode="random")``."""
    return torch.zeros_like(carry.prev_action)


@dataclass
class Carry:
    """What the policy carries between environment steps: the posterior state and a_{t-1}."""

    state: RSSMState  # h [N, H], z [N, d]
    prev_action: torch.Tensor  # [N, A]

    def reset(self, done: torch.Tensor) -> Carry:
        """Zero the rows whose episode ended (``done [N]`` bool); the RSSM also resets on
        ``is_first``, this keeps a_{t-1} right."""
        keep = ~done.bool().unsqueeze(-1)  # where, not · 0: a nan state must not outlive it
        h, z = self.state.h.where(keep, 0.0), self.state.z.where(keep, 0.0)
        return Carry(RSSMState(h, z), self.prev_action.where(keep, 0.0))


class DreamerAgent(nn.Module):
    """World model + actor + critic (+ slow critic), their losses and optimisers.

    Args:
        obs_shape: ``(C, H, W)`` pixels.
        action_dim: A (actions in ``[-1, 1]``).
        world_model: kwargs of :class:`~aefrl.world_model.WorldModel`.
        actor: kwargs of :class:`~aefrl.actor_critic.Actor` (besides dims).
        critic: kwargs of :class:`~aefrl.actor_critic.Critic` (besides dims).
        wm_loss: kwargs of :class:`~aefrl.objectives.WorldModelLoss`.
        actor_loss: kwargs of :class:`~aefrl.objectives.DreamerActorLoss`.
        value_loss: kwargs of :class:`~aefrl.objectives.DreamerValueLoss`.
        slow_critic_tau: EMA rate of the slow critic.
        lr: learning rates ``{"model", "actor", "critic"}``.
        grad_clip: max grad norms ``{"model", "actor", "critic"}``.
        adam_eps: Adam's epsilon.
        compile: ``torch.compile`` the RSSM steps and MLP heads (:mod:`aefrl.compiled`).
        autocast: ``"none"`` or ``"bf16"``: the MLPs and conv trunks of the updates in bf16,
            the rest in float32 (:mod:`aefrl.precision`).
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
    ) -> None:
        super().__init__()
        self.autocast = check_autocast(autocast)
        self.world_model = WorldModel(tuple(obs_shape), action_dim, **(world_model or {}))
        feat = self.world_model.feat_dim
        self.actor = Actor(feat, action_dim, **(actor or {}))
        self.critic = Critic(feat, **(critic or {}))
        if not 0 < slow_critic_tau <= 1:  # SlowCopy's own message would say only "tau"
            raise ValueError(f"slow_critic_tau must lie in (0, 1], got {slow_critic_tau}")
        self.slow_critic = SlowCopy(self.critic, slow_critic_tau)
        self.return_norm = ReturnNormalizer()
        self.wm_loss = WorldModelLoss(self.world_model, **(wm_loss or {}))
        self.actor_loss = DreamerActorLoss(
            self.world_model,
            self.actor,
            self.slow_critic,
            self.return_norm,
            critic=self.critic,
            **(actor_loss or {}),
        )
        self.value_loss = DreamerValueLoss(self.critic, **(value_loss or {}))
        lr = {"model": 3e-4, "actor": 8e-5, "critic": 8e-5, **(lr or {})}
        self.grad_clip = {"model": 1000.0, "actor": 100.0, "critic": 100.0, **(grad_clip or {})}
        check_optimizer_settings(lr, self.grad_clip, adam_eps)
        groups = {"model": self.world_model, "actor": self.actor, "critic": self.critic}
        self.optimizers = {
            name: torch.optim.Adam(module.parameters(), lr=lr[name], eps=adam_eps)
            for name, module in groups.items()
        }
        self._groups = groups
        self.action_dim = int(action_dim)
        if compile:
            compile_steps(self.world_model, self.actor, self.critic, self.slow_critic.copy)

    # --- acting ----------------------------------------------------------------------------------
    def initial_carry(self, num_envs: int) -> Carry:
        p = next(self.parameters())
        return Carry(
            self.world_model.rssm.initial(num_envs),
            torch.zeros(num_envs, self.action_dim, device=p.device, dtype=p.dtype),
        )

    @torch.no_grad()
    def act(
        self, pixels: torch.Tensor, is_first: torch.Tensor, carry: Carry, mode: str = "explore"
    ) -> tuple[torch.Tensor, Carry]:
        """One policy step. ``pixels`` uint8 ``[N, C, H, W]`` (o_t), ``is_first`` ``[N, 1]``.

        Filters o_t with the posterior (sampled in VAE mode, deterministic in AEF modes), then
        samples ``a_t ~ π(feat_t)`` (``"explore"``) or takes its mode (``"eval"``); ``"random"``
        skips the actor and returns zeros for the caller to replace (see :data:`ACT_MODES`).
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
        return action, Carry(state, action)

    # --- training --------------------------------------------------------------------------------
    def precision(self):
        """The context of the updates' loss forwards: trunks in bf16 under ``autocast="bf16"``
        (:mod:`aefrl.precision`)."""
        return trunk_precision(self.autocast)

    def _step(self, name: str, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backward, clip and step of the ``name`` optimiser. Returns the gradient norm before
        clipping and 1.0 if it was clipped (its mean over a log period: the share of updates
        clipped; a tensor comparison, so a captured update needs no host synchronisation)."""
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.grad_clip[name]
        norm = nn.utils.clip_grad_norm_(self._groups[name].parameters(), clip)
        opt.step()
        return {f"grad_norm_{name}": norm, f"grad_clipped_{name}": (norm > clip).float()}

    def train_step(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """One update of world model, actor and critic on a ``[B, T]`` replay batch.

        Returns detached scalar metrics (losses, diagnostics, grad norms and clipping).
        """
        with self.precision():
            wm_out = self.wm_loss(batch)
        metrics = self._step("model", self.wm_loss.total(wm_out))
        metrics.update(_scalars(wm_out))
        start = TensorDict(
            {
                keys.BELIEF: wm_out[keys.BELIEF].flatten(0, 1),
                keys.STATE: wm_out[keys.STATE].flatten(0, 1),
                keys.TERMINATED: batch[keys.TERMINATED].flatten(0, 1),
            },
            batch_size=[],
        )
        metrics.update(self.train_actor_critic(start))
        return metrics

    def train_actor_critic(self, start: TensorDictBase) -> dict[str, torch.Tensor]:
        """The second half of :meth:`train_step`: one actor and one critic update in imagination
        from ``start`` (posterior states ``belief [N, H]``, ``state [N, d]`` and ``terminated
        [N, 1]`` of their rows), then the slow critic's step. Returns detached scalar metrics."""
        with self.precision():  # it only sets the trunks' forward precision
            actor_out = self.actor_loss(start)
            metrics = self._step("actor", actor_out["loss_actor"])
            value_out = self.value_loss(actor_out)
            metrics.update(self._step("critic", value_out["loss_value"]))
        self.slow_critic.update()
        for out in (actor_out, value_out):
            metrics.update(_scalars(out))
        return metrics

    # --- reporting -------------------------------------------------------------------------------
    @torch.no_grad()
    def report(self, batch: TensorDictBase, num_samples: int = 8) -> dict:
        """World-model diagnostics on a ``[B, T]`` batch: open-loop prediction (video, MSE and
        SSIM per horizon) and the sequence bits/dim with the model's estimator."""
        pred = open_loop_prediction(self.world_model, batch, context=min(5, batch.shape[1] - 1))
        bpd = sequence_bits_per_dim(self.world_model, batch, num_samples)
        return {
            "video_real": pred["real"],
            "video_pred": pred["pred"],
            "open_loop_mse": pred["mse"],
            "open_loop_ssim": pred["ssim"],
            "bits_per_dim": bpd.mean(),
        }

    # --- checkpoints -----------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Module parameters and buffers, each once, plus optimiser states (one dict for
        checkpoints). The loss modules hold the world model, actor and critics too; their
        entries (``wm_loss.world_model.*`` beside ``world_model.*``) are left out."""
        # nn.Module's methods named explicitly (not super()) so PlannerAgent can borrow these.
        aliases = shared_entries(self)
        modules = nn.Module.state_dict(self, *args, **kwargs)
        return {
            "modules": {k: v for k, v in modules.items() if k not in aliases},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
        }

    def load_state_dict(self, state, strict: bool = True):
        modules = dict(state["modules"])
        for alias, name in shared_entries(self).items():  # checkpoints from before list them
            if name in modules:
                modules.setdefault(alias, modules[name])
        result = nn.Module.load_state_dict(self, modules, strict=strict)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        return result
