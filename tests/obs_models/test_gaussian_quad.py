"""gaussian_quad's hand-written backward against autograd of the composite and finite
differences (float64), for every way the observation models call it."""

import pytest
import torch

from aefrl.obs_models.gaussian_quad import gaussian_quad

EVENT = (3, 4, 5)


def _reference(y, mu, sigma, mask):
    sq = ((y - mu) / sigma).square()
    if mask is not None:
        sq = sq * mask
    return sq.sum((-3, -2, -1))


CASES = {
    # sigma per coordinate shared by the batch ("learned"), channels-last images (training)
    "learned": ((6, *EVENT), (6, *EVENT), EVENT, False, True),
    # sigma predicted per sample ("head")
    "head": ((6, *EVENT), (6, *EVENT), (6, *EVENT), False, False),
    # one fixed sigma
    "fixed": ((6, *EVENT), (6, *EVENT), (), False, False),
    # the partition family's shell mask
    "masked": ((6, *EVENT), (6, *EVENT), EVENT, True, False),
    # k importance samples of mu against one y (the likelihood estimators)
    "repeated": ((6, *EVENT), (2, 6, *EVENT), EVENT, False, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradients_match_the_composite(case):
    y_shape, mu_shape, sigma_shape, masked, channels_last = CASES[case]
    g = torch.Generator().manual_seed(0)

    def rand(shape, low=-1.0, high=1.0):
        return torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low

    y, mu = rand(y_shape), rand(mu_shape)
    sigma = rand(sigma_shape, 0.3, 2.0)
    if channels_last:
        y, mu = (t.contiguous(memory_format=torch.channels_last) for t in (y, mu))
    mask = (rand(EVENT) > 0).double() if masked else None
    inputs = [t.requires_grad_(True) for t in (y, mu, sigma)]

    out = gaussian_quad(*inputs, 3, mask)
    ref = _reference(*inputs, mask)
    torch.testing.assert_close(out, ref)
    weights = rand(out.shape)  # a non-uniform upstream gradient
    got = torch.autograd.grad((out * weights).sum(), inputs)
    want = torch.autograd.grad((ref * weights).sum(), inputs)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *x: gaussian_quad(*x, 3, mask), inputs)
    if masked:
        assert torch.all(got[1][..., mask == 0] == 0)


def test_only_requested_gradients_are_computed():
    y = torch.randn(2, *EVENT)  # data: no gradient
    mu = torch.randn(2, *EVENT, requires_grad=True)
    sigma = torch.rand(EVENT) + 0.5
    (grad,) = torch.autograd.grad(gaussian_quad(y, mu, sigma, 3).sum(), [mu])
    torch.testing.assert_close(grad, -2 * (y - mu.detach()) / sigma**2)
