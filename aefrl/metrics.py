"""Image-quality measures for reconstructions, samples and imagined frames.

All take float images in [0, 1] shaped ``[N, C, H, W]`` and return per-image values ``[N]``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def mean_gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Mean finite-difference gradient magnitude ``sqrt(dx² + dy²)`` per image, ``[N]``.

    Blurry images have small gradients; the ratio to real frames is our sharpness measure.
    """
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    mag = (dx[..., :-1, :].square() + dy[..., :, :-1].square()).sqrt()
    return mag.flatten(1).mean(-1)


def sharpness_ratio(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean gradient magnitude of ``generated`` over that of ``real`` (1 = as sharp as real)."""
    return float(mean_gradient_magnitude(generated).mean() / mean_gradient_magnitude(real).mean())


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, ``[N]``."""
    return (a - b).square().flatten(1).mean(-1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (peak 1), ``[N]``."""
    return -10.0 * torch.log10(mse(a, b).clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004; Gaussian window 11, σ 1.5, peak 1), ``[N]``.

    Computed on the valid region (no padding), averaged over channels and positions. Images
    smaller than the window (env.image_size=8) use the largest odd window that fits.
    """
    channels = a.shape[1]
    side = min(a.shape[-2:])
    if window > side:
        window = side if side % 2 else side - 1
    w = _gaussian_window(window, sigma, channels, a)
    c1, c2 = 0.01**2, 0.03**2

    def blur(x):
        return F.conv2d(x, w, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(-1)
