"""Image metrics against hand computations."""

import torch

from aefrl.metrics import mean_gradient_magnitude, psnr, sharpness_ratio, ssim


def test_gradient_magnitude_of_a_ramp_and_of_a_blur():
    ramp = torch.arange(8.0).repeat(8, 1)[None, None] / 8  # +1/8 per column, flat in rows
    assert torch.allclose(mean_gradient_magnitude(ramp), torch.tensor([1 / 8]))
    edges = (torch.rand(4, 3, 16, 16) > 0.5).float()
    blurred = torch.nn.functional.avg_pool2d(edges, 3, 1, 1)
    assert sharpness_ratio(blurred, edges) < 0.6
    assert abs(sharpness_ratio(edges, edges) - 1.0) < 1e-6


def test_ssim_identity_noise_and_range():
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    worse = (x + 0.5 * torch.randn_like(x)).clamp(0, 1)
    assert torch.all(ssim(x, worse) < ssim(x, noisy)) and torch.all(ssim(x, noisy) < 0.99)
    # Constant images: SSIM reduces to the luminance term (2·μa·μb + c1) / (μa² + μb² + c1).
    a = torch.full((1, 1, 16, 16), 0.2, dtype=torch.float64)
    b = torch.full((1, 1, 16, 16), 0.6, dtype=torch.float64)
    c1 = 0.01**2
    expect = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert torch.allclose(ssim(a, b), torch.tensor([expect], dtype=torch.float64), atol=1e-9)


def test_psnr_of_known_error():
    a = torch.zeros(1, 1, 4, 4)
    assert torch.allclose(psnr(a, a + 0.1), torch.tensor([20.0]), atol=1e-4)
