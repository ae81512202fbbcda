"""The importance-sampled likelihoods of vae and aef are unbiased for p(y) (SPEC §6)."""

import itertools
import math

import pytest
import torch
from torch import distributions as D

from aefrl.obs_models import make_obs_model


def _perturb(model, scale):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def _two_dim_model(kind, context_dim=0, seed=11):
    """A 2-d model (d = 1) whose proposal is wider than the prior (σ_q ≥ 1.2, s = 1), so the
    importance weights are bounded and their average settles within a test's budget. With a
    context, its decoder weights on the context are tripled: contexts must matter."""
    torch.manual_seed(seed)
    extra = {"proposal_scale": 1.0} if kind == "aef" else {}
    model = make_obs_model(
        kind,
        (2,),
        1,
        context_dim,
        hidden=16,
        layers=1,
        sigma_x="head",
        sigma_x_min=0.3,
        sigma_q_min=1.2,
        sigma_q_max=2.0,
        **extra,
    ).double()
    _perturb(model, 0.3)
    with torch.no_grad():
        model.decoder[0].weight[:, :context_dim].mul_(3.0)
        if kind == "aef":  # keep the proposal centres W·y + b moderate over the grid
            model.projection.weight.mul_(0.2)
            model.projection.bias.mul_(0.2)
    return model


def _marginal_by_quadrature(model, y):
    """p(y) = ∫ N(z; 0, 1) N(y; μ_x(z), σ_x(z)²) dz on a fine z grid (d = 1)."""
    z = torch.linspace(-9, 9, 3601, dtype=torch.float64)
    mu_x, sigma_x = model.decoder_params(z[:, None])
    log_joint = D.Normal(0.0, 1.0).log_prob(z)[:, None] + D.Normal(
        mu_x[:, None], sigma_x[:, None]
    ).log_prob(y[None]).sum(-1)
    return torch.trapezoid(log_joint.exp(), z, dim=0)


@pytest.mark.parametrize("kind", ["vae", "aef"])
def test_estimator_is_unbiased_and_integrates_to_one(kind):
    model = _two_dim_model(kind)
    lim, n, repeats, k = 12.0, 121, 64, 4
    grid = torch.linspace(-lim, lim, n, dtype=torch.float64)
    yy = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        est = torch.stack([model.log_likelihood(yy, num_samples=k).exp() for _ in range(repeats)])
        truth = _marginal_by_quadrature(model, yy)
    step = (grid[1] - grid[0]).item()

    def integral(f):
        return torch.trapezoid(torch.trapezoid(f.view(n, n), dx=step), dx=step).item()

    assert abs(integral(truth) - 1.0) < 1e-3  # the grid holds the mass
    mean = est.mean(0)
    # A forgotten −log K would integrate to ≈ K = 4; a biased estimator drifts by far more.
    assert abs(integral(mean) - 1.0) < 0.03, integral(mean)
    # Averaging repeats converges to the true density pointwise (L1 distance shrinks).
    l1_mean, l1_single = integral((mean - truth).abs()), integral((est[0] - truth).abs())
    assert l1_mean < 0.15 and l1_mean < 0.5 * l1_single, (l1_mean, l1_single)


def _linear_gaussian(kind, steps=1000):
    """Vector model whose decoder is one Linear layer with constant σ_x, so p(y) is Gaussian in
    closed form. The encoder (the proposal) is trained briefly, as any model one evaluates is."""
    torch.manual_seed(5)
    opts = dict(hidden=32, layers=0, sigma_x="learned", sigma_x_min=0.2, sigma_x_init=0.5)
    model = make_obs_model(kind, (3,), 2, **opts).double()
    data = D.MultivariateNormal(
        torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64),
        scale_tril=torch.tensor(
            [[1.0, 0, 0], [0.8, 0.6, 0], [-0.5, 0.3, 0.4]], dtype=torch.float64
        ),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = -model.objective(data.sample((256,))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    lin = model.decoder[-1]
    with torch.no_grad():
        sigma_x = model.decoder_params(torch.zeros(1, 2, dtype=torch.float64))[1]
        cov = lin.weight @ lin.weight.T + torch.diag(sigma_x.square())
        if kind == "aef":
            model.tune_proposal_scale(data.sample((256,)), scales=(0.03, 0.1, 0.3, 1.0))
    return model, D.MultivariateNormal(lin.bias.detach(), covariance_matrix=cov)


@pytest.mark.parametrize("kind", ["vae", "aef"])
def test_estimator_converges_to_closed_form_on_linear_gaussian(kind):
    model, marginal = _linear_gaussian(kind)
    y = marginal.sample((64,))
    exact = marginal.log_prob(y)
    ks = (1, 64, 4096, 65536)
    with torch.no_grad():
        errors = [(model.log_likelihood(y, num_samples=k) - exact).abs() for k in ks]
    means = [e.mean().item() for e in errors]
    # The log of an unbiased estimate is biased low by a gap that vanishes as K grows; rare
    # points where the encoder is a poor proposal close last, so check the mean and the median.
    assert all(a > b for a, b in itertools.pairwise(means)), means
    assert means[-1] < 0.05 and errors[-1].median() < 0.01, means


def test_vae_elbo_is_below_exact_log_likelihood():
    model, marginal = _linear_gaussian("vae", steps=300)
    y = marginal.sample((64,))
    with torch.no_grad():
        elbos = torch.stack([model.objective(y) for _ in range(400)])
    mean, sem = elbos.mean(0), elbos.std(0) / math.sqrt(elbos.shape[0])
    exact = marginal.log_prob(y).detach()
    assert torch.all(mean <= exact + 4 * sem)
    assert (exact - mean).mean() > 0.05  # a real gap: the posterior is not exact


def test_aef_proposal_tuning_picks_the_best_scale():
    model, marginal = _linear_gaussian("aef")
    y = marginal.sample((128,))
    results = model.tune_proposal_scale(y, scales=(0.01, 0.3, 1.0, 3.0), num_samples=16)
    assert model.proposal_scale == max(results, key=results.get)
    assert set(results) == {0.01, 0.3, 1.0, 3.0}


@pytest.mark.parametrize("kind", ["vae", "aef"])
def test_proposal_log_q_is_the_proposed_latents_density(kind):
    """``ObservationModel.proposal`` returns log q of the draw without the encoder map's
    −Σ log σ_q: with it, the density of the proposed z under torch's own Normal."""
    torch.manual_seed(0)
    extra = {"proposal_scale": 0.4} if kind == "aef" else {}
    model = make_obs_model(kind, (3, 4, 4), 5, 2, **extra)
    y, ctx = torch.randn(7, 3, 4, 4), torch.randn(7, 2)
    e, coords = model.embed(y)
    mu_q, sigma_q = model.posterior(e, ctx)
    xi = torch.randn(7, 5)
    u, noise, log_q = model.proposal(coords, xi)
    z = model.latent(mu_q, sigma_q, u, noise)
    if kind == "vae":
        q = D.Normal(mu_q, sigma_q)  # the posterior itself
    else:  # u ~ N(W·y + b, s²), z = μ_q + σ_q u
        q = D.Normal(mu_q + sigma_q * coords, sigma_q * 0.4)
    expected = q.log_prob(z).sum(-1) + sigma_q.log().sum(-1)
    torch.testing.assert_close(log_q, expected, rtol=1e-5, atol=1e-4)
    partition = make_obs_model("aef_partition", (3, 4, 4), 5, 2)
    assert partition.proposal(coords, xi)[0] is coords  # exact: the posterior's own z


@pytest.mark.parametrize("kind", ["vae", "aef"])
def test_chunked_estimator_draws_exactly_the_samples_it_averages(kind, monkeypatch):
    """With ``chunk_size`` splitting K = 5 samples of B = 3 rows into chunks of 2, 2 and 1, the
    decoder scores exactly K·B proposals, never more than a chunk at once: a last chunk padded
    to full size would average 6 weights while dividing by 5 (a bias of log 6/5 per row at
    equal weights), and the estimate is the one of the same draws unchunked."""
    model = _two_dim_model(kind)
    y = torch.randn(3, 2, dtype=torch.float64)
    rows = []
    decoder_log_px = model.decoder_log_px

    def counting(y_, z, context):
        rows.append(z.shape[:-1].numel())
        return decoder_log_px(y_, z, context)

    monkeypatch.setattr(model, "decoder_log_px", counting)
    torch.manual_seed(4)
    chunked = model.log_likelihood(y, num_samples=5, chunk_size=6)
    assert rows == [2 * 3, 2 * 3, 1 * 3]
    rows.clear()
    # The same 5 draws per row in one pass: the proposal noise, drawn chunk by chunk above.
    draws = []
    proposal = model.proposal

    def recording(coords, xi):
        draws.append(xi)
        return proposal(coords, xi)

    monkeypatch.setattr(model, "proposal", recording)
    torch.manual_seed(4)
    model.log_likelihood(y, num_samples=5, chunk_size=6)
    xi = torch.cat(draws, 0)
    assert xi.shape[0] == 5
    monkeypatch.setattr(torch, "randn", lambda *a, **k: xi.clone())
    whole = model.log_likelihood(y, num_samples=5, chunk_size=10_000)
    assert rows[-1] == 5 * 3
    torch.testing.assert_close(chunked, whole)


def test_proposal_scale_search_scores_every_scale_on_the_same_draws(monkeypatch):
    """Common random numbers (SPEC §6, ``search_proposal_scale``): every candidate s sees the
    same standard-normal draws, so the grid is compared on the proposals' widths alone, not on
    the luck of each scale's draws. Fails if each scale draws afresh."""
    model = _two_dim_model("aef")
    y = torch.randn(4, 2, dtype=torch.float64)
    draws = {}
    proposal = model.proposal

    def recording(coords, xi):
        draws.setdefault(model.proposal_scale, []).append(xi.clone())
        return proposal(coords, xi)

    monkeypatch.setattr(model, "proposal", recording)
    scales = (0.3, 1.0, 3.0)
    model.tune_proposal_scale(y, scales=scales, num_samples=6)
    assert sorted(draws) == list(scales)
    first = torch.cat(draws[scales[0]])
    assert first.shape[0] == 6 and first.std() > 0.1
    for s in scales[1:]:
        assert torch.equal(torch.cat(draws[s]), first), s
