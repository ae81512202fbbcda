"""Acting dequantises at the bin centre: ``encode_pixels(o, "mid")`` is the pre-processing of
``x̃ = (o + 1/2) / 256`` (SPEC §2, §4), written out here by hand in float64."""

import math

import pytest
import torch

from tests.world_model.conftest import OBS, tiny_world_model


def _by_hand(pixels: torch.Tensor, pre) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = a_c·logit(α + (1 − 2α)·x̃) + b_c`` with ``x̃ = (o + 0.5)/256`` and its
    ``ℓ_P = Σ_i [log(1 − 2α) − log s_i − log(1 − s_i)] + H·W·Σ_c log a_c``, in float64 from the
    Preprocess's parameters alone."""
    x_tilde = (pixels.to(torch.float64) + 0.5) / 256.0
    alpha = pre.alpha
    s = alpha + (1.0 - 2.0 * alpha) * x_tilde
    y = torch.log(s) - torch.log(1.0 - s)
    logdet = (math.log(1.0 - 2.0 * alpha) - torch.log(s) - torch.log(1.0 - s)).flatten(1).sum(-1)
    if pre.actnorm:
        log_a = pre.an_log_scale.detach().to(torch.float64)
        b = pre.an_bias.detach().to(torch.float64)
        y = y * log_a.exp().view(-1, 1, 1) + b.view(-1, 1, 1)
        logdet = logdet + OBS[1] * OBS[2] * log_a.sum()
    return y, logdet


def _pixels(n: int = 3) -> torch.Tensor:
    pixels = torch.randint(0, 256, (n, *OBS), dtype=torch.uint8)
    pixels[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)  # both ends of the range
    return pixels


@pytest.mark.parametrize("actnorm", [False, True])
def test_mid_dequantisation_is_the_preprocessing_of_the_bin_centre(kind, actnorm):
    """Fails if acting dequantises anywhere but at v = 1/2 (e.g. the bin's lower edge, v = 0),
    or if the ActNorm that follows the logit is skipped or applied differently when acting."""
    wm = tiny_world_model(kind, dtype=torch.float64, actnorm=actnorm, alpha=0.07)
    pre = wm.preprocess
    if actnorm:
        # A non-trivial affine map, marked initialised, so it is neither the identity nor reset.
        with torch.no_grad():
            pre.an_log_scale.copy_(torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64))
            pre.an_bias.copy_(torch.tensor([-0.2, 0.4, 1.1], dtype=torch.float64))
            pre.an_initialized.fill_(True)
    pixels = _pixels()
    with torch.no_grad():  # as an acting agent calls it
        y, logdet = wm.encode_pixels(pixels, dequantize="mid")
    want_y, want_logdet = _by_hand(pixels, pre)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, want_logdet, rtol=1e-12, atol=1e-10)
    # Deterministic: no noise is drawn.
    y2, _ = wm.encode_pixels(pixels, dequantize="mid")
    assert torch.equal(y, y2)


def test_mid_dequantisation_in_float32_matches_the_float64_bin_centre():
    """The float32 model's acting path: same bin-centre x̃ (to float32 rounding). A shift of
    v by 1/2 moves y by at least ~2/(256·4) per coordinate, far above the tolerance."""
    wm = tiny_world_model("aef", dtype=torch.float32)
    pixels = _pixels()
    y, logdet = wm.encode_pixels(pixels, dequantize="mid")
    want_y, want_logdet = _by_hand(pixels, wm.preprocess)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet.double(), want_logdet, rtol=1e-5, atol=1e-3)
