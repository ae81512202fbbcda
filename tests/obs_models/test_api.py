"""The public observation-model API: shapes, gradients, save/load, clear errors."""

import io

import pytest
import torch
from torch import distributions as D

from aefrl.obs_models import OBS_MODELS, accepted_options, make_obs_model

KINDS = sorted(OBS_MODELS)
SHAPES = [(3, 16, 16), (7,)]


def _build(kind, shape, **opts):
    opts.setdefault("depth", 4) if len(shape) == 3 else opts.setdefault("hidden", 16)
    return make_obs_model(kind, shape, 4, 5, **opts)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_of_every_entry_point(kind, shape):
    model = _build(kind, shape)
    y, ctx = torch.randn(6, *shape), torch.randn(6, 5)
    prior = D.Independent(D.Normal(torch.randn(6, 4), torch.rand(6, 4) + 0.1), 1)
    assert model.objective(y, ctx, prior).shape == (6,)
    assert model.log_likelihood(y, ctx, prior, num_samples=3).shape == (6,)
    assert model.encode(y, ctx).shape == (6, 4)
    assert model.decode(torch.randn(6, 4), ctx).shape == (6, *shape)
    assert model.sample(context=ctx, prior=prior).shape == (6, *shape)
    assert model.sample(context=ctx, pixel_noise=False).shape == (6, *shape)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sigma_x", ["learned", "head", "fixed"])
def test_gradients_reach_every_parameter(kind, sigma_x):
    model = _build(kind, (3, 16, 16), sigma_x=sigma_x)
    y, ctx = torch.randn(4, 3, 16, 16), torch.randn(4, 5)
    prior = D.Independent(
        D.Normal(torch.zeros(4, 4, requires_grad=True), torch.ones(4, 4, requires_grad=True)), 1
    )
    model.objective(y, ctx, prior).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert prior.base_dist.loc.grad.abs().sum() > 0  # the prior (RSSM transition) is trained too


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("context_dim", [5, 0])
def test_posterior_by_split_weights_is_the_head_on_the_concatenation(kind, context_dim):
    """``posterior`` multiplies the context and the embedding by the two column blocks of the
    head's first weight (so a sequence's embeddings are projected once); it must equal the head
    run as a plain ``nn.Sequential`` on ``[context, e]``, in value and in gradient."""
    torch.manual_seed(0)
    model = make_obs_model(kind, (7,), 4, context_dim, hidden=16).double()
    e = torch.randn(6, model.embed_dim, dtype=torch.float64)
    ctx = torch.randn(6, context_dim, dtype=torch.float64) if context_dim else None
    first = model.posterior_head[0].weight

    mu, sigma = model.posterior(e, ctx)
    (mu.square().sum() + sigma.sum()).backward()
    grad = first.grad.clone()
    first.grad = None

    out = model.posterior_head(e if ctx is None else torch.cat([ctx, e], -1))
    ref_mu, raw = out.chunk(2, -1)
    ref_sigma = model.sigma_q_min + (model.sigma_q_max - model.sigma_q_min) * raw.sigmoid()
    (ref_mu.square().sum() + ref_sigma.sum()).backward()
    torch.testing.assert_close(mu, ref_mu)
    torch.testing.assert_close(sigma, ref_sigma)
    torch.testing.assert_close(grad, first.grad)
    weights = model.posterior_weights()
    projected = model.project_embed(e, weights)
    torch.testing.assert_close(model.posterior_projected(projected, ctx, weights)[0], ref_mu)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pixel_noise", [False, True])
def test_sample_decodes_a_prior_draw_and_partition_inverts_the_encoder_layer(kind, pixel_noise):
    """``y = μ_x(z) + σ_x(z)·ε`` (ε = 0 without pixel noise) for ``z`` from the given prior; the
    partition family decodes only the shell and solves the core so that encoding gives back z."""
    model = _build(kind, (7,), sigma_x="head").double()
    ctx = torch.randn(5, 5, dtype=torch.float64)
    prior = D.Independent(
        D.Normal(torch.randn(5, 4, dtype=torch.float64), torch.rand(5, 4).double() + 0.5), 1
    )
    torch.manual_seed(2)
    y = model.sample(context=ctx, prior=prior, pixel_noise=pixel_noise)
    torch.manual_seed(2)  # the same draws, made here
    z = prior.sample()
    eps = torch.randn(5, 7, dtype=torch.float64) if pixel_noise else torch.zeros(5, 7)
    mu_x, sigma_x = model.decoder_params(z, ctx)
    assert sigma_x.std() > 0  # a per-sample, per-coordinate σ_x: its use is visible
    expect = mu_x + sigma_x * eps
    if kind == "aef_partition":
        shell = model.shell_mask.bool()
        torch.testing.assert_close(y[:, shell], expect[:, shell])
        # Re-encoding a sample gives back the z it was decoded from: the core was solved for it.
        torch.testing.assert_close(model.encode(y, ctx), z, atol=1e-10, rtol=0)
        assert not torch.allclose(y[:, ~shell], expect[:, ~shell])
    else:
        torch.testing.assert_close(y, expect)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_is_the_decoder_mean_and_partition_solves_the_core(kind, shape):
    """``decode`` is ``μ_x``; the partition family's decoder outputs at the core are never trained
    (its likelihood scores the shell), so its ``decode`` solves the core from the encoder layer
    instead: re-encoding the decoded frame gives back z (SPEC §3, generation)."""
    model = _build(kind, shape, sigma_x="head").double()
    z, ctx = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    y = model.decode(z, ctx)
    mu_x = model.decoder_params(z, ctx)[0]
    if kind == "aef_partition":
        shell = model.shell_mask.bool()
        torch.testing.assert_close(y[:, shell], mu_x[:, shell])
        torch.testing.assert_close(model.encode(y, ctx), z, atol=1e-10, rtol=0)
        assert not torch.allclose(y[:, ~shell], mu_x[:, ~shell])
    else:
        torch.testing.assert_close(y, mu_x)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    model = _build(kind, (3, 16, 16), sigma_x="learned")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)  # a different init, overwritten by the load
    other = _build(kind, (3, 16, 16), sigma_x="learned")
    other.load_state_dict(torch.load(buf, weights_only=True))
    y, ctx = torch.randn(3, 3, 16, 16), torch.randn(3, 5)
    noise = torch.randn(3, 4)
    assert torch.equal(model.encode(y, ctx, noise), other.encode(y, ctx, noise))
    torch.manual_seed(7)
    a = model.log_likelihood(y, ctx, num_samples=4)
    torch.manual_seed(7)
    b = other.log_likelihood(y, ctx, num_samples=4)
    assert torch.equal(a, b)


def _last_layer(module: torch.nn.Module) -> torch.nn.Module:
    return [
        m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.ConvTranspose2d))
    ][-1]


@pytest.mark.parametrize("sigma_x", ["learned", "head"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sigma_x_starts_at_its_init_and_never_drops_below_its_floor(sigma_x, shape):
    """σ_x = sigma_x_min + softplus(raw), with raw offset so that a zero raw output gives
    sigma_x_init; a raw value driven far negative leaves σ_x on the floor, not at 0."""
    model = _build("aef", shape, sigma_x=sigma_x, sigma_x_min=0.05, sigma_x_init=0.7)
    z, ctx = torch.randn(6, 4), torch.randn(6, 5)
    last = _last_layer(model.decoder)
    with torch.no_grad():  # a zero raw output of the head
        last.weight.zero_()
        last.bias.zero_()
    _, sigma = model.decoder_params(z, ctx)
    torch.testing.assert_close(sigma, torch.full_like(sigma, 0.7))
    with torch.no_grad():
        if sigma_x == "head":
            last.bias.fill_(-60.0)
        else:
            model.sigma_x_raw.fill_(-60.0)
    _, sigma = model.decoder_params(z, ctx)
    torch.testing.assert_close(sigma, torch.full_like(sigma, 0.05))


def test_random_projection_is_frozen_with_variance_one_over_d():
    """``projection="random"``: W ~ N(0, 1/D), b = 0, not trained, so u = W·y keeps y's scale."""
    model = _build("aef", (3, 16, 16), projection="random")
    w = model.projection_weight
    num = 3 * 16 * 16
    assert w.shape == (4, num) and not w.requires_grad
    assert abs(float(w.var()) * num - 1.0) < 0.1  # 3072 draws: the std of the ratio is ~0.03
    assert float(model.projection_bias.abs().max()) == 0.0
    assert all(p.data_ptr() != w.data_ptr() for p in model.parameters())


def test_vae_encoder_is_stochastic_unless_noise_is_given():
    model = _build("vae", (7,))
    y, ctx = torch.randn(3, 7), torch.randn(3, 5)
    assert not torch.equal(model.encode(y, ctx), model.encode(y, ctx))
    xi = torch.randn(3, 4)
    assert torch.equal(model.encode(y, ctx, xi), model.encode(y, ctx, xi))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="accepted: aef, aef_partition, vae"):
        make_obs_model("flow", (3, 64, 64), 8)
    with pytest.raises(ValueError, match="shorter side must be 4 times a power of two"):
        make_obs_model("aef", (3, 60, 60), 8)
    with pytest.raises(ValueError, match=r"obs_shape must be \(C, H, W\) or \(D,\)"):
        make_obs_model("aef", (64, 64), 8)
    with pytest.raises(ValueError, match="unknown option"):
        make_obs_model("vae", (7,), 2, projection="learned")  # an aef-only option
    with pytest.raises(ValueError, match="sigma_q_min < sigma_q_max"):
        make_obs_model("aef", (7,), 2, sigma_q_min=1.0, sigma_q_max=0.5)
    for mode in ("learned", "head"):  # a zero floor lets softplus underflow: log σ_x = −inf
        with pytest.raises(ValueError, match="sigma_x_min = 0 only with sigma_x=fixed"):
            make_obs_model("aef", (4,), 2, sigma_x=mode, sigma_x_min=0.0)
    assert make_obs_model("aef", (4,), 2, sigma_x="fixed", sigma_x_min=0.0).sigma_x_min == 0
    with pytest.raises(ValueError, match="sigma_x must be one of"):
        make_obs_model("aef", (7,), 2, sigma_x="adaptive")
    with pytest.raises(ValueError, match="latent_dim < the observation size"):
        make_obs_model("aef_partition", (4,), 4)
    with pytest.raises(ValueError, match="latent_dim must be an integer >= 1, got 0"):
        make_obs_model("aef", (7,), 0)
    with pytest.raises(ValueError, match=r"latent_dim must be an integer >= 1, got 4\.5"):
        make_obs_model("aef", (7,), 4.5)  # was built with int(4.5) = 4 latents
    model = make_obs_model("aef", (3, 16, 16), 4, 5, depth=4)
    with pytest.raises(ValueError, match=r"y must have shape \[B, 3, 16, 16\]"):
        model.objective(torch.randn(2, 3, 8, 8), torch.randn(2, 5))
    with pytest.raises(ValueError, match="floating-point"):
        model.objective(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"context must have shape \[\.\.\., 5\]"):
        model.objective(torch.randn(2, 3, 16, 16))
    bad_prior = D.Independent(D.Normal(torch.zeros(2, 3), torch.ones(2, 3)), 1)
    with pytest.raises(ValueError, match="event shape"):
        model.objective(torch.randn(2, 3, 16, 16), torch.randn(2, 5), bad_prior)
    with pytest.raises(ValueError, match="num_samples"):
        model.log_likelihood(torch.randn(2, 3, 16, 16), torch.randn(2, 5), num_samples=0)


def test_accepted_options_are_documented_names():
    assert "projection" in accepted_options("aef") and "projection" not in accepted_options("vae")
    assert "core_indices" in accepted_options("aef_partition")
    assert {"sigma_q_min", "sigma_q_max", "sigma_x", "depth"} <= set(accepted_options("vae"))
