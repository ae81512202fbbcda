"""Shared pre-processing of uint8 observations with its log-determinant (SPEC §2).

    o (uint8)  --dequantise-->  x̃ = (o + v) / 256, v ~ U[0, 1)
               --logit------->  y = logit(α + (1 − 2α) x̃)
               --ActNorm----->  y ← a_c · y + b_c        (optional, per channel)

``ℓ_P = log|det ∂y/∂x̃| = Σ_i [log(1−2α) − log s_i − log(1−s_i)] + n·Σ_c log|a_c|``
(n = positions per channel, H·W for images)
with ``s = α + (1−2α) x̃``. Both observation models score the same ``y``, so a density of ``y``
becomes a density of ``x̃`` by adding ``ℓ_P``, and a bound on the bits per dimension of the discrete
data by :func:`bits_per_dim`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Preprocess(nn.Module):
    """Dequantisation + logit (+ ActNorm), invertible with a per-sample log-determinant.

    Args:
        obs_shape: event shape of one observation, ``(C, H, W)`` for images or ``(D,)``.
        alpha: logit squeeze α in ``(0, 0.5)``; 0.05 as in the AEF paper for natural images.
        actnorm: follow the logit with a per-channel affine map (data-initialised on the first
            training batch, i.e. the first pass in training mode with gradients enabled, then
            learned through the objective ``log p(y) + ℓ_P``).
        num_bins: quantisation levels of the raw data (256 for uint8).

    Shapes: ``x̃, y: [..., *obs_shape]``; log-determinants ``[...]``.
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        alpha: float = 0.05,
        actnorm: bool = False,
        num_bins: int = 256,
    ) -> None:
        super().__init__()
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
        if len(obs_shape) not in (1, 3):
            raise ValueError(f"obs_shape must be (C, H, W) or (D,), got {tuple(obs_shape)}")
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.alpha = float(alpha)
        self.num_bins = int(num_bins)
        self.actnorm = bool(actnorm)
        channels = self.obs_shape[0]
        # Positions sharing one ActNorm scale: H*W for images, 1 for vectors (a scale per feature).
        self._positions = math.prod(self.obs_shape[1:]) if len(self.obs_shape) == 3 else 1
        if self.actnorm:
            self.an_log_scale = nn.Parameter(torch.zeros(channels))
            self.an_bias = nn.Parameter(torch.zeros(channels))
            self.register_buffer("an_initialized", torch.tensor(False))

    @property
    def num_dims(self) -> int:
        """D, the number of scalar dimensions of one observation."""
        return math.prod(self.obs_shape)

    # --- dequantisation --------------------------------------------------------------------------
    def dequantize(
        self, obs: torch.Tensor, noise: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """uint8 ``o`` -> ``x̃ = (o + v) / num_bins`` in [0, 1), with ``v ~ U[0,1)`` unless given.

        ``dtype`` defaults to the noise's, else torch's default floating type."""
        return self._noisy(obs, noise, dtype).div_(self.num_bins)

    def _noisy(self, obs: torch.Tensor, noise: torch.Tensor | None, dtype) -> torch.Tensor:
        """``o + v`` in a new floating tensor (the caller may overwrite it)."""
        if obs.dtype != torch.uint8:
            raise TypeError(f"observations must be uint8, got {obs.dtype}")
        if dtype is None:
            dtype = noise.dtype if noise is not None else torch.get_default_dtype()
        # Image batches [N, C, H, W] become channels-last, the conv trunks' layout: written
        # here at no extra cost, kept by every later pass over the pixels (logit, decoder
        # likelihood), so neither trunk has to copy its input or output.
        layout = torch.channels_last if obs.dim() == 4 else torch.contiguous_format
        out = torch.empty(obs.shape, dtype=dtype, device=obs.device, memory_format=layout)
        out = out.uniform_(0.0, self.max_noise(dtype)) if noise is None else out.copy_(noise)
        return out.add_(obs)

    def bits_per_dim(
        self, log_p_y: torch.Tensor, logdet: torch.Tensor, frames: int = 1
    ) -> torch.Tensor:
        """:func:`bits_per_dim` of ``frames`` observations pre-processed here: their ``D``, bins
        and the width of the noise :meth:`encode` drew in ``log_p_y``'s dtype."""
        return bits_per_dim(
            log_p_y, logdet, frames * self.num_dims, self.num_bins, self.max_noise(log_p_y.dtype)
        )

    def max_noise(self, dtype: torch.dtype) -> float:
        """The largest ``v`` with ``o + v < o + 1`` in ``dtype`` for every bin ``o``: half an
        ulp below 1 at the top bins, ``o + v`` would round up into the next bin (float32
        did for ~1 in 130 000 of the pixels of value 128 and up)."""
        return 1.0 - torch.finfo(dtype).eps * self.num_bins / 2

    def quantize(self, x_tilde: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`dequantize` up to the noise: ``floor(x̃·num_bins)`` as uint8."""
        return (x_tilde * self.num_bins).floor().clamp(0, self.num_bins - 1).to(torch.uint8)

    # --- the bijection x̃ <-> y -------------------------------------------------------------------
    def _channel_view(self, param: torch.Tensor) -> torch.Tensor:
        return param.view(-1, 1, 1) if len(self.obs_shape) == 3 else param

    def _event_sum(self, x: torch.Tensor) -> torch.Tensor:
        # A sum over the event axes, not a flatten: that would copy a channels-last batch.
        return x.sum(tuple(range(-len(self.obs_shape), 0)))

    @torch.no_grad()
    def _init_actnorm(self, y: torch.Tensor) -> None:
        """Data-dependent init (unit variance, zero mean per channel) on the first training
        batch, branch-free: later batches select the current values with ``torch.where``, so
        no call reads the flag back to the host (a CUDA-graph capture refuses that, and a
        captured update re-runs this line on every replay)."""
        dims = [i for i in range(y.dim()) if i != y.dim() - len(self.obs_shape)]
        count = y.numel() // y.shape[y.dim() - len(self.obs_shape)]
        if count < 2:
            # One value per channel (a batch of one vector) has no spread: its std, clamped,
            # would set scales of 1e6. The init waits for a batch with a spread (a Python
            # shape check, no host sync).
            return
        std = y.std(dims).clamp_min(1e-6)
        mean = y.mean(dims)
        done = self.an_initialized
        self.an_log_scale.copy_(torch.where(done, self.an_log_scale, -std.log()))
        self.an_bias.copy_(torch.where(done, self.an_bias, -mean / std))
        self.an_initialized.fill_(True)

    def forward(self, x_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x̃ -> (y, ℓ_P)`` with ``ℓ_P = log|det ∂y/∂x̃|`` per sample."""
        self._check_shape(x_tilde)
        return self._logit(self.alpha + (1 - 2 * self.alpha) * x_tilde)

    def _logit(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = α + (1 − 2α)·x̃ -> (y, ℓ_P)``. ``s`` is consumed: overwritten in place unless
        autograd tracks it (a training batch is data, so :meth:`encode` makes one buffer serve
        every pass over it)."""
        inplace = not s.requires_grad
        log_s = torch.log(s)  # each transcendental pass once
        log_1ms = s.neg_().log1p_() if inplace else torch.log1p(-s)
        logdet = self.num_dims * math.log(1 - 2 * self.alpha) - (
            self._event_sum(log_s) + self._event_sum(log_1ms)
        )
        y = log_s.sub_(log_1ms) if inplace else log_s - log_1ms
        if self.actnorm:
            # Agents act and report in training mode, under no_grad: only a pass with gradients
            # is a training batch (otherwise the first acted frame would set the init).
            if self.training and torch.is_grad_enabled():
                self._init_actnorm(y)
            y = y * self._channel_view(self.an_log_scale.exp()) + self._channel_view(self.an_bias)
            logdet = logdet + self._positions * self.an_log_scale.sum()
        return y, logdet

    def learned_logdet(self) -> torch.Tensor:
        """The part of ``ℓ_P`` that has parameters: ActNorm's ``n·Σ_c log|a_c|`` (a scalar, the
        same for every sample). The rest of ``ℓ_P`` depends on the data and the noise only, so a
        loss needs this part alone to train ``log p(y) + ℓ_P``. Only with ActNorm."""
        if not self.actnorm:
            raise RuntimeError("learned_logdet: this Preprocess has no ActNorm (no parameters)")
        return self._positions * self.an_log_scale.sum()

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``y -> x̃`` (clamped to [0, 1] so decoded means that leave the data range stay images)."""
        self._check_shape(y)
        if self.actnorm:
            y = (y - self._channel_view(self.an_bias)) * self._channel_view(
                (-self.an_log_scale).exp()
            )
        return ((torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)).clamp(0.0, 1.0)

    def encode(
        self, obs: torch.Tensor, noise: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ):
        """uint8 ``o`` -> ``(y, ℓ_P)``: ``forward(dequantize(o, noise))``, computed in one fresh
        buffer, ``s = α + (1 − 2α)(o + v) / num_bins`` updated in place (a third fewer passes
        over an image batch than the two calls)."""
        self._check_shape(obs)
        scale = (1 - 2 * self.alpha) / self.num_bins
        return self._logit(self._noisy(obs, noise, dtype).mul_(scale).add_(self.alpha))

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` -> uint8 image (or vector), the deterministic inverse used for display."""
        return self.quantize(self.inverse(y).clamp(0.0, 1.0 - 1e-6))

    def _check_shape(self, x: torch.Tensor) -> None:
        n = len(self.obs_shape)
        if tuple(x.shape[x.dim() - n :]) != self.obs_shape:
            raise ValueError(
                f"expected observations of shape [..., {', '.join(map(str, self.obs_shape))}], "
                f"got {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"obs_shape={self.obs_shape}, alpha={self.alpha}, actnorm={self.actnorm}"


def bits_per_dim(
    log_p_y: torch.Tensor,
    logdet: torch.Tensor,
    num_dims: int,
    num_bins: int = 256,
    noise_width: float = 1.0,
) -> torch.Tensor:
    """Bits per dimension of the discrete data from a log-density of ``y`` (nats) and ``ℓ_P``.

    ``bpd = (−(log p(y) + ℓ_P) + D·ln(num_bins) − D·ln w) / (D·ln 2)`` — an upper bound on the
    discrete data's bits/dim through dequantisation (SPEC §2), for noise ``v ~ U[0, w)^D``:
    ``−D·ln w`` is its log-density. :meth:`Preprocess.max_noise` gives the ``w`` of the noise
    :meth:`Preprocess.encode` draws (1 − 1.5e-5 in float32: without the term the bound read
    2.2e-5 bits/dim low). Shapes broadcast; returns per-sample bpd.
    """
    nll_x = -(log_p_y + logdet)
    log_q = -num_dims * math.log(noise_width)
    return (nll_x + num_dims * math.log(num_bins) + log_q) / (num_dims * math.log(2.0))


__all__ = ["Preprocess", "bits_per_dim"]
