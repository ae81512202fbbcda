"""AutoEncoders within a Flow (Silvestri, Roos & Ambrogioni, ICLR 2023, arXiv 2205.09546).

The encoder and decoder are the two affine layers of one invertible map, so the encoding is
deterministic and training maximises a log-density instead of an ELBO (SPEC §3).

Expansion family (:class:`AEFObservationModel`, ``kind="aef"``): the ambient space is expanded by
d coordinates set to ``u = W·vec(y) + b``; the map ``(y, u) ↦ (z, ε)`` with

    z = μ_q(c, e(y)) + σ_q(c, e(y)) ⊙ u,        ε = (y − μ_x(c, z)) / σ_x(c, z)

is invertible given the context c with ``log|det| = Σ_j log σ_q,j − Σ_i log σ_x,i``, so

    J = log p(z) + Σ_i log N(ε_i; 0, 1) − Σ_i log σ_x,i + Σ_j log σ_q,j  =  log p(y, u).

J is neither a bound on log p(y) nor comparable across models. Since ``dz = Πσ_q du``,
``∫ p(y, u) du = ∫ p(z) N(y; μ_x(z), σ_x²) dz = p(y)``, estimated by importance sampling over u with
proposal ``N(W·y + b, s²I)`` (SPEC §6).

Partition family (:class:`AEFPartitionObservationModel`, ``kind="aef_partition"``): a fixed mask
picks d core coordinates ``y_c``; the encoder sees the shell only, ``z = μ_q + σ_q ⊙ y_c``, and ε
is scored on the shell, which makes ``log p(y)`` exact:

    log p(y) = log p(z) + Σ_{i∈shell} [log N(ε_i) − log σ_x,i] + Σ_j log σ_q,j.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from aefrl.nn import Linear
from aefrl.obs_models.base import ObservationModel, std_normal_log_prob
from aefrl.seeding import forked_torch_rng

PROJECTIONS = ("learned", "random")
# Grid of the importance proposal's scale s (SPEC §6: tuned on held-out data).
PROPOSAL_SCALES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 4.0, 8.0)


def _cuda_devices(module: nn.Module) -> list[int]:
    """CUDA devices holding the module's tensors: those whose generators a tuning run forks."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sorted({t.device.index for t in tensors if t.is_cuda})


class AffineFlowModel(ObservationModel):
    """What both AEF families share: ``z = μ_q + σ_q ⊙ coords`` is the encoder affine layer of an
    invertible map, and the density of the transformed point is
    ``log p(z) + Σ_i [log N(ε_i) − log σ_x,i] + Σ_j log σ_q,j``."""

    def latent(self, mu_q, sigma_q, coords, noise=None):
        """``z = μ_q + σ_q ⊙ coords`` (deterministic; ``noise`` is ignored)."""
        return mu_q + sigma_q * coords

    def flow_log_density(self, y, coords, context=None, prior=None) -> torch.Tensor:
        """Log-density of the point ``(y, coords)`` under the flow, ``[B]``."""
        self._check_y(y)
        prior = self._prior(prior, y)
        mu_q, sigma_q = self.posterior(self.encoder(self.encoder_input(y)), context)
        z = self.latent(mu_q, sigma_q, coords)
        mu_x, sigma_x = self.decoder_params(z, context)
        return prior.log_prob(z) + self.log_px(y, mu_x, sigma_x) + sigma_q.log().sum(-1)

    def objective(self, y, context=None, prior=None):
        self._check_y(y)
        return self.flow_log_density(y, self.coords(y), context, prior)


class AEFObservationModel(AffineFlowModel):
    """AEF, expansion family (the default observation model).

    Extra args:
        projection: ``"learned"`` (W, b trained with the rest) or ``"random"`` (a frozen
            Gaussian W with variance 1/D, b = 0).
        proposal_scale: s, the std of the importance proposal ``N(W·y + b, s²I)`` used by
            :meth:`log_likelihood`; tune it on held-out data with :meth:`tune_proposal_scale`.
    """

    kind = "aef"

    def __init__(
        self,
        obs_shape,
        latent_dim: int,
        context_dim: int = 0,
        *,
        projection: str = "learned",
        proposal_scale: float = 0.1,
        **options,
    ) -> None:
        super().__init__(obs_shape, latent_dim, context_dim, **options)
        if projection not in PROJECTIONS:
            raise ValueError(
                f"projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}"
            )
        if proposal_scale <= 0:
            raise ValueError(f"proposal_scale must be > 0, got {proposal_scale}")
        self.projection_mode = projection
        self.proposal_scale = float(proposal_scale)
        if projection == "learned":
            self.projection = Linear(self.num_dims, self.latent_dim)
        else:
            w = torch.randn(self.latent_dim, self.num_dims) / math.sqrt(self.num_dims)
            self.register_buffer("projection_weight", w)
            self.register_buffer("projection_bias", torch.zeros(self.latent_dim))

    def coords(self, y: torch.Tensor) -> torch.Tensor:
        """``u = W·vec(y) + b``, ``[B, d]``."""
        flat = y.flatten(1)
        if self.projection_mode == "learned":
            return self.projection(flat)
        return F.linear(flat, self.projection_weight, self.projection_bias)

    def joint_log_density(self, y, u, context=None, prior=None) -> torch.Tensor:
        """``log p(y, u)`` of the expanded point at any ``u [B, d]``; J at ``u = W·y + b``
        (what :meth:`objective` returns)."""
        return self.flow_log_density(y, u, context, prior)

    def proposal(self, coords, xi):
        """``u = coords + s·ξ ~ N(W·y + b, s²I)`` around the encoder's coordinates, ``log q``
        of the draw ``log N(ξ; 0, I) − d log s`` (:meth:`ObservationModel.proposal`)."""
        s = self.proposal_scale
        log_q = std_normal_log_prob(xi).sum(-1) - self.latent_dim * math.log(s)
        return coords + s * xi, None, log_q

    @torch.no_grad()
    def tune_proposal_scale(
        self,
        y: torch.Tensor,
        context: torch.Tensor | None = None,
        prior=None,
        scales=PROPOSAL_SCALES,
        num_samples: int = 32,
    ) -> dict[float, float]:
        """Pick s maximising the mean importance-sampled ``log p(y)`` on ``y`` (held-out data).

        Sets ``proposal_scale`` and returns ``{s: mean log p(y)}``; see
        :meth:`search_proposal_scale`.
        """
        return self.search_proposal_scale(
            lambda: float(self.log_likelihood(y, context, prior, num_samples).mean()), scales
        )

    @torch.no_grad()
    def search_proposal_scale(
        self, mean_log_likelihood: Callable[[], float], scales=PROPOSAL_SCALES
    ) -> dict[float, float]:
        """Set ``proposal_scale`` to the s of ``scales`` whose ``mean_log_likelihood()`` (an
        importance-sampled estimate computed with the current ``proposal_scale``) is largest.

        Every s gives an unbiased estimate of p(y); the log of the estimate is biased low by an
        amount that shrinks as the proposal improves, so the largest mean is the best proposal.
        The default grid reaches past the prior's scale (s = 1 with σ_q = 1) because trained
        models on DMC frames were seen to prefer the widest s of a grid that stopped at 1.
        Each s is scored with the same random draws (common random numbers), so the comparison
        is not decided by the draws. Returns ``{s: mean log-likelihood}``.
        """
        results = {}
        old = self.proposal_scale
        seed = int(torch.randint(2**62, ()))
        for s in scales:
            self.proposal_scale = float(s)
            with forked_torch_rng(seed, _cuda_devices(self)):
                results[float(s)] = float(mean_log_likelihood())
        finite = {s: v for s, v in results.items() if math.isfinite(v)}
        self.proposal_scale = max(finite, key=finite.get) if finite else old
        return results

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, projection={self.projection_mode!r}, "
            f"proposal_scale={self.proposal_scale}"
        )


def spiral_core_indices(obs_shape: tuple[int, ...], num: int) -> torch.Tensor:
    """Flat indices of ``num`` core coordinates.

    Images ``(C, H, W)``: pixel positions in rings spiralling out from the image centre (all
    channels of a position before the next position). Vectors ``(D,)``: the first ``num``.
    """
    if len(obs_shape) == 1:
        return torch.arange(num)
    channels, height, width = obs_shape
    ci, cj = (height - 1) / 2, (width - 1) / 2

    def ring_then_angle(p):
        di, dj = p[0] - ci, p[1] - cj
        return (max(abs(di), abs(dj)), math.atan2(di, dj))

    positions = sorted(((i, j) for i in range(height) for j in range(width)), key=ring_then_angle)
    flat = [c * height * width + i * width + j for i, j in positions for c in range(channels)]
    return torch.tensor(flat[:num], dtype=torch.long)


class AEFPartitionObservationModel(AffineFlowModel):
    """AEF, partition family: exact ``log p(y)``.

    Extra args:
        core_indices: flat indices (into ``vec(y)``) of the d core coordinates; default
            :func:`spiral_core_indices`.
    """

    kind = "aef_partition"
    exact_likelihood = True

    def __init__(
        self, obs_shape, latent_dim: int, context_dim: int = 0, *, core_indices=None, **options
    ) -> None:
        super().__init__(obs_shape, latent_dim, context_dim, **options)
        if self.latent_dim >= self.num_dims:
            raise ValueError(
                f"aef_partition needs latent_dim < the observation size {self.num_dims}, "
                f"got {self.latent_dim}"
            )
        with torch.device("cpu"):  # index values, also when the model is built on "meta"
            if core_indices is None:
                idx = spiral_core_indices(self.obs_shape, self.latent_dim)
            else:
                idx = torch.as_tensor(list(core_indices), dtype=torch.long)
            shell = torch.ones(self.num_dims)
        if (
            idx.shape != (self.latent_dim,)
            or idx.unique().numel() != self.latent_dim
            or idx.min() < 0
            or idx.max() >= self.num_dims
        ):
            raise ValueError(
                f"core_indices must be {self.latent_dim} distinct indices in [0, {self.num_dims})"
            )
        shell[idx] = 0.0
        here = torch.empty(0).device  # the default device: the weights' (meta, cuda, ...)
        self.register_buffer("core_idx", idx.to(here))
        self.register_buffer("shell_mask", shell.view(self.obs_shape).to(here))
        self.num_scored = self.num_dims - self.latent_dim  # the shell (idx are distinct)

    def encoder_input(self, y):
        """The shell only: core coordinates set to 0."""
        return y * self.shell_mask

    def coords(self, y):
        """``y_c``, the core coordinates, ``[B, d]``."""
        return y.flatten(1)[:, self.core_idx]

    def likelihood_mask(self):
        return self.shell_mask

    def log_likelihood(self, y, context=None, prior=None, num_samples=1, chunk_size=0):
        """Exact ``log p(y | context)``, the objective (``num_samples`` is ignored)."""
        return self.objective(y, context, prior)

    def decode(self, z, context=None):
        """``z [B, d] -> y [B, *obs_shape]``: the decoder mean on the shell and, on the core, the
        encoder layer inverted at that shell, ``y_c = (z − μ_q(c, y_s)) / σ_q(c, y_s)`` (SPEC §3),
        so that ``encode(decode(z)) = z``. The decoder's own outputs at the core are never
        trained (the likelihood scores the shell only), so they are not shown."""
        return self._solve_core(self.decoder_params(z, context)[0], z, context)

    def _complete_sample(self, y, z, context):
        """:meth:`sample` decodes the shell from ``z ~ prior``; the core inverts the encoder
        layer, ``y_c = (z − μ_q(c, y_s)) / σ_q(c, y_s)``."""
        return self._solve_core(y, z, context)

    def _solve_core(self, y, z, context):
        """``y [B, *obs_shape]`` with its core replaced by the coordinates that encode, with
        ``y``'s shell, to ``z [B, d]``."""
        y = y * self.shell_mask
        mu_q, sigma_q = self.posterior(self.encoder(y), context)
        flat = y.flatten(1).clone()
        flat[:, self.core_idx] = (z - mu_q) / sigma_q
        return flat.view_as(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, core=spiral[{self.latent_dim}]"
