"""The VAE observation model, the baseline (SPEC §3, "VAE mode")."""

from __future__ import annotations

import torch
from torch import distributions as D

from aefrl.obs_models.base import ObservationModel, std_normal_log_prob


def posterior_kl(
    mu_q: torch.Tensor, sigma_q: torch.Tensor, prior: D.Distribution, z: torch.Tensor
) -> torch.Tensor:
    """``KL(N(μ_q, σ_q) ‖ prior)`` per sample, analytic when torch knows it, else the
    single-sample estimate ``log q(z) − log p(z)`` at the given ``z``. Shapes ``[B, d] -> [B]``."""
    q = D.Independent(D.Normal(mu_q, sigma_q), 1)
    try:
        return D.kl_divergence(q, prior)
    except NotImplementedError:
        return q.log_prob(z) - prior.log_prob(z)


class VAEObservationModel(ObservationModel):
    """Stochastic encoder ``z = μ_q + σ_q ⊙ ξ``, ``ξ ~ N(0, I)``; trained by the ELBO.

    ``objective`` is the single-sample ELBO ``log p(y | z) − KL(q(z | y) ‖ p(z))`` (the KL in
    closed form when the prior allows it). ``log_likelihood`` importance-samples with the
    posterior as proposal: ``log w = log p(y | z) + log p(z) − log q(z | y)``, ``z ~ q``.
    """

    kind = "vae"
    deterministic_encoder = False

    def latent(self, mu_q, sigma_q, coords=None, noise=None):
        """``z = μ_q + σ_q ⊙ ξ``; pass ``noise`` (ξ) for a deterministic call."""
        if noise is None:
            noise = torch.randn_like(mu_q)
        return mu_q + sigma_q * noise

    def objective(self, y, context=None, prior=None):
        self._check_y(y)
        prior = self._prior(prior, y)
        e, _ = self.embed(y)
        mu_q, sigma_q = self.posterior(e, context)
        z = self.latent(mu_q, sigma_q)
        mu_x, sigma_x = self.decoder_params(z, context)
        return self.log_px(y, mu_x, sigma_x) - posterior_kl(mu_q, sigma_q, prior, z)

    def proposal(self, coords, xi):
        """The posterior itself: ``xi`` is its noise, ``z = μ_q + σ_q ⊙ ξ``, ``log q`` of the
        draw ``log N(ξ; 0, I)`` (:meth:`ObservationModel.proposal`)."""
        return coords, xi, std_normal_log_prob(xi).sum(-1)
