"""World-model loss (SPEC §3) as a torchrl ``LossModule``.

Both modes return the same four terms, so loss scales are configured the same way:

* ``loss_obs``: ``−Σ_i [log N(ε_i) − log σ_x,i]``, the decoder's negative log-likelihood of y_t,
  minus ActNorm's log-determinant ``n·Σ_c log a_c`` when the pre-processing has ActNorm (the
  part of ℓ_P with parameters: trained on ``log p(y)`` alone, the ActNorm scale would shrink y, a
  change of units that raises ``log p(y)`` without modelling x̃ any better).
* ``loss_latent``: VAE — ``β_dyn·max(free, KL(sg q ‖ p)) + β_rep·max(free, KL(q ‖ sg p))``;
  AEF — ``−log p(z_t | h_t) − Σ_j log σ_q,j`` (cross-entropy to the prior plus the encoder
  layer's volume term; no KL, no free nats). In AEF mode ``loss_obs + loss_latent = −J_t``
  (``−J_t − n·Σ_c log a_c`` with ActNorm).
* ``loss_reward``: two-hot NLL of r_t; ``loss_continue``: Bernoulli NLL of 1 − terminated_t.

Each is a mean over the ``[B, T]`` batch of per-step sums. Diagnostics (not differentiated) are
returned next to the losses; the posterior states are returned for imagination.

A batch with ``context_belief`` and ``context_state`` entries (``agent.replay_context``) starts
each window's scan from its first row's context instead of zeros (DreamerV3's ``replay_context``;
the scan still resets where ``is_first`` is set).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from torch import distributions as D
from torchrl.objectives import LossModule

from aefrl import keys
from aefrl.world_model import WorldModel
from aefrl.world_model.world_model import stored_start


def _kl(mu_a, sigma_a, mu_b, sigma_b) -> torch.Tensor:
    """``KL(N(μ_a, σ_a) ‖ N(μ_b, σ_b))`` summed over the last axis."""
    return D.kl_divergence(
        D.Independent(D.Normal(mu_a, sigma_a), 1), D.Independent(D.Normal(mu_b, sigma_b), 1)
    )


#: WorldModelLoss settings that only the VAE's KL term reads.
VAE_ONLY = ("free_nats", "kl_dyn_scale", "kl_rep_scale")


class WorldModelLoss(LossModule):
    """Loss of a :class:`~aefrl.world_model.WorldModel` on a ``[B, T]`` replay batch.

    Args:
        world_model: the model.
        free_nats: VAE only; KL below this many nats per step is not penalised.
        kl_dyn_scale, kl_rep_scale: VAE only; KL balancing (DreamerV3: 0.5 and 0.1).
        loss_scales: multipliers for ``obs``, ``latent``, ``reward``, ``continue`` applied in
            :meth:`total`.
        state_grad: the returned posteriors ``belief [B, T, H]`` and ``state [B, T, d]`` keep
            their graph, for a loss that trains the world model through them too (DreamerV3's
            ``repval_grad``); ``False`` (the default) returns them detached.
    """

    @dataclass
    class _AcceptedKeys:
        pixels: str = keys.PIXELS
        prev_action: str = keys.PREV_ACTION
        reward: str = keys.REWARD
        is_first: str = keys.IS_FIRST
        terminated: str = keys.TERMINATED
        context_belief: str = keys.CONTEXT_BELIEF
        context_state: str = keys.CONTEXT_STATE

    default_keys = _AcceptedKeys

    def __init__(
        self,
        world_model: WorldModel,
        *,
        free_nats: float = 1.0,
        kl_dyn_scale: float = 0.5,
        kl_rep_scale: float = 0.1,
        loss_scales: dict[str, float] | None = None,
        state_grad: bool = False,
    ) -> None:
        super().__init__()
        self.world_model = world_model
        self.state_grad = bool(state_grad)
        self.free_nats = float(free_nats)
        self.kl_dyn_scale = float(kl_dyn_scale)
        self.kl_rep_scale = float(kl_rep_scale)
        scales = {"obs": 1.0, "latent": 1.0, "reward": 1.0, "continue": 1.0}
        unknown = set(loss_scales or {}) - set(scales)
        if unknown:
            raise ValueError(f"unknown loss scale(s) {sorted(unknown)}; accepted: {sorted(scales)}")
        scales.update(loss_scales or {})
        for name, value in {"free_nats": free_nats, "kl_dyn_scale": kl_dyn_scale,
                            "kl_rep_scale": kl_rep_scale}.items():  # fmt: skip
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in scales.items():
            if not value >= 0:
                raise ValueError(f"loss_scales.{name} must be >= 0, got {value}")
        self.loss_scales = scales

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def forward(self, batch: TensorDictBase) -> TensorDict:
        wm = self.world_model
        om = wm.obs_model
        k = self.tensor_keys
        # The filter reads the world model's own key names: hand it the batch's entries under
        # them, so keys renamed with set_keys are honoured (a mapping, no tensordict copy).
        filt = wm.filter(
            {
                keys.PIXELS: batch[k.pixels],
                keys.PREV_ACTION: batch[k.prev_action],
                keys.IS_FIRST: batch[k.is_first],
            },
            stored_start(batch, k.context_belief, k.context_state, wm.dtype),
            train_noise=True,  # the recurrence reads z with the world model's dynamics_noise
        )
        obs = filt.observed
        h, z = obs.state.h, obs.state.z
        log_px, sigma_x = om.decoder_log_px(filt.y, z, h)  # [B, T]

        out = {}
        if not om.deterministic_encoder:  # the VAE: an ELBO's KL, balanced as in DreamerV3
            kl_dyn = _kl(obs.mu_q.detach(), obs.sigma_q.detach(), obs.mu_p, obs.sigma_p)
            kl_rep = _kl(obs.mu_q, obs.sigma_q, obs.mu_p.detach(), obs.sigma_p.detach())
            latent = self.kl_dyn_scale * kl_dyn.clamp_min(self.free_nats)
            latent = latent + self.kl_rep_scale * kl_rep.clamp_min(self.free_nats)
            out["kl"] = kl_dyn.detach().mean()
        else:
            log_prior = obs.prior().log_prob(z)
            log_det_q = obs.sigma_q.log().sum(-1)
            latent = -(log_prior + log_det_q)
            out["log_prior"] = log_prior.detach().mean()
            out["log_det_q"] = log_det_q.detach().mean()
            out["J"] = (log_px + log_prior + log_det_q).detach().mean()

        nll_obs = -log_px.mean()
        if wm.preprocess.actnorm:  # ℓ_P's learned part; the rest has no parameters
            nll_obs = nll_obs - wm.preprocess.learned_logdet()
        feat = obs.state.feat
        reward = batch[self.tensor_keys.reward].squeeze(-1).to(feat.dtype)
        cont = 1.0 - batch[self.tensor_keys.terminated].squeeze(-1).to(feat.dtype)
        reward_dist = wm.reward_head(feat)
        out.update(
            loss_obs=nll_obs,
            loss_latent=latent.mean(),
            loss_reward=-reward_dist.log_prob(reward).mean(),
            loss_continue=-wm.continue_head(feat).log_prob(cont).mean(),
            reward_mae=(reward_dist.mean.detach() - reward).abs().mean(),
            sigma_q_mean=obs.sigma_q.detach().mean(),
            sigma_q_min=obs.sigma_q.detach().min(),
            sigma_q_max=obs.sigma_q.detach().max(),
            prior_std_mean=obs.sigma_p.detach().mean(),
            # z's spread over the batch's B·T rows, mean over its d dims: the AEF's scale gauge
            # moves it with the prior's std (docs/math.md §5), which alone does not show it
            z_std=z.detach().flatten(0, -2).std(0).mean(),
            sigma_x_mean=sigma_x.detach().mean(),
            recon_bpd=self._bpd(log_px.detach(), filt.logdet),
        )
        td = TensorDict(out, batch_size=[])
        if not self.state_grad:
            h, z = h.detach(), z.detach()
        td.set(keys.BELIEF, h, non_blocking=True)
        td.set(keys.STATE, z, non_blocking=True)
        return td

    def _bpd(self, log_px: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
        """The decoder term ``log p(y | h, z)`` in bits/dim (a diagnostic, not a likelihood: for
        ``aef_partition`` it scores the D − d shell coordinates but is spread over all D)."""
        return self.world_model.preprocess.bits_per_dim(log_px.mean(), logdet.mean())

    def total(self, losses: TensorDictBase) -> torch.Tensor:
        """The scalar to minimise: ``Σ_k scale_k · loss_k``."""
        return sum(self.loss_scales[k] * losses[f"loss_{k}"] for k in self.loss_scales)
