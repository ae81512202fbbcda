"""Recurrent state-space model whose posterior head is the observation model's encoder layer.

Time alignment (the replay's *arrival* layout: row t holds what arrived at time t)::

    replay row t:        o_t            a_{t-1}           r_t          is_first_t   terminated_t
                          │                │               ▲                            ▲
                          │   h_t = f(h_{t-1}, z_{t-1}, a_{t-1})   (h, z, a zeroed at is_first_t)
                          │                │               │                            │
    prior                 │   p(z_t | h_t) = N(μ_p(h_t), σ_p(h_t)),  σ_p ≥ prior_std_min
    posterior   e_t = CNN(y_t) ─► z_t = μ_q(h_t, e_t) + σ_q(h_t, e_t) ⊙ {ξ_t | u_t | y_c,t}
    heads on feat_t = [h_t, z_t]:  decoder μ_x(feat_t) ─► y_t,  r̂(feat_t) ─► r_t,
                                   ĉ(feat_t) ─► 1 − terminated_t
    acting                a_t = π(feat_t)  ─►  stored as prev_action of row t+1

So a_{t-1} and o_t enter the same step, and the reward head never sees the action it scores
through anything but h_t. Imagination replaces the posterior by a prior sample (SPEC §4).

Shapes: ``[B, T, ...]`` at every sequence boundary, ``[N, ...]`` for single steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import distributions as D
from torch import nn
from torch.nn import functional as F

from aefrl.nn import MLP, check_size
from aefrl.obs_models import ObservationModel


@dataclass
class RSSMState:
    """``h`` (belief) ``[..., H]`` and ``z`` (state) ``[..., d]``."""

    h: torch.Tensor
    z: torch.Tensor

    @property
    def feat(self) -> torch.Tensor:
        """``[h, z]``, ``[..., H + d]`` — what every head reads."""
        return torch.cat([self.h, self.z], -1)

    def flatten(self) -> RSSMState:
        """``[B, T, ...] -> [B*T, ...]``."""
        return RSSMState(self.h.flatten(0, 1), self.z.flatten(0, 1))


@dataclass
class Observed:
    """What :meth:`RSSM.observe` returns for a ``[B, T]`` batch."""

    state: RSSMState  # posterior states, h [B, T, H], z [B, T, d]
    mu_q: torch.Tensor  # [B, T, d]
    sigma_q: torch.Tensor  # [B, T, d]
    mu_p: torch.Tensor  # [B, T, d]
    sigma_p: torch.Tensor  # [B, T, d]
    last: RSSMState  # state after the last step, [B, ...]

    def prior(self) -> D.Independent:
        return D.Independent(D.Normal(self.mu_p, self.sigma_p), 1)


class RSSM(nn.Module):
    """GRU belief ``h``, continuous Gaussian latent ``z``; the posterior is ``obs_model``'s.

    Args:
        obs_model: an :class:`~aefrl.obs_models.ObservationModel` built with
            ``context_dim = deter``; its encoder affine layer is the posterior head.
        action_dim: A.
        deter: size of h.
        hidden: width of the input and prior MLPs.
        prior_std_min: lower bound of σ_p, so that the prior density stays finite (SPEC §1).
        dynamics_noise: s, the scale of the noise the recurrence reads on z while a training
            batch is filtered (``observe(train_noise=True)``): ``z_t + s·sg(σ_p(h_t))·ε`` feeds
            ``h_{t+1}``, where the heads, decoder and likelihood read z_t itself. The AEF's
            encoding is exact, so without it its dynamics meet the prior's spread only in
            imagination (a VAE's recurrence reads its posterior samples). 0: off.
    """

    def __init__(
        self,
        obs_model: ObservationModel,
        action_dim: int,
        deter: int = 256,
        hidden: int = 256,
        prior_std_min: float = 0.1,
        dynamics_noise: float = 0.0,
    ) -> None:
        super().__init__()
        deter = check_size("deter", deter)
        if obs_model.context_dim != deter:
            raise ValueError(
                f"the observation model's context_dim ({obs_model.context_dim}) must equal "
                f"the RSSM's deter ({deter})"
            )
        if prior_std_min <= 0:
            raise ValueError(f"prior_std_min must be > 0, got {prior_std_min}")
        if not 0 <= dynamics_noise < math.inf:  # NaN fails too
            raise ValueError(f"dynamics_noise must be a finite number >= 0, got {dynamics_noise}")
        self.obs_model = obs_model
        self.latent_dim = obs_model.latent_dim
        self.action_dim = int(action_dim)
        self.deter = deter
        self.prior_std_min = float(prior_std_min)
        self.dynamics_noise = float(dynamics_noise)
        self.img_in = MLP(self.latent_dim + self.action_dim, None, hidden, 1)
        self.gru = nn.GRUCell(hidden, self.deter)
        self.prior_head = MLP(self.deter, 2 * self.latent_dim, hidden, 1)

    @property
    def feat_dim(self) -> int:
        return self.deter + self.latent_dim

    def initial(self, batch: int, device=None, dtype=None) -> RSSMState:
        """The state before the first step of an episode: zeros."""
        w = self.gru.weight_hh
        device, dtype = device or w.device, dtype or w.dtype
        return RSSMState(
            torch.zeros(batch, self.deter, device=device, dtype=dtype),
            torch.zeros(batch, self.latent_dim, device=device, dtype=dtype),
        )

    # --- one step ------------------------------------------------------------------------------
    def recurrent(self, prev: RSSMState, prev_action: torch.Tensor) -> torch.Tensor:
        """``h_t = GRU(h_{t-1}, MLP([z_{t-1}, a_{t-1}]))``, ``[N, H]``."""
        return self.gru(self.img_in(torch.cat([prev.z, prev_action], -1)), prev.h)

    def prior_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ_p, σ_p)`` of ``p(z_t | h_t)``, each ``[..., d]``, ``σ_p ≥ prior_std_min``."""
        mu, raw = self.prior_head(h).chunk(2, -1)
        return mu, self.prior_std_min + F.softplus(raw)

    def prior(self, h: torch.Tensor) -> D.Independent:
        mu, sigma = self.prior_params(h)
        return D.Independent(D.Normal(mu, sigma), 1)

    def img_step(
        self, prev: RSSMState, prev_action: torch.Tensor, noise: torch.Tensor | None = None
    ) -> RSSMState:
        """One imagined step: ``h_t`` from the recurrence, ``z_t ~ p(z_t | h_t)`` (reparameterised;
        ``noise`` is the standard-normal draw, sampled when omitted)."""
        h = self.recurrent(prev, prev_action)
        mu, sigma = self.prior_params(h)
        if noise is None:
            noise = torch.randn_like(mu)
        return RSSMState(h, mu + sigma * noise)

    def obs_step(
        self,
        prev: RSSMState,
        prev_action: torch.Tensor,
        embed: torch.Tensor,
        coords: torch.Tensor | None,
        is_first: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> tuple[RSSMState, torch.Tensor, torch.Tensor]:
        """One filtering step on a real observation: ``prev`` (h ``[N, H]``, z ``[N, d]``),
        ``prev_action [N, A]``, ``embed [N, E]`` and ``coords [N, d]`` (or None) from
        ``obs_model.embed``, ``is_first [N, 1]`` (resets h, z and a_{t-1} to zero first),
        ``noise [N, d]`` (the VAE's draw; sampled when None). Returns the posterior state and
        ``(μ_q, σ_q)``, each ``[N, d]``."""
        weights = self.obs_model.posterior_weights()
        projected = self.obs_model.project_embed(embed, weights)
        return self.filter_step(prev, prev_action, projected, coords, is_first, noise, weights)

    def filter_step(
        self,
        prev: RSSMState,
        prev_action: torch.Tensor,
        projected: torch.Tensor,
        coords: torch.Tensor | None,
        is_first: torch.Tensor,
        noise: torch.Tensor | None,
        weights: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[RSSMState, torch.Tensor, torch.Tensor]:
        """:meth:`obs_step` on an embedding already projected by ``obs_model.project_embed``
        (``projected [N, P]``, P the posterior head's width), with ``weights`` from
        ``obs_model.posterior_weights()``."""
        # where, not a multiplication by 0/1: a non-finite state of the episode before must
        # not outlive the reset (inf · 0 is nan).
        first = is_first.bool()
        prev = RSSMState(prev.h.where(~first, 0.0), prev.z.where(~first, 0.0))
        h = self.recurrent(prev, prev_action.where(~first, 0.0))
        mu_q, sigma_q = self.obs_model.posterior_projected(projected, h, weights)
        z = self.obs_model.latent(mu_q, sigma_q, coords, noise)
        return RSSMState(h, z), mu_q, sigma_q

    # --- sequences -----------------------------------------------------------------------------
    def observe(
        self,
        embed: torch.Tensor,
        coords: torch.Tensor | None,
        prev_action: torch.Tensor,
        is_first: torch.Tensor,
        state: RSSMState | None = None,
        noise: torch.Tensor | None = None,
        train_noise: bool = False,
    ) -> Observed:
        """Filter a ``[B, T]`` sequence: embed ``[B, T, E]``, coords ``[B, T, d]`` or None,
        prev_action ``[B, T, A]``, is_first ``[B, T, 1]``, noise ``[B, T, d]`` (VAE) or None.
        ``train_noise``: the recurrence reads z with ``dynamics_noise`` (training batches only;
        the returned states are the filter's own, and ``last`` too).

        The encoder ran on all B·T frames before this call, and the embedding's share of the
        posterior head runs here on all of them at once; only the recurrence is sequential, and
        the prior head runs once on all h afterwards. Inputs are split by ``unbind``, whose
        backward stacks the T step gradients once (indexing ``x[:, t]`` would zero-fill a
        ``[B, T, ...]`` gradient per step).
        """
        batch, steps = embed.shape[:2]
        if state is None:
            state = self.initial(batch, embed.device, embed.dtype)
        weights = self.obs_model.posterior_weights()
        per_step = [
            self.obs_model.project_embed(embed, weights).unbind(1),
            [None] * steps if coords is None else coords.unbind(1),
            prev_action.unbind(1),
            is_first.unbind(1),
            [None] * steps if noise is None else noise.unbind(1),
        ]
        hs, zs, mus, sigmas = [], [], [], []
        perturb = train_noise and self.dynamics_noise > 0  # no draws when off
        exact = state
        for projected, coord, action, first, eps in zip(*per_step):
            exact, mu_q, sigma_q = self.filter_step(
                state, action, projected, coord, first, eps, weights
            )
            hs.append(exact.h)
            zs.append(exact.z)
            mus.append(mu_q)
            sigmas.append(sigma_q)
            # what the next step's recurrence reads; the filter's own state is returned
            state = self.perturbed(exact) if perturb else exact
        h = torch.stack(hs, 1)
        mu_p, sigma_p = self.prior_params(h)
        return Observed(
            state=RSSMState(h, torch.stack(zs, 1)),
            mu_q=torch.stack(mus, 1),
            sigma_q=torch.stack(sigmas, 1),
            mu_p=mu_p,
            sigma_p=sigma_p,
            last=exact,
        )

    def perturbed(self, state: RSSMState) -> RSSMState:
        """``(h_t, z_t + s·sg(σ_p(h_t))·ε)``, ``ε ~ N(0, I)``: z on the scale of the prior's
        spread around it, as imagination samples it. σ_p is held fixed (no gradient), so the
        noise cannot train the prior to shrink it."""
        with torch.no_grad():
            _, sigma = self.prior_params(state.h)
        return RSSMState(state.h, state.z + self.dynamics_noise * sigma * torch.randn_like(sigma))

    def imagine(self, start: RSSMState, actions: torch.Tensor) -> RSSMState:
        """Open-loop prior rollout from ``start [N, ...]`` under ``actions [N, K, A]``:
        states ``[N, K, ...]`` after each action (used for video prediction)."""
        hs, zs = [], []
        state = start
        for k in range(actions.shape[1]):
            state = self.img_step(state, actions[:, k])
            hs.append(state.h)
            zs.append(state.z)
        return RSSMState(torch.stack(hs, 1), torch.stack(zs, 1))
