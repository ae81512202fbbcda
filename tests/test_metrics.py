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


def test_ssim_against_a_window_by_window_computation():
    """Wang et al.'s formula evaluated at every valid 11x11 window position with explicit
    Gaussian-weighted statistics (σ = 1.5), averaged over positions and channels."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 2, 14, 13, generator=g, dtype=torch.float64)
    b = (0.6 * a + 0.4 * torch.rand(2, 2, 14, 13, generator=g, dtype=torch.float64)) ** 2
    i = torch.arange(11, dtype=torch.float64) - 5
    w = torch.exp(-(i**2) / (2 * 1.5**2))
    w = torch.outer(w, w) / w.sum() ** 2
    c1, c2 = 0.01**2, 0.03**2
    values = torch.zeros(2, 2, 4, 3, dtype=torch.float64)
    for r in range(4):
        for c in range(3):
            pa, pb = a[..., r : r + 11, c : c + 11], b[..., r : r + 11, c : c + 11]
            ma, mb = (w * pa).sum((-2, -1)), (w * pb).sum((-2, -1))
            va = (w * (pa - ma[..., None, None]) ** 2).sum((-2, -1))
            vb = (w * (pb - mb[..., None, None]) ** 2).sum((-2, -1))
            cov = (w * (pa - ma[..., None, None]) * (pb - mb[..., None, None])).sum((-2, -1))
            values[..., r, c] = ((2 * ma * mb + c1) * (2 * cov + c2)) / (
                (ma**2 + mb**2 + c1) * (va + vb + c2)
            )
    expect = values.flatten(1).mean(-1)
    assert expect.min() > 0.2 and expect.max() < 0.95  # neither identical nor unrelated
    torch.testing.assert_close(ssim(a, b), expect)


def test_gradient_magnitude_of_a_two_way_ramp():
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    image = (0.03 * cols + 0.04 * rows)[None, None].expand(2, 3, 6, 7)
    torch.testing.assert_close(mean_gradient_magnitude(image), torch.full((2,), 0.05))


def test_psnr_of_known_error():
    a = torch.zeros(1, 1, 4, 4)
    assert torch.allclose(psnr(a, a + 0.1), torch.tensor([20.0]), atol=1e-4)


def test_ssim_on_images_smaller_than_its_window():
    """env.image_size=8 is accepted: SSIM there uses a 7 x 7 window (it raised at 11 x 11)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ssim(x, noisy), ssim(x, noisy, window=7))
    assert torch.all(ssim(x, noisy) < 0.99)
