"""Estimators and the AEF scale gauge against independent float64 computations.

- The importance-sampled ``log p(y | context)``, K > 1, against quadrature over z (SPEC §6).
- The bits/dim of dequantised data against the exact probability of the discrete bin (SPEC §2).
- The scale gauge W → W/k, σ_q → k·σ_q: J rises by d·log k, ``log p(y)`` does not move (SPEC §5).
- The VAE's single-sample KL, used when the prior has no closed-form KL, against quadrature and
  the analytic Gaussian KL.
"""

import math

import pytest
import torch
from torch import distributions as D

from aefrl.obs_models import make_obs_model, posterior_kl
from aefrl.preprocess import Preprocess, bits_per_dim
from tests.obs_models.test_exact_math import _perturb
from tests.obs_models.test_importance_sampling import _two_dim_model

F64 = torch.float64


# --- 1. importance sampling with a context --------------------------------------------------------


def _context_prior(context):
    """A prior that moves with the context: N(0.8·c_0, (0.5 + 0.3·sigmoid(c_1))²), d = 1."""
    loc = 0.8 * context[:, :1]
    scale = 0.5 + 0.3 * torch.sigmoid(context[:, 1:2])
    return D.Independent(D.Normal(loc, scale), 1)


def _context_model(kind):
    """Vector model (D = 2, d = 1, context 2) whose decoder and σ_x depend strongly on the context.

    σ_q ≥ 1.2 (and s = 1 for the AEF) keeps the proposal wider than the prior (σ_p ≤ 0.8), so the
    importance weights are bounded and K = 16384 settles the estimate to ~0.03 nats.
    """
    return _two_dim_model(kind, context_dim=2, seed=3)


def _log_marginal_by_quadrature(model, y, context, prior):
    """log ∫ p(z | c_b) N(y_b; μ_x(c_b, z), σ_x(c_b, z)²) dz per b, on a fine grid (d = 1)."""
    z = torch.linspace(-8.0, 8.0, 4001, dtype=F64)
    n, b = z.shape[0], y.shape[0]
    zz = z[:, None, None].expand(n, b, 1)
    ctx = context[None].expand(n, b, context.shape[-1])
    mu_x, sigma_x = model.decoder_params(zz.reshape(n * b, 1), ctx.reshape(n * b, -1))
    log_lik = D.Normal(mu_x.view(n, b, -1), sigma_x.view(n, b, -1)).log_prob(y).sum(-1)
    log_joint = prior.log_prob(zz) + log_lik  # [n, b]
    # Riemann sum on a grid whose ends carry no mass (the trapezoid rule to within 1e-30).
    return torch.logsumexp(log_joint, 0) + math.log(z[1] - z[0])


@pytest.mark.parametrize("kind", ["vae", "aef"])
def test_importance_sampling_with_context_and_many_samples_matches_quadrature(kind):
    model = _context_model(kind)
    context = torch.tensor(
        [[-2.0, -1.0], [-1.0, 2.0], [0.0, 0.0], [0.5, -2.0], [1.5, 1.0], [2.0, -0.5]], dtype=F64
    )
    prior = _context_prior(context)
    with torch.no_grad():
        y = model.sample(context=context, prior=prior)
        truth = _log_marginal_by_quadrature(model, y, context, prior)
        # chunk_size 4000 with B = 6: chunks of 666 samples and a partial last one, so every
        # chunk must pair sample k of row b with context b, not with the row a flat index hits.
        est = model.log_likelihood(y, context, prior, num_samples=16384, chunk_size=4000)
        # Contexts must matter, or a misaligned context would go unnoticed: scoring every row
        # with the next row's context changes the truth by far more than the tolerance.
        rolled = _log_marginal_by_quadrature(
            model, y, context.roll(1, 0), _context_prior(context.roll(1, 0))
        )
    assert (rolled - truth).abs().mean() > 0.5, rolled - truth
    assert (est - truth).abs().max() < 0.05, est - truth


# --- 2. bits per dimension ------------------------------------------------------------------------


def _log_bin_probability(obs, loc, scale, alpha, bins=256):
    """log P(o) = Σ_i log ∫_bin p(x̃_i) dx̃_i for independent y_i ~ N(loc_i, scale_i²), written
    by hand: the bin [o/256, (o+1)/256) maps to [logit(s_lo), logit(s_hi)) in y-space, and the
    density of x̃ integrates there to a difference of the Gaussian CDF."""

    def y_of(x):
        s = alpha + (1 - 2 * alpha) * x
        return torch.log(s) - torch.log1p(-s)

    lo, hi = y_of(obs / bins), y_of((obs + 1) / bins)
    cdf = D.Normal(loc, scale).cdf
    return torch.log(cdf(hi) - cdf(lo)).sum(-1)


@pytest.mark.parametrize(
    "loc, scale, tight",
    [
        ([0.0, 0.3, -0.2], [1.5, 2.0, 1.0], True),  # smooth over a bin: the bound is tight
        ([0.0, 0.05, -0.1], [0.02, 0.05, 0.01], False),  # narrower than a bin: a loose bound
    ],
)
def test_expected_bits_per_dim_bounds_the_exact_bin_probability(loc, scale, tight):
    """E_v[bpd(o + v)] ≥ −log2 P(o) / D (Jensen), P(o) the model's mass on the bin of o.

    When the density of x̃ is nearly constant over the bin the two agree to ~1e-7 bits, so any
    wrong constant (log 255 for log 256 shifts by 0.0056 bits, a dropped log(1 − 2α) by 0.15) or
    a missing /D breaks the inequality or the tightness."""
    alpha, num_dims = 0.05, 3
    pre = Preprocess((num_dims,), alpha=alpha).double()
    obs = torch.tensor([128, 140, 115], dtype=torch.uint8)
    loc, scale = torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64)
    # E_v by the midpoint rule on [0, 1) (v shared by the coordinates: bpd is a sum over them).
    n = 20000
    v = ((torch.arange(n, dtype=F64) + 0.5) / n)[:, None].expand(n, num_dims)
    y, logdet = pre.encode(obs.expand(n, num_dims), v)
    bpd = bits_per_dim(D.Normal(loc, scale).log_prob(y).sum(-1), logdet, num_dims)
    expected = bpd.mean().item()
    bound = -_log_bin_probability(obs.to(F64), loc, scale, alpha).item() / (num_dims * math.log(2))
    assert expected >= bound - 1e-9, (expected, bound)
    if tight:
        assert expected - bound < 1e-5, (expected, bound)
    else:
        assert expected - bound > 0.1, (expected, bound)  # Jensen's gap is real, not zero


# --- 3. the scale gauge ---------------------------------------------------------------------------


def _gauge_model(sigma_q, k=1.0):
    """AEF (D = 3, d = 2) with a constant σ_q (the raw half of the head's last layer zeroed and
    its bias set), so that W → W/k, b → b/k, σ_q → k·σ_q can be done by editing parameters."""
    torch.manual_seed(7)
    lo, hi = 0.1, 4.0
    model = make_obs_model(
        "aef",
        (3,),
        2,
        hidden=16,
        layers=1,
        sigma_x="head",
        sigma_x_min=0.5,
        sigma_q_min=lo,
        sigma_q_max=hi,
    ).double()
    _perturb(model)
    target = k * torch.tensor(sigma_q, dtype=F64)
    assert lo < target.min() and target.max() < hi  # inside the bound
    with torch.no_grad():
        last = model.posterior_head[-1]
        last.weight[2:].zero_()
        last.bias[2:] = torch.logit((target - lo) / (hi - lo))
        last.weight[:2].mul_(0.3)  # μ_q and W·y + b moderate: proposals near the posterior
        last.bias[:2].mul_(0.3)
        model.projection.weight.mul_(0.1 / k)
        model.projection.bias.mul_(0.1 / k)
    return model


def _log_marginal_2d(model, y):
    """log ∫ N(z; 0, I) N(y; μ_x(z), σ_x(z)²) dz over a 2-d grid: no W, no σ_q in it."""
    g = torch.linspace(-7.0, 7.0, 281, dtype=F64)
    z = torch.cartesian_prod(g, g)
    mu_x, sigma_x = model.decoder_params(z)
    log_joint = D.Normal(0.0, 1.0).log_prob(z).sum(-1)[:, None] + D.Normal(
        mu_x[:, None], sigma_x[:, None]
    ).log_prob(y).sum(-1)
    return torch.logsumexp(log_joint, 0) + 2 * math.log(g[1] - g[0])


def test_scale_gauge_raises_objective_by_d_log_k_and_leaves_log_likelihood_unchanged():
    k, sigma_q, s, d = 2.5, [0.5, 0.7], 2.5, 2
    base, gauged = _gauge_model(sigma_q), _gauge_model(sigma_q, k)
    torch.manual_seed(1)
    with torch.no_grad():
        y = base.sample(4)
        # The edit is the gauge: σ_q grew by k, u shrank by k, z did not move.
        sigma_base = base.posterior(base.encoder(y))[1]
        torch.testing.assert_close(gauged.posterior(gauged.encoder(y))[1], k * sigma_base)
        torch.testing.assert_close(gauged.coords(y), base.coords(y) / k)
        torch.testing.assert_close(gauged.encode(y), base.encode(y))
        # J = log p(y, u) is a density in u: shrinking u by k raises it by d·log k.
        shift = torch.full((4,), d * math.log(k), dtype=F64)
        torch.testing.assert_close(gauged.objective(y) - base.objective(y), shift)

        truth = _log_marginal_2d(base, y)
        torch.testing.assert_close(_log_marginal_2d(gauged, y), truth)  # the decoders agree
        estimates = {}
        for name, model, scale in [("base", base, s), ("gauged", gauged, s / k)]:
            model.proposal_scale = scale
            torch.manual_seed(2)  # the same ξ: the proposals in z-space are the same
            estimates[name] = model.log_likelihood(y, num_samples=16384)
    # The estimator is gauge-invariant (σ_q's volume cancels the proposal's density in u)...
    torch.testing.assert_close(estimates["gauged"], estimates["base"])
    # ...and estimates the true log p(y), which involves neither W nor σ_q.
    assert (estimates["base"] - truth).abs().max() < 0.06, estimates["base"] - truth


def test_a_second_gauge_shrinks_z_and_the_prior_with_sigma_q_unchanged():
    """W, b and μ_q divided by k, the prior's mean and std divided by k, the decoder's weights
    on z multiplied by k: z shrinks by k, σ_q does not move, p(y) is unchanged and J rises by
    d·log k (the prior's density of a k-times narrower z). Bounding σ_q does not block this
    direction; in the RSSM the prior's std floor (``prior_std_min``) does, and every other weight
    on z (``img_in``, the heads on feat) takes the factor k like the decoder's (math.md §5)."""
    k, d, s = 10.0, 2, 0.4
    base = _gauge_model([0.5, 0.7])
    gauged = _gauge_model([0.5, 0.7])
    with torch.no_grad():
        gauged.projection.weight.div_(k)
        gauged.projection.bias.div_(k)
        last = gauged.posterior_head[-1]
        last.weight[:d].div_(k)  # μ_q's rows; σ_q's raw rows (d:) stay
        last.bias[:d].div_(k)
        gauged.decoder[0].weight.mul_(k)  # the decoder reads z/k
    mean = torch.tensor([0.3, -0.2], dtype=F64)
    std = torch.tensor([1.2, 0.8], dtype=F64)

    def prior(scale):
        return D.Independent(D.Normal(mean / scale, std / scale), 1)

    torch.manual_seed(1)
    with torch.no_grad():
        y = base.sample(4)
        sigma_base = base.posterior(base.encoder(y))[1]
        torch.testing.assert_close(gauged.posterior(gauged.encoder(y))[1], sigma_base)
        torch.testing.assert_close(gauged.encode(y), base.encode(y) / k)
        shift = torch.full((4,), d * math.log(k), dtype=F64)
        J = {m: m.objective(y, prior=prior(c)) for m, c in ((base, 1.0), (gauged, k))}
        torch.testing.assert_close(J[gauged] - J[base], shift)
        estimates = {}
        for name, model, scale, c in [("base", base, s, 1.0), ("gauged", gauged, s / k, k)]:
            model.proposal_scale = scale
            torch.manual_seed(2)
            estimates[name] = model.log_likelihood(y, prior=prior(c), num_samples=256)
    torch.testing.assert_close(estimates["gauged"], estimates["base"])


# --- 4. the VAE's single-sample KL ----------------------------------------------------------------


def _posterior(batch=3, d=2):
    torch.manual_seed(4)
    mu_q = torch.randn(batch, d, dtype=F64)
    sigma_q = 0.3 + torch.rand(batch, d, dtype=F64)
    return mu_q, sigma_q


def _normal_without_closed_form_kl(loc, scale):
    """N(loc, scale²) as a one-component mixture: torch has no KL(Independent ‖ mixture)."""
    comp = D.Independent(D.Normal(loc[:, None], scale[:, None]), 1)
    weights = D.Categorical(torch.ones(loc.shape[0], 1, dtype=F64))
    return D.MixtureSameFamily(weights, comp)


def _mc_kl(mu_q, sigma_q, prior, n=200_000):
    """Mean and standard error of the fallback over z ~ q."""
    z = mu_q + sigma_q * torch.randn(n, *mu_q.shape, dtype=F64)
    kl = posterior_kl(mu_q, sigma_q, prior, z)  # [n, B]
    return kl.mean(0), kl.std(0) / math.sqrt(n)


def test_posterior_kl_fallback_is_log_q_minus_log_p_at_the_given_sample():
    mu_q, sigma_q = _posterior()
    prior = D.Independent(D.StudentT(3.0, torch.zeros_like(mu_q), 1.5 * torch.ones_like(mu_q)), 1)
    with pytest.raises(NotImplementedError):  # so posterior_kl takes the fallback
        D.kl_divergence(D.Independent(D.Normal(mu_q, sigma_q), 1), prior)
    z = torch.randn_like(mu_q) * 2
    # Hand-written log densities: Normal and Student-t (ν = 3, scale 1.5).
    log_q = (
        -0.5 * ((z - mu_q) / sigma_q) ** 2 - torch.log(sigma_q) - 0.5 * math.log(2 * math.pi)
    ).sum(-1)
    nu, sc = 3.0, 1.5
    log_t_norm = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
    log_p = (log_t_norm - math.log(sc) - (nu + 1) / 2 * torch.log1p((z / sc) ** 2 / nu)).sum(-1)
    torch.testing.assert_close(posterior_kl(mu_q, sigma_q, prior, z), log_q - log_p)


def test_posterior_kl_fallback_averages_to_the_kl_by_quadrature():
    mu_q, sigma_q = _posterior()
    t = D.StudentT(3.0, torch.zeros_like(mu_q), 1.5 * torch.ones_like(mu_q))
    mean, sem = _mc_kl(mu_q, sigma_q, D.Independent(t, 1))
    # Both distributions factorise, so KL = Σ_j ∫ q_j (log q_j − log p_j) dz_j, each on a grid.
    grid = torch.linspace(-12.0, 12.0, 4001, dtype=F64)
    z = mu_q + sigma_q * grid[:, None, None]  # [n, B, d], ±12 σ_q around μ_q
    q = D.Normal(mu_q, sigma_q)
    integrand = q.log_prob(z).exp() * (q.log_prob(z) - t.log_prob(z))
    truth = torch.trapezoid(integrand, z, dim=0).sum(-1)
    assert truth.min() > 0.1
    assert torch.all((mean - truth).abs() < 4 * sem + 1e-4), (mean, truth, sem)


def test_posterior_kl_fallback_averages_to_the_analytic_kl_of_a_normal_prior():
    mu_q, sigma_q = _posterior()
    mu_p, sigma_p = torch.randn_like(mu_q), 0.5 + torch.rand_like(sigma_q)
    prior = _normal_without_closed_form_kl(mu_p, sigma_p)
    analytic = (
        torch.log(sigma_p / sigma_q) + (sigma_q**2 + (mu_q - mu_p) ** 2) / (2 * sigma_p**2) - 0.5
    ).sum(-1)
    # Through the closed-form path the wrapped prior would give the same value.
    normal = D.Independent(D.Normal(mu_p, sigma_p), 1)
    torch.testing.assert_close(posterior_kl(mu_q, sigma_q, normal, mu_q), analytic)
    mean, sem = _mc_kl(mu_q, sigma_q, prior)
    assert torch.all((mean - analytic).abs() < 4 * sem + 1e-4), (mean, analytic, sem)


def test_vae_objective_with_a_non_normal_prior_subtracts_the_single_sample_kl():
    """The ELBO's KL term at the ξ the objective drew: log p(y | z) − log q(z) + log p(z)."""
    model = _perturb(make_obs_model("vae", (4,), 2, 3, hidden=8).double())
    y = torch.randn(5, 4, dtype=F64)
    ctx = torch.randn(5, 3, dtype=F64)
    prior = D.Independent(D.StudentT(4.0, torch.randn(5, 2, dtype=F64), torch.ones(5, 2)), 1)
    with torch.no_grad():
        mu_q, sigma_q = model.posterior(model.encoder(y), ctx)
        torch.manual_seed(9)
        got = model.objective(y, ctx, prior)
        torch.manual_seed(9)  # the same ξ
        z = mu_q + sigma_q * torch.randn(5, 2, dtype=F64)
        mu_x, sigma_x = model.decoder_params(z, ctx)
        want = (
            D.Normal(mu_x, sigma_x).log_prob(y).sum(-1)
            - D.Normal(mu_q, sigma_q).log_prob(z).sum(-1)
            + prior.log_prob(z)
        )
    torch.testing.assert_close(got, want)
