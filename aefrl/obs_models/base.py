"""One interface, three observation models (SPEC §3, §6).

Every model is built from the same pieces, so VAE and AEF differ only in how z is made from the
encoder's affine layer and in the objective:

    y ──encoder trunk──► e ──posterior head g(context, e)──► (μ_q, σ_q),  σ_q ∈ [σ_min, σ_max]
                                                              │
    z = μ_q + σ_q ⊙ ξ  (vae: ξ ~ N(0, I))                      │
    z = μ_q + σ_q ⊙ u  (aef: u = W·vec(y) + b; aef_partition: u = y_core)
    z ──decoder trunk d(context, z)──► (μ_x, σ_x) per coordinate of y,  ε = (y − μ_x) / σ_x

Shapes: ``y: [B, *obs_shape]`` (obs_shape ``(C, H, W)`` or ``(D,)``), ``context: [B, context_dim]``
or ``None``, ``z: [B, d]``; every per-sample score is ``[B]`` in nats. ``prior`` is a
``torch.distributions.Distribution`` with batch shape ``[B]`` and event shape ``[d]``
(``Independent(Normal(0, 1), 1)`` when omitted); in the world model it is the RSSM transition
``N(μ_p(h), σ_p(h))``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import distributions as D
from torch import nn
from torch.nn import functional as F

from aefrl.nn import MLP, ConvDecoder, ConvEncoder, check_size, conv_stages
from aefrl.obs_models.gaussian_quad import gaussian_quad

SIGMA_X_MODES = ("learned", "head", "fixed")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def std_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log N(x; 0, 1)``."""
    return -0.5 * x.square() - _HALF_LOG_2PI


def check_obs_shape(obs_shape) -> tuple[int, ...]:
    """Validate an observation shape: ``(C, H, W)`` images or ``(D,)`` vectors, positive ints."""
    try:
        shape = tuple(int(s) for s in obs_shape)
    except TypeError:
        raise ValueError(
            f"obs_shape must be a tuple (C, H, W) or (D,), got {obs_shape!r}"
        ) from None
    if len(shape) not in (1, 3) or any(s <= 0 for s in shape):
        raise ValueError(f"obs_shape must be (C, H, W) or (D,) with positive sizes, got {shape}")
    if len(shape) == 3:
        conv_stages(shape[1], shape[2])
    return shape


class ObservationModel(nn.Module):
    """Base class: shared trunks, the bounded posterior head, the decoder likelihood, sampling.

    Args:
        obs_shape: ``(C, H, W)`` (conv trunks) or ``(D,)`` (MLP trunks).
        latent_dim: d, the size of z.
        context_dim: size of the context vector (the RSSM state h); 0 for none.
        depth: conv trunk width (channels of the first conv layer).
        conv_style: ``"v3"`` (DreamerV3 trunks, default) or ``"v1"`` (DreamerV1 / torchrl
            geometry); see :class:`~aefrl.nn.ConvEncoder`.
        conv_norm: ChannelNorm in the conv trunks.
        hidden: width of MLP layers (vector trunks; the posterior head unless
            ``posterior_hidden`` is given).
        posterior_hidden: width of the posterior head's hidden layer (the world model gives it
            the RSSM's MLP width); None: ``hidden``.
        layers: hidden layers of the vector trunks (0 makes the vector decoder linear).
        sigma_q_min, sigma_q_max: hard bounds of σ_q, ``σ_q = min + (max − min)·sigmoid(s)``;
            the upper bound fixes the scale gauge of the AEF (SPEC §5).
        sigma_x: ``"learned"`` (one parameter per coordinate), ``"head"`` (predicted by the
            decoder from (context, z)) or ``"fixed"`` (``sigma_x_init`` everywhere, Dreamer's MSE
            when 1).
        sigma_x_min: floor added to a learned or predicted σ_x.
        sigma_x_init: initial (or, for ``"fixed"``, constant) σ_x.
    """

    kind: ClassVar[str] = ""
    #: True when :meth:`log_likelihood` is exact rather than importance-sampled.
    exact_likelihood: ClassVar[bool] = False
    #: True when :meth:`encode` is a deterministic function of (y, context): the affine flow
    #: families, trained by their change-of-variables density; False for the VAE (an ELBO).
    deterministic_encoder: ClassVar[bool] = True

    def __init__(
        self,
        obs_shape,
        latent_dim: int,
        context_dim: int = 0,
        *,
        depth: int = 32,
        conv_style: str = "v3",
        conv_norm: bool = True,
        hidden: int = 256,
        posterior_hidden: int | None = None,
        layers: int = 2,
        sigma_q_min: float = 0.1,
        sigma_q_max: float = 1.0,
        sigma_x: str = "learned",
        sigma_x_min: float = 1e-2,
        sigma_x_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.obs_shape = check_obs_shape(obs_shape)
        latent_dim = check_size("latent_dim", latent_dim)  # 4.5 was truncated to 4 latents
        context_dim = check_size("context_dim", context_dim, 0)
        if not 0.0 < sigma_q_min < sigma_q_max:
            raise ValueError(
                f"need 0 < sigma_q_min < sigma_q_max, got {sigma_q_min} and {sigma_q_max}"
            )
        if sigma_x not in SIGMA_X_MODES:
            raise ValueError(f"sigma_x must be one of {', '.join(SIGMA_X_MODES)}, got {sigma_x!r}")
        # A learned or predicted σ_x needs a positive floor: softplus underflows to 0 in float32
        # (a raw output near −100 does it), and log σ_x then makes the objective NaN.
        zero_floor = sigma_x != "fixed" and sigma_x_min == 0
        if sigma_x_min < 0 or sigma_x_init <= sigma_x_min or zero_floor:
            raise ValueError(
                f"need 0 < sigma_x_min < sigma_x_init (sigma_x_min = 0 only with sigma_x=fixed), "
                f"got {sigma_x_min} and {sigma_x_init}"
            )
        self.latent_dim = int(latent_dim)
        self.context_dim = int(context_dim)
        self.sigma_q_min, self.sigma_q_max = float(sigma_q_min), float(sigma_q_max)
        self.sigma_x_mode, self.sigma_x_min = sigma_x, float(sigma_x_min)
        self.num_dims = math.prod(self.obs_shape)
        # Coordinates the decoder scores (fewer where likelihood_mask hides some); a Python
        # number, so log_px never reads the mask's sum back from the device.
        self.num_scored = self.num_dims
        is_image = len(self.obs_shape) == 3
        out_mult = 2 if sigma_x == "head" else 1

        if is_image:
            self.encoder = ConvEncoder(self.obs_shape, depth, conv_style, conv_norm)
            embed_dim = self.encoder.out_dim
            self.decoder = ConvDecoder(
                self.context_dim + self.latent_dim,
                self.obs_shape,
                self.obs_shape[0] * out_mult,
                depth,
                conv_style,
                conv_norm,
            )
        else:
            self.encoder = MLP(self.num_dims, None, hidden, layers) if layers else nn.Identity()
            embed_dim = hidden if layers else self.num_dims
            self.decoder = MLP(
                self.context_dim + self.latent_dim, self.num_dims * out_mult, hidden, layers
            )
        self.embed_dim = embed_dim
        head_width = hidden if posterior_hidden is None else posterior_hidden
        self.posterior_head = MLP(self.context_dim + embed_dim, 2 * self.latent_dim, head_width, 1)

        # σ_x = sigma_x_min + softplus(raw), raw initialised so that σ_x = sigma_x_init.
        raw_init = math.log(math.expm1(sigma_x_init - sigma_x_min))
        if sigma_x == "learned":
            self.sigma_x_raw = nn.Parameter(torch.full(self.obs_shape, raw_init))
        elif sigma_x == "head":
            self.register_buffer("sigma_x_offset", torch.tensor(raw_init))
        else:
            self.register_buffer("sigma_x_fixed", torch.tensor(float(sigma_x_init)))

    # --- input checks ----------------------------------------------------------------------------
    def _check_y(self, y: torch.Tensor) -> None:
        if not torch.is_tensor(y) or y.dim() != 1 + len(self.obs_shape):
            got = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"y must be a tensor of shape [B, {self._shape_str()}], got {got}")
        if tuple(y.shape[1:]) != self.obs_shape:
            raise ValueError(f"y must have shape [B, {self._shape_str()}], got {tuple(y.shape)}")
        if not y.is_floating_point():
            raise ValueError(
                f"y must be a floating-point tensor (pre-processed by aefrl.preprocess), "
                f"got {y.dtype}"
            )

    def _shape_str(self) -> str:
        return ", ".join(map(str, self.obs_shape))

    def _check_context(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if self.context_dim == 0:
            if context is not None and context.shape[-1] != 0:
                raise ValueError("this model was built with context_dim=0 but got a context")
            return
        if context is None or context.shape[-1] != self.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(
                f"context must have shape [..., {self.context_dim}] (context_dim), got {got}"
            )
        if context.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                f"context batch shape {tuple(context.shape[:-1])} does not match "
                f"{tuple(x.shape[:-1])}"
            )

    def _with_context(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        self._check_context(x, context)
        return x if self.context_dim == 0 else torch.cat([context, x], -1)

    def _prior(self, prior: D.Distribution | None, like: torch.Tensor) -> D.Distribution:
        """The given prior, or ``Independent(Normal(0, 1), 1)`` with batch shape ``[B]``."""
        if prior is None:
            zeros = like.new_zeros(like.shape[0], self.latent_dim)
            return D.Independent(D.Normal(zeros, torch.ones_like(zeros)), 1)
        if tuple(prior.event_shape) != (self.latent_dim,):
            raise ValueError(
                f"prior must have event shape [{self.latent_dim}] (latent_dim), "
                f"got {list(prior.event_shape)}"
            )
        return prior

    # --- pieces shared with the world model -------------------------------------------------------
    def encoder_input(self, y: torch.Tensor) -> torch.Tensor:
        """What the encoder trunk sees (the partition family hides the core)."""
        return y

    def coords(self, y: torch.Tensor) -> torch.Tensor | None:
        """The coordinates the encoder affine layer scales: u (AEF), y_core (partition), None."""
        return None

    def embed(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Everything that depends on y alone: ``(e [B, E], coords [B, d] or None)``.

        In a sequence model this runs once on all B·T frames before the recurrent loop.
        """
        return self.encoder(self.encoder_input(y)), self.coords(y)

    def posterior(
        self, e: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder affine layer parameters ``(μ_q, σ_q)``, each ``[..., d]``, σ_q hard-bounded."""
        weights = self.posterior_weights()
        return self.posterior_projected(self.project_embed(e, weights), context, weights)

    def posterior_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior head's first-layer weight split by input: ``(W_c [P, context_dim],
        W_e [P, E])`` (the head reads ``[context, e]``; P is its width, ``posterior_hidden``).

        A filtering loop splits once per sequence and passes the pair to every step: slicing the
        weight inside each step would make autograd zero-fill a full-size gradient per slice.
        """
        return self.posterior_head[0].weight.split([self.context_dim, self.embed_dim], 1)

    def project_embed(self, e: torch.Tensor, weights=None) -> torch.Tensor:
        """The embedding's share of the posterior head's first layer, ``W_e e + b``:
        ``[..., E] -> [..., P]``. It does not depend on the context, so a sequence model
        projects all B·T embeddings in one matmul before its recurrent loop."""
        w_e = (weights or self.posterior_weights())[1]
        return F.linear(e, w_e, self.posterior_head[0].bias)

    def posterior_projected(
        self, projected: torch.Tensor, context: torch.Tensor | None = None, weights=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`posterior` of an embedding already passed through :meth:`project_embed`
        (``projected [..., P]``), with ``weights`` from :meth:`posterior_weights`."""
        self._check_context(projected, context)
        x = projected
        if self.context_dim:
            x = x + F.linear(context, (weights or self.posterior_weights())[0])
        for layer in list(self.posterior_head)[1:]:
            x = layer(x)
        mu, raw = x.chunk(2, -1)
        sigma = self.sigma_q_min + (self.sigma_q_max - self.sigma_q_min) * torch.sigmoid(raw)
        return mu, sigma

    def latent(
        self,
        mu_q: torch.Tensor,
        sigma_q: torch.Tensor,
        coords: torch.Tensor | None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z from the encoder affine layer (see the class docstrings)."""
        raise NotImplementedError

    def decoder_params(
        self, z: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ_x, σ_x)`` in y-space; μ_x ``[B, *obs_shape]``, σ_x broadcastable to it."""
        out = self.decoder(self._with_context(z, context))
        if self.sigma_x_mode == "head":
            # Images: mean and scale stacked on the channel axis; vectors: on the last axis.
            mu, raw = out.chunk(2, dim=-len(self.obs_shape))
            return mu, self.sigma_x_min + F.softplus(raw + self.sigma_x_offset)
        if self.sigma_x_mode == "learned":
            return out, self.sigma_x_min + F.softplus(self.sigma_x_raw)
        return out, self.sigma_x_fixed

    def likelihood_mask(self) -> torch.Tensor | None:
        """Coordinates scored by the decoder (all, unless a family hides some)."""
        return None

    def log_px(self, y: torch.Tensor, mu_x: torch.Tensor, sigma_x: torch.Tensor) -> torch.Tensor:
        """``Σ_i [log N(ε_i; 0, 1) − log σ_x,i]`` over scored coordinates, ``ε = (y − μ_x)/σ_x``.

        ``y``, ``mu_x``: ``[..., *obs_shape]`` -> ``[...]``.
        """
        event = len(self.obs_shape)
        mask = self.likelihood_mask()
        quad = gaussian_quad(y, mu_x, sigma_x, event, mask)  # Σ ε² with a lean backward
        log_sigma = torch.log(sigma_x)
        count = self.num_dims
        if mask is not None:
            count = self.num_scored
            log_sigma = log_sigma * mask
        # Sums over the event axes rather than flattens, which would copy channels-last images.
        axes = tuple(range(-event, 0))
        # σ_x shared by all samples ("learned", "fixed"): Σ log σ_x once, not once per sample.
        if log_sigma.dim() <= event:
            log_det = log_sigma.sum() if log_sigma.dim() else log_sigma * count
        else:
            log_det = log_sigma.sum(axes)
        return -0.5 * quad - log_det - count * _HALF_LOG_2PI

    # --- public API ------------------------------------------------------------------------------
    def encode(
        self,
        y: torch.Tensor,
        context: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``y [B, *obs_shape] -> z [B, d]`` (deterministic for the AEF families)."""
        self._check_y(y)
        e, coords = self.embed(y)
        mu_q, sigma_q = self.posterior(e, context)
        return self.latent(mu_q, sigma_q, coords, noise)

    def decode(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder mean ``μ_x(context, z)``, ``[B, *obs_shape]`` in y-space."""
        return self.decoder_params(z, context)[0]

    def sample(
        self,
        num_samples: int | None = None,
        context: torch.Tensor | None = None,
        prior: D.Distribution | None = None,
        pixel_noise: bool = True,
    ) -> torch.Tensor:
        """Draw ``y ~ p(y | context)``: ``z ~ prior``, ``y = μ_x + σ_x ε`` (``ε = 0`` when
        ``pixel_noise`` is False, the usual choice for showing images). Returns ``[B, *obs_shape]``.
        """
        if prior is None:
            if num_samples is None:
                num_samples = context.shape[0] if context is not None else None
            if num_samples is None:
                raise ValueError("sample needs num_samples, a context or a prior")
            like = next(self.parameters()).new_empty(num_samples, 0)
            prior = self._prior(None, like)
        z = prior.sample()
        mu_x, sigma_x = self.decoder_params(z, context)
        y = mu_x + sigma_x * torch.randn_like(mu_x) if pixel_noise else mu_x
        return self._complete_sample(y, z, context)

    def _complete_sample(
        self, y: torch.Tensor, z: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        """The sample ``y [B, *obs_shape]`` decoded from ``z [B, d]``, as returned: the decoder
        draws every coordinate here; the partition family fills its core in from z."""
        return y

    def objective(
        self,
        y: torch.Tensor,
        context: torch.Tensor | None = None,
        prior: D.Distribution | None = None,
    ) -> torch.Tensor:
        """Per-sample training objective ``[B]`` to maximise."""
        raise NotImplementedError

    def log_likelihood(
        self,
        y: torch.Tensor,
        context: torch.Tensor | None = None,
        prior: D.Distribution | None = None,
        num_samples: int = 128,
        chunk_size: int = 4096,
    ) -> torch.Tensor:
        """Per-sample ``log p(y | context)`` in nats, ``[B]`` (SPEC §6).

        Importance-sampled with ``num_samples`` proposals, ``logsumexp_k log w_k − log K``, unless
        the model is exact. ``chunk_size`` bounds how many decoder passes run at once (samples
        x batch), but never below one sample for the whole batch: ``max(B, chunk_size)``.
        """
        self._check_y(y)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        prior = self._prior(prior, y)
        e, coords = self.embed(y)
        mu_q, sigma_q = self.posterior(e, context)
        per_chunk = max(1, chunk_size // y.shape[0])
        log_w = []
        remaining = num_samples
        while remaining > 0:
            k = min(per_chunk, remaining)
            log_w.append(self._log_weights(y, mu_q, sigma_q, coords, context, prior, k))
            remaining -= k
        return torch.logsumexp(torch.cat(log_w, 0), 0) - math.log(num_samples)

    def proposal(
        self, coords: torch.Tensor | None, xi: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """The importance proposal of :meth:`log_likelihood` and of the sequence estimator
        (:func:`aefrl.world_model.evaluation.sequence_log_likelihood`), from standard-normal
        draws ``xi [..., d]``: the coordinates and the noise that :meth:`latent` maps to the
        proposed ``z = μ_q + σ_q ⊙ u``, and ``log q`` of the draw ``[...]`` without the
        ``−Σ log σ_q`` of that map, which every family's weight adds itself:

            log w = log p(y | z) + log p(z) + Σ log σ_q − log q.

        Families with an exact likelihood (one "sample", the posterior's own ``z``) keep this
        default: the coordinates unchanged, no noise, ``log q = 0``.
        """
        if not self.exact_likelihood:
            raise NotImplementedError(f"{type(self).__name__} must define its proposal")
        return coords, None, xi.new_zeros(xi.shape[:-1])

    def _log_weights(self, y, mu_q, sigma_q, coords, context, prior, k) -> torch.Tensor:
        """``k`` importance log-weights per sample, ``[k, B]`` (:meth:`proposal`'s formula)."""
        like = mu_q if coords is None else coords
        xi = torch.randn((k, *like.shape), dtype=like.dtype, device=like.device)
        u, noise, log_q = self.proposal(None if coords is None else coords.expand_as(xi), xi)
        z = self.latent(mu_q, sigma_q, u, noise)
        ctx = None if context is None else context.expand(k, *context.shape)
        log_px, _ = self.decoder_log_px(y, z, ctx)
        return log_px + prior.log_prob(z) + sigma_q.log().sum(-1) - log_q

    def decoder_log_px(
        self, y: torch.Tensor, z: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log p(y | context, z)`` over any leading dims ``[*L]`` in one decoder pass:
        ``z [*L, d]``, ``context [*L, C]`` (or None), ``y`` broadcastable to
        ``[*L, *obs_shape]`` -> ``log p [*L]`` and the σ_x used (``[*L, *obs_shape]`` from a
        σ_x head, else ``obs_shape`` or a scalar)."""
        lead = z.shape[:-1]
        ctx = None if context is None else context.reshape(-1, context.shape[-1])
        mu_x, sigma_x = self.decoder_params(z.reshape(-1, z.shape[-1]), ctx)
        if sigma_x.dim() > len(self.obs_shape):
            sigma_x = sigma_x.unflatten(0, lead)
        return self.log_px(y, mu_x.unflatten(0, lead), sigma_x), sigma_x

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, obs_shape={self.obs_shape}, latent_dim={self.latent_dim}, "
            f"context_dim={self.context_dim}, sigma_q=[{self.sigma_q_min}, {self.sigma_q_max}], "
            f"sigma_x={self.sigma_x_mode!r}"
        )
