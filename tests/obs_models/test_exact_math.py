"""The AEF densities against independent change-of-variables computations (float64 autograd)."""

import math

import pytest
import torch
from torch import distributions as D

from aefrl.obs_models import make_obs_model


def _random_prior(batch: int, d: int) -> D.Distribution:
    mu = torch.randn(batch, d, dtype=torch.float64)
    sigma = torch.rand(batch, d, dtype=torch.float64) + 0.3
    return D.Independent(D.Normal(mu, sigma), 1)


def _perturb(model, scale=0.3):
    """Move weights off their init so the networks are not near-linear at zero."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def _std_normal_sum(x):
    return (-0.5 * x.square() - 0.5 * math.log(2 * math.pi)).sum(-1)


CASES = [
    dict(obs_shape=(5,), latent_dim=2, context_dim=3, hidden=8, layers=2),
    dict(obs_shape=(2, 4, 4), latent_dim=3, context_dim=2, depth=2, hidden=8),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sigma_x", ["learned", "head", "fixed"])
def test_partition_log_likelihood_equals_change_of_variables(case, sigma_x):
    case = dict(case)
    shape, d, c = case.pop("obs_shape"), case.pop("latent_dim"), case.pop("context_dim")
    # σ_x ≠ 1 so that a fixed σ_x contributes to the log-determinant.
    model = make_obs_model(
        "aef_partition", shape, d, c, sigma_x=sigma_x, sigma_x_init=0.7, **case
    ).double()
    _perturb(model)
    batch = 3
    y = torch.randn(batch, *shape, dtype=torch.float64)
    ctx = torch.randn(batch, c, dtype=torch.float64)
    prior = _random_prior(batch, d)
    got = model.log_likelihood(y, ctx, prior)

    num = math.prod(shape)
    core = model.core_idx
    shell = torch.tensor([i for i in range(num) if i not in set(core.tolist())])
    for b in range(batch):
        # The whole map y -> (z, ε_shell) written from the spec, using only the networks.
        def forward_map(flat, b=b):
            yy = flat.view(1, *shape)
            hidden = yy.flatten(1).clone()
            hidden[:, core] = 0.0
            e = model.encoder(hidden.view_as(yy))
            mu_q, sigma_q = model.posterior(e, ctx[b : b + 1])
            z = mu_q + sigma_q * yy.flatten(1)[:, core]
            mu_x, sigma_x = model.decoder_params(z, ctx[b : b + 1])
            eps = ((yy - mu_x) / sigma_x).flatten(1)[:, shell]
            return torch.cat([z, eps], -1).squeeze(0)

        flat = y[b].flatten()
        out = forward_map(flat)
        jac = torch.autograd.functional.jacobian(forward_map, flat)
        assert jac.shape == (num, num)
        logdet = torch.linalg.slogdet(jac)[1]
        z, eps = out[:d], out[d:]
        expect = (
            D.Normal(prior.base_dist.loc[b], prior.base_dist.scale[b]).log_prob(z).sum()
            + _std_normal_sum(eps)
            + logdet
        )
        assert torch.allclose(got[b], expect, atol=1e-9), (got[b], expect)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    ("projection", "sigma_x"), [("learned", "head"), ("random", "head"), ("learned", "learned"),
                                ("random", "fixed")]
)  # fmt: skip
def test_aef_objective_is_joint_density_of_expanded_map(case, projection, sigma_x):
    case = dict(case)
    shape, d, c = case.pop("obs_shape"), case.pop("latent_dim"), case.pop("context_dim")
    model = make_obs_model(
        "aef", shape, d, c, sigma_x=sigma_x, sigma_x_init=0.7, projection=projection, **case
    ).double()
    _perturb(model)
    batch = 3
    y = torch.randn(batch, *shape, dtype=torch.float64)
    ctx = torch.randn(batch, c, dtype=torch.float64)
    prior = _random_prior(batch, d)
    num = math.prod(shape)

    u_det = model.coords(y)
    u_rand = torch.randn(batch, d, dtype=torch.float64)
    for u_all, got in [
        (u_det, model.objective(y, ctx, prior)),
        (u_rand, model.joint_log_density(y, u_rand, ctx, prior)),
    ]:
        for b in range(batch):
            # (y, u) -> (z, ε): the map of the expansion family, written from the spec.
            def joint_map(flat, b=b):
                yy, u = flat[:num].view(1, *shape), flat[num:].view(1, d)
                mu_q, sigma_q = model.posterior(model.encoder(yy), ctx[b : b + 1])
                z = mu_q + sigma_q * u
                mu_x, sigma_x = model.decoder_params(z, ctx[b : b + 1])
                eps = ((yy - mu_x) / sigma_x).flatten(1)
                return torch.cat([z, eps], -1).squeeze(0)

            flat = torch.cat([y[b].flatten(), u_all[b]])
            out = joint_map(flat)
            jac = torch.autograd.functional.jacobian(joint_map, flat)
            assert jac.shape == (num + d, num + d)
            logdet = torch.linalg.slogdet(jac)[1]
            expect = (
                D.Normal(prior.base_dist.loc[b], prior.base_dist.scale[b]).log_prob(out[:d]).sum()
                + _std_normal_sum(out[d:])
                + logdet
            )
            assert torch.allclose(got[b], expect, atol=1e-9), (got[b], expect)


def test_aef_encode_is_deterministic_and_uses_no_randomness():
    model = make_obs_model("aef", (3, 8, 8), 4, 2, depth=4).double()
    y = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    ctx = torch.randn(5, 2, dtype=torch.float64)
    state = torch.get_rng_state()
    z1 = model.encode(y, ctx)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(z1, model.encode(y, ctx))
    mu_q, sigma_q = model.posterior(model.encoder(y), ctx)
    assert torch.allclose(z1, mu_q + sigma_q * model.coords(y))


def test_partition_density_integrates_to_one():
    torch.manual_seed(3)
    model = make_obs_model(
        "aef_partition",
        (2,),
        1,
        hidden=16,
        layers=1,
        sigma_q_min=0.5,
        sigma_x="head",
        sigma_x_min=0.2,
    ).double()
    _perturb(model, 0.5)
    lim, n = 30.0, 2001
    grid = torch.linspace(-lim, lim, n, dtype=torch.float64)
    yy = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        dens = model.log_likelihood(yy).exp().view(n, n)
    step = (grid[1] - grid[0]).item()
    total = torch.trapezoid(torch.trapezoid(dens, dx=step), dx=step).item()
    assert abs(total - 1.0) < 1e-3, total
    # The edge of the grid carries no mass, so nothing was cut off.
    assert dens[0].max() < 1e-6 and dens[-1].max() < 1e-6
    assert dens[:, 0].max() < 1e-6 and dens[:, -1].max() < 1e-6


def test_sigma_q_is_hard_bounded():
    """σ_q stays in [min, max] even where the head's raw output saturates the sigmoid (in
    float32: exactly 0 and 1). Scaling the embedding would not get there: the head's LayerNorm
    removes the scale, so the raw output is driven through the last layer's bias instead."""
    model = make_obs_model("aef", (6,), 2, sigma_q_min=0.2, sigma_q_max=0.7)
    last = model.posterior_head[-1]
    e = torch.randn(100, model.embed_dim)
    for raw in (-200.0, 200.0, 30.0, -30.0):
        with torch.no_grad():
            last.bias[2:] = raw  # [μ (2), raw σ (2)]
        _, sigma_q = model.posterior(e)
        assert sigma_q.min() >= 0.2 and sigma_q.max() <= 0.7
        if abs(raw) == 200.0:  # saturated: the bound itself, not beyond it
            torch.testing.assert_close(sigma_q, torch.full_like(sigma_q, 0.7 if raw > 0 else 0.2))


@pytest.mark.parametrize("sigma_x", ["learned", "head"])
def test_vae_objective_and_importance_weight_written_from_the_spec(sigma_x):
    """ELBO = log N(y; μ_x(z), σ_x²) − KL(N(μ_q, σ_q²) ‖ prior) at z = μ_q + σ_q ξ, the KL in
    closed form; one importance weight is log p(y | z) + log p(z) − log q(z | y)."""
    shape, d, c = (5,), 2, 3
    model = make_obs_model("vae", shape, d, c, sigma_x=sigma_x, hidden=8).double()
    _perturb(model)
    y = torch.randn(4, *shape, dtype=torch.float64)
    ctx = torch.randn(4, c, dtype=torch.float64)
    prior = _random_prior(4, d)
    mu_p, sigma_p = prior.base_dist.loc, prior.base_dist.scale
    mu_q, sigma_q = model.posterior(model.encoder(y), ctx)

    def log_lik(z):
        mu_x, s_x = model.decoder_params(z, ctx)
        return D.Normal(mu_x, s_x).log_prob(y).sum(-1)

    torch.manual_seed(5)
    got = model.objective(y, ctx, prior)
    torch.manual_seed(5)  # the same ξ
    z = mu_q + sigma_q * torch.randn(4, d, dtype=torch.float64)
    kl = (
        torch.log(sigma_p / sigma_q) + (sigma_q**2 + (mu_q - mu_p) ** 2) / (2 * sigma_p**2) - 0.5
    ).sum(-1)
    assert kl.min() > 0.1
    torch.testing.assert_close(got, log_lik(z) - kl)

    torch.manual_seed(6)
    got = model.log_likelihood(y, ctx, prior, num_samples=1)
    torch.manual_seed(6)
    z = mu_q + sigma_q * torch.randn(1, 4, d, dtype=torch.float64)[0]
    log_q = D.Normal(mu_q, sigma_q).log_prob(z).sum(-1)
    log_p = D.Normal(mu_p, sigma_p).log_prob(z).sum(-1)
    torch.testing.assert_close(got, log_lik(z) + log_p - log_q)
