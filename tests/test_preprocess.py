"""Pre-processing: dequantisation, logit (+ ActNorm) bijection, log-determinant, bits/dim."""

import math

import pytest
import torch

from aefrl.preprocess import Preprocess, bits_per_dim


def _jacobian_logdet(pre: Preprocess, x: torch.Tensor) -> torch.Tensor:
    """log|det ∂y/∂x̃| of one sample by the full autograd Jacobian (independent of ℓ_P's formula)."""
    shape = x.shape

    def f(flat):
        return pre(flat.view(1, *shape))[0].flatten()

    jac = torch.autograd.functional.jacobian(f, x.flatten())
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("obs_shape", [(3, 2, 2), (5,)])
@pytest.mark.parametrize("actnorm", [False, True])
def test_logdet_matches_autograd_and_inverse_round_trips(obs_shape, actnorm):
    pre = Preprocess(obs_shape, alpha=0.05, actnorm=actnorm).double()
    x = torch.rand(6, *obs_shape, dtype=torch.float64)
    y, logdet = pre(x)  # first training call initialises ActNorm
    if actnorm:
        with torch.no_grad():  # move ActNorm away from its init so the check covers a, b
            pre.an_log_scale.add_(torch.randn_like(pre.an_log_scale) * 0.3)
            pre.an_bias.add_(torch.randn_like(pre.an_bias))
        y, logdet = pre(x)
    for i in range(x.shape[0]):
        assert torch.allclose(logdet[i], _jacobian_logdet(pre, x[i]), atol=1e-10)
    assert torch.allclose(pre.inverse(y), x, atol=1e-12)
    assert logdet.shape == (6,)


def test_actnorm_initialises_to_unit_variance_per_channel():
    pre = Preprocess((3, 4, 4), actnorm=True).double()
    x = torch.rand(32, 3, 4, 4, dtype=torch.float64) * torch.tensor([0.2, 0.5, 1.0]).view(3, 1, 1)
    y, _ = pre(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(y.std((0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-10)
    pre.eval()
    y2, _ = Preprocess((3, 4, 4), actnorm=True).double().eval()(x)  # eval: no init, identity
    assert not torch.allclose(y2, y)


def test_actnorm_initialises_once_and_again_after_loading_a_fresh_state():
    torch.manual_seed(0)
    pre = Preprocess((3, 4, 4), actnorm=True).double()
    fresh = {k: v.clone() for k, v in pre.state_dict().items()}
    pre(torch.rand(64, 3, 4, 4, dtype=torch.float64) * 0.5)
    scale = pre.an_log_scale.detach().clone()
    pre(torch.rand(64, 3, 4, 4, dtype=torch.float64))  # initialised: no second init
    torch.testing.assert_close(pre.an_log_scale.detach(), scale)
    pre.load_state_dict(fresh)  # an uninitialised state: the next batch initialises again
    y, _ = pre(torch.rand(64, 3, 4, 4, dtype=torch.float64))
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64))


def test_actnorm_waits_for_a_batch_with_a_spread():
    """A first training batch of one vector has one value per feature and no spread: it leaves
    ActNorm as it is (the clamped std set scales of 1e6 and y to 0); the next batch of two
    initialises it."""
    pre = Preprocess((5,), actnorm=True).double()
    x = torch.rand(1, 5, dtype=torch.float64) * 0.8 + 0.1
    y, logdet = pre(x)
    assert not pre.an_initialized and torch.equal(pre.an_log_scale, torch.zeros(5).double())
    y_plain, logdet_plain = Preprocess((5,)).double()(x)  # identity ActNorm: the logit alone
    torch.testing.assert_close(y, y_plain)
    torch.testing.assert_close(logdet, logdet_plain)
    y, _ = pre(torch.rand(2, 5, dtype=torch.float64))
    assert pre.an_initialized
    torch.testing.assert_close(y.std(0), torch.ones(5, dtype=torch.float64))


def test_dequantize_stays_in_bin_and_quantize_inverts():
    pre = Preprocess((3, 8, 8))
    o = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    x = pre.dequantize(o)
    assert torch.all(x >= o.float() / 256) and torch.all(x < (o.float() + 1) / 256)
    # The top bins in float32: o + v rounded up to o + 1 for v within half an ulp of 1, which
    # 2M draws hit ~15 times in expectation; the noise's bound keeps every bin, both ways.
    torch.manual_seed(0)
    top = torch.randint(128, 256, (2_000_000,), dtype=torch.uint8)
    assert torch.all(Preprocess((1,)).dequantize(top) < (top.float() + 1) / 256)
    for dtype in (torch.float32, torch.float64):
        v = torch.tensor(pre.max_noise(dtype), dtype=dtype)
        every = torch.arange(256, dtype=dtype)
        assert torch.all(every + v < every + 1) and torch.all(every + v > every + 0.99)
    assert torch.equal(pre.quantize(x), o)
    y, _ = pre(x)
    assert torch.equal(pre.decode(y), o)


def test_image_batches_stay_channels_last_through_encode_and_the_decoder():
    """The conv trunks run channels-last; pre-processed batches and decoder means are kept in
    that layout (no copy on either side), with the values of the plain NCHW computation."""
    from aefrl.obs_models import make_obs_model

    pre = Preprocess((3, 8, 8)).double()
    o = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    noise = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    y, logdet = pre.encode(o, noise)
    assert y.is_contiguous(memory_format=torch.channels_last)
    s = 0.05 + 0.9 * (o.double() + noise) / 256
    torch.testing.assert_close(y, torch.log(s / (1 - s)))
    torch.testing.assert_close(
        logdet, (64 * 3 * math.log(0.9) - torch.log(s * (1 - s)).flatten(1).sum(1))
    )
    for actnorm in (False, True):  # the fused encode is forward(dequantize(o)), ActNorm too
        pre = Preprocess((3, 8, 8), actnorm=actnorm).double().eval()
        want = pre(pre.dequantize(o, noise))
        for got, ref in zip(pre.encode(o, noise), want):
            torch.testing.assert_close(got, ref)
    model = make_obs_model("aef", (3, 8, 8), 4, 5, depth=4)
    mu_x, _ = model.decoder_params(torch.randn(4, 4), torch.randn(4, 5))
    assert mu_x.is_contiguous(memory_format=torch.channels_last)


def test_bits_per_dim_of_uniform_density_is_eight():
    # The uniform density on [0,1)^D has log p(x̃) = 0, i.e. log p(y) = −ℓ_P: exactly 8 bits/dim.
    pre = Preprocess((3, 4, 4)).double()
    _, logdet = pre(torch.rand(4, 3, 4, 4, dtype=torch.float64))
    bpd = bits_per_dim(-logdet, logdet, pre.num_dims)
    assert torch.allclose(bpd, torch.full_like(bpd, 8.0))
    # One nat better per dimension is 1/ln 2 bits better.
    better = bits_per_dim(-logdet + pre.num_dims, logdet, pre.num_dims)
    assert torch.allclose(better, bpd - 1 / math.log(2))
    # Noise on U[0, w) has log-density −D·ln w: the bound grows by −log2(w) bits/dim (w < 1).
    w = pre.max_noise(torch.float32)
    narrow = bits_per_dim(-logdet, logdet, pre.num_dims, noise_width=w)
    torch.testing.assert_close(narrow - bpd, torch.full_like(bpd, -math.log2(w)))
    assert 2e-5 < -math.log2(w) < 2.5e-5  # float32's: 128 ulps below 1
    # The method charges the width of the noise drawn in the log-density's dtype, D per frame.
    # (A density other than the uniform one: with log p(y) + ℓ_P = 0 the dimension count cancels.)
    for dtype in (torch.float32, torch.float64):
        lp, ld = (-logdet + 0.7 * pre.num_dims).to(dtype), logdet.to(dtype)
        expected = (-(lp + ld) + 3 * pre.num_dims * math.log(256)) / (3 * pre.num_dims)
        expected = (expected - math.log(pre.max_noise(dtype))) / math.log(2)
        torch.testing.assert_close(pre.bits_per_dim(lp, ld, frames=3), expected)


def test_dequantisation_noise_is_uniform_on_the_unit_bin_and_fresh_for_every_batch():
    """SPEC §2's bound needs v ~ U[0, 1)^D, drawn anew each batch: a constant v = 1/2 or noise
    on [0, 1/2) passed every test before this one (a review's mutations)."""
    torch.manual_seed(0)
    pre = Preprocess((1,))
    o = torch.randint(0, 256, (400_000, 1), dtype=torch.uint8)
    v = pre.dequantize(o).double() * 256 - o.double()  # [N, 1] in float64: exact here
    first = v.clone()
    assert v.min() >= 0 and v.max() < 1
    n = v.numel()
    assert abs(v.mean() - 0.5) < 5 * (1 / 12 / n) ** 0.5  # its standard error, 5 times
    assert abs(v.var() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5  # Var of v² - E[v]²: 1/180
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # the distribution function, not only two moments
        assert abs((v < q).double().mean() - q) < 5 * (q * (1 - q) / n) ** 0.5
    second = pre.dequantize(o).double() * 256 - o.double()
    assert (second != first).double().mean() > 0.999  # fresh noise for the next batch


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="alpha"):
        Preprocess((3, 8, 8), alpha=0.5)
    with pytest.raises(ValueError, match="obs_shape"):
        Preprocess((8, 8))
    pre = Preprocess((3, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        pre.dequantize(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, 8, 8\]"):
        pre(torch.rand(1, 3, 8, 7))
