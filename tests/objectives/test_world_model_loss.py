"""World-model loss against independent per-step computations."""

import math

import torch
from torch import distributions as D

from aefrl.objectives import WorldModelLoss
from tests.world_model.conftest import random_batch, tiny_world_model


def _per_step(wm, batch, noise):
    torch.manual_seed(0)
    return wm.filter(batch, noise=noise)


def test_aef_loss_is_minus_the_expansion_log_density():
    for kind in ("aef", "aef_partition"):
        torch.manual_seed(1)
        wm = tiny_world_model(kind, dtype=torch.float64)
        batch = random_batch(2, 4, first_at=(0, 2), dtype=torch.float64)
        loss = WorldModelLoss(wm)
        torch.manual_seed(0)
        out = loss(batch)
        filt = _per_step(wm, batch, None)
        obs = filt.observed
        om = wm.obs_model
        j = torch.stack(
            [
                om.objective(filt.y[:, t], obs.state.h[:, t], wm.rssm.prior(obs.state.h[:, t]))
                for t in range(4)
            ],
            1,
        )
        assert torch.allclose(out["loss_obs"] + out["loss_latent"], -j.mean())
        assert torch.allclose(out["J"], j.mean())
        # The split (loss scales act on each part): the decoder term on the scored
        # coordinates, and the cross-entropy to the prior plus the encoder layer's volume.
        h, z = obs.state.h.flatten(0, 1), obs.state.z.flatten(0, 1)
        mu_x, sigma_x = om.decoder_params(z, h)
        scored = D.Normal(mu_x, sigma_x).log_prob(filt.y.flatten(0, 1))
        if kind == "aef_partition":
            scored = scored * om.shell_mask
        torch.testing.assert_close(out["loss_obs"], -scored.flatten(1).sum(-1).mean())
        latent = wm.rssm.prior(h).log_prob(z) + obs.sigma_q.flatten(0, 1).log().sum(-1)
        torch.testing.assert_close(out["loss_latent"], -latent.mean())


def test_vae_loss_balances_kl_with_free_nats():
    torch.manual_seed(2)
    wm = tiny_world_model("vae", dtype=torch.float64)
    batch = random_batch(2, 4, dtype=torch.float64)
    filt = _per_step(wm, batch, None)  # seed 0: the same noise draws as the loss below
    obs = filt.observed
    q, p = (obs.mu_q, obs.sigma_q), (obs.mu_p, obs.sigma_p)

    def kl(a, b):
        return D.kl_divergence(D.Independent(D.Normal(*a), 1), D.Independent(D.Normal(*b), 1))

    # DreamerV3 balancing: the dynamics term trains the prior only, the representation term
    # the posterior only; free nats clip each term per step.
    kl_dyn = kl([x.detach() for x in q], p)
    kl_rep = kl(q, [x.detach() for x in p])
    mu_x, sigma_x = wm.obs_model.decoder_params(
        obs.state.z.flatten(0, 1), obs.state.h.flatten(0, 1)
    )
    y = filt.y.flatten(0, 1)
    log_px = D.Normal(mu_x, sigma_x).log_prob(y).flatten(1).sum(-1)  # independent of log_px
    params = [x for x in wm.parameters() if x.requires_grad]
    median = kl_dyn.detach().median().item()  # some steps below the floor, some above
    for free in (0.0, median, 1e6):
        loss = WorldModelLoss(wm, free_nats=free, kl_dyn_scale=0.5, kl_rep_scale=0.1)
        torch.manual_seed(0)
        out = loss(batch)
        want = (0.5 * kl_dyn.clamp_min(free) + 0.1 * kl_rep.clamp_min(free)).mean()
        torch.testing.assert_close(out["loss_latent"], want)
        torch.testing.assert_close(out["kl"], kl_dyn.detach().mean())
        torch.testing.assert_close(out["loss_obs"], -log_px.mean())
        got = torch.autograd.grad(out["loss_latent"], params, allow_unused=True)
        ref = torch.autograd.grad(want, params, allow_unused=True, retain_graph=True)
        for x, g, r in zip(params, got, ref):  # None: not reached, a zero gradient
            zero = torch.zeros_like(x)
            torch.testing.assert_close(zero if g is None else g, zero if r is None else r)
        if free == median:
            assert any(g is not None and g.abs().sum() > 0 for g in got)


def test_reward_and_continue_terms_and_gradients(kind):
    torch.manual_seed(3)
    wm = tiny_world_model(kind)
    # The reward head's output layer starts at zero (no gradient reaches its hidden layers on
    # the very first step); give it the small weights it has after one update.
    torch.nn.init.normal_(wm.reward_head.net[-1].weight, std=0.01)
    batch = random_batch(2, 5)
    batch["terminated"][:, -1] = True
    loss = WorldModelLoss(wm, loss_scales={"reward": 2.0})
    out = loss(batch)
    feat = torch.cat([out["belief"], out["state"]], -1)
    reward = wm.reward_head(feat)
    assert torch.allclose(out["loss_reward"], -reward.log_prob(batch["reward"].squeeze(-1)).mean())
    cont = wm.continue_head(feat).log_prob(1.0 - batch["terminated"].squeeze(-1).float())
    assert torch.allclose(out["loss_continue"], -cont.mean())
    total = loss.total(out)
    manual = out["loss_obs"] + out["loss_latent"] + 2 * out["loss_reward"] + out["loss_continue"]
    assert torch.allclose(total, manual)
    total.backward()
    for name, p in wm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_renamed_keys_are_read_under_their_new_names(kind):
    """set_keys renames every input the loss reads, the filter's three and the stored context
    included (it read the default names before); the result is the default-named batch's, key
    for key."""
    torch.manual_seed(3)
    wm = tiny_world_model(kind)
    batch = random_batch(2, 5, first_at=(0, 3))
    batch["is_first"][0, 0] = False  # window 0 starts mid-episode: its context counts
    batch["context_belief"] = torch.randn(2, 5, wm.rssm.deter)
    batch["context_state"] = torch.randn(2, 5, wm.rssm.latent_dim)
    names = {"pixels": "obs", "prev_action": "act_prev", "is_first": "is_init",
             "reward": "r", "terminated": "term", "context_belief": "ctx_h",
             "context_state": "ctx_z"}  # fmt: skip
    renamed = batch.clone()
    for old, new in names.items():
        renamed.rename_key_(old, new)
    loss = WorldModelLoss(wm)
    torch.manual_seed(4)
    want = loss(batch)
    loss.set_keys(**names)
    torch.manual_seed(4)  # the same dequantisation (and VAE posterior) noise
    got = loss(renamed)
    assert set(got.keys()) == set(want.keys())
    for key in want.keys():  # noqa: SIM118 (iterating a TensorDict walks its batch dims)
        torch.testing.assert_close(got[key], want[key])


def test_unknown_loss_scale_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown loss scale"):
        WorldModelLoss(tiny_world_model("aef"), loss_scales={"kl": 1.0})


def test_actnorm_is_trained_on_the_density_of_x_tilde():
    """With ActNorm the objective is ``log p(y) + ℓ_P`` (SPEC §2): the loss's gradient for the
    ActNorm parameters is that of ``−(J + ℓ_P)`` recomputed step by step, not of ``−J`` alone
    (which pulls the scale down by H·W per channel: shrinking y is a change of units)."""
    for kind in ("aef", "aef_partition", "vae"):
        torch.manual_seed(3)
        wm = tiny_world_model(kind, dtype=torch.float64, actnorm=True)
        batch = random_batch(2, 3, dtype=torch.float64)
        loss = WorldModelLoss(wm)
        loss(batch)  # the first training pass initialises ActNorm from the data
        pre = wm.preprocess
        with torch.no_grad():  # away from the data init, so no gradient vanishes by symmetry
            pre.an_log_scale.add_(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
        torch.manual_seed(0)
        out = loss(batch)
        filt = _per_step(wm, batch, None)
        params = (pre.an_log_scale, pre.an_bias)
        got = torch.autograd.grad(out["loss_obs"], params, retain_graph=True)
        # Independent: the decoder's Gaussian log-density of y on the same draws, plus the full
        # per-frame ℓ_P that the pre-processing returned (data, noise and ActNorm terms).
        obs, om = filt.observed, wm.obs_model
        h, z = obs.state.h.flatten(0, 1), obs.state.z.flatten(0, 1)
        mu_x, sigma_x = om.decoder_params(z, h)
        log_py = D.Normal(mu_x, sigma_x).log_prob(filt.y.flatten(0, 1))
        if kind == "aef_partition":
            log_py = log_py * om.shell_mask
        nll_x = -(log_py.flatten(1).sum(-1) + filt.logdet.flatten()).mean()
        want = torch.autograd.grad(nll_x, params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        # Values: the loss differs from −log p(x̃) by the parameter-free part of ℓ_P only.
        an = 16 * 16 * pre.an_log_scale.sum()
        torch.testing.assert_close(out["loss_obs"], nll_x + filt.logdet.mean() - an)


def _recon_bpd_by_hand(wm, batch, dtype):
    """``(−(mean log p(y|h,z) + mean ℓ_P) + D ln 256 − D ln w) / (D ln 2)`` in float64 from the
    filtered ``y`` (seed 0: the loss's own dequantisation draws). ``log p(y|h,z)`` is the
    decoder's Gaussian on the scored coordinates, ``ℓ_P`` is recomputed from ``y`` by inverting
    the pre-processing by hand, and ``w = 1 − eps·256/2`` is the largest noise draw that stays in
    its bin in ``dtype`` (SPEC §2), none of them read from the code's bits/dim or ℓ_P."""
    filt = _per_step(wm, batch, None)
    obs, om, pre = filt.observed, wm.obs_model, wm.preprocess
    h, z = obs.state.h.flatten(0, 1), obs.state.z.flatten(0, 1)
    mu_x, sigma_x = om.decoder_params(z, h)
    y = filt.y.flatten(0, 1).detach().double()
    log_py = D.Normal(mu_x.detach().double(), sigma_x.detach().double()).log_prob(y)
    if om.kind == "aef_partition":
        log_py = log_py * om.shell_mask.double()
    log_py = log_py.flatten(1).sum(-1)
    # ℓ_P by hand: undo ActNorm, then s = sigmoid(logit), per dim log(1−2α) − log s − log(1−s).
    u, an = y, 0.0
    if pre.actnorm:
        log_a = pre.an_log_scale.detach().double()
        u = (y - pre.an_bias.detach().double().view(-1, 1, 1)) * (-log_a).exp().view(-1, 1, 1)
        an = y.shape[-2] * y.shape[-1] * log_a.sum()
    s = torch.sigmoid(u)
    alpha = pre.alpha
    logdet = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(-1) + an
    # Sanity: this y is the batch's pixels, dequantised (x̃ inside each pixel's bin).
    x_tilde = (s - alpha) / (1 - 2 * alpha)
    pixels = batch["pixels"].flatten(0, 1).double()
    assert ((x_tilde * 256 - pixels) > -1e-3).all() and ((x_tilde * 256 - pixels) < 1.001).all()
    d = y[0].numel()
    w = 1.0 - torch.finfo(dtype).eps * 256 / 2
    nll = -(log_py.mean() + logdet.mean())
    return (nll + d * math.log(256) - d * math.log(w)) / (d * math.log(2))


def test_recon_bpd_is_the_decoder_bits_per_dim_with_the_preprocessing_logdet(kind):
    """``recon_bpd`` (SPEC §2) against an independent float64 computation, with and without a
    non-trivial ActNorm. Fails if ℓ_P (or its ActNorm part) is left out, if D ln 256 or the
    ln 2 are wrong, or if the decoder term is spread differently."""
    for actnorm in (False, True):
        torch.manual_seed(5)
        wm = tiny_world_model(kind, dtype=torch.float64, actnorm=actnorm)
        if actnorm:
            pre = wm.preprocess
            with torch.no_grad():
                pre.an_log_scale.copy_(torch.tensor([0.4, -0.3, 0.2], dtype=torch.float64))
                pre.an_bias.copy_(torch.tensor([0.1, -0.5, 0.3], dtype=torch.float64))
                pre.an_initialized.fill_(True)
        batch = random_batch(2, 3, dtype=torch.float64)
        torch.manual_seed(0)
        got = WorldModelLoss(wm)(batch)["recon_bpd"]
        want = _recon_bpd_by_hand(wm, batch, torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_recon_bpd_in_float32_accounts_for_the_noise_width():
    """In float32 the dequantisation noise is drawn from U[0, w) with w = 1 − 1.5e-5, whose
    log-density −D ln w adds 2.2e-5 bits/dim: fails if that term (or ℓ_P) is dropped."""
    torch.manual_seed(5)
    wm = tiny_world_model("aef", dtype=torch.float32)
    batch = random_batch(2, 3)
    torch.manual_seed(0)
    got = WorldModelLoss(wm)(batch)["recon_bpd"]
    want = _recon_bpd_by_hand(wm, batch, torch.float32)
    w_term = -math.log(1.0 - torch.finfo(torch.float32).eps * 128) / math.log(2)
    assert w_term > 2e-5
    # float32 rounding of the ~8 bits/dim result is ~1e-6 (seen: up to 8e-7); the term is 2.2e-5.
    torch.testing.assert_close(got.double(), want, rtol=0, atol=w_term / 4)


def test_logged_diagnostics_are_the_statistics_they_name(kind):
    """Each diagnostic against its own recomputation from the same forward (seed 0): σ_q's
    mean, min and max over the posterior, the prior's mean σ, the reward head's mean absolute
    error and σ_x's mean. Fails if one is computed from the wrong tensor or statistic (a min
    from the mean, the prior's σ from σ_q, a signed error, σ_x's max)."""
    torch.manual_seed(6)
    wm = tiny_world_model(kind, dtype=torch.float64, obs_options={"sigma_x": "head"})
    # Small predictions and rewards of both signs: a signed error would partly cancel.
    torch.nn.init.normal_(wm.reward_head.net[-1].weight, std=0.01)
    batch = random_batch(2, 4, first_at=(0, 2), dtype=torch.float64)
    batch["reward"] = batch["reward"] * 4 - 2
    torch.manual_seed(0)
    out = WorldModelLoss(wm)(batch)
    filt = _per_step(wm, batch, None)  # seed 0: the loss's own draws
    obs = filt.observed
    sigma_q, sigma_p = obs.sigma_q.detach(), obs.sigma_p.detach()
    assert sigma_q.min() < sigma_q.mean() < sigma_q.max()  # the statistics differ here
    torch.testing.assert_close(out["sigma_q_mean"], sigma_q.mean())
    torch.testing.assert_close(out["sigma_q_min"], sigma_q.min())
    torch.testing.assert_close(out["sigma_q_max"], sigma_q.max())
    assert not torch.isclose(sigma_p.mean(), sigma_q.mean())
    torch.testing.assert_close(out["prior_std_mean"], sigma_p.mean())
    # z's spread over the B·T rows, per dim, then averaged: not over dims, not the posterior σ
    rows = obs.state.z.detach().reshape(-1, obs.state.z.shape[-1])
    want = torch.stack([rows[:, j].std() for j in range(rows.shape[1])]).mean()
    assert not torch.isclose(want, rows.std()) and not torch.isclose(want, sigma_q.mean())
    torch.testing.assert_close(out["z_std"], want)
    # The reward head's expected reward per step against the batch's rewards.
    feat = torch.cat([obs.state.h, obs.state.z], -1).detach()
    pred = wm.reward_head(feat).mean.detach()
    err = pred - batch["reward"].squeeze(-1)
    assert (err > 0).any() and (err < 0).any()
    torch.testing.assert_close(out["reward_mae"], err.abs().mean())
    # σ_x from the decoder's σ head, per pixel of every step.
    _, sigma_x = wm.obs_model.decoder_params(obs.state.z.flatten(0, 1), obs.state.h.flatten(0, 1))
    sigma_x = sigma_x.detach()
    assert sigma_x.mean() < sigma_x.max()
    torch.testing.assert_close(out["sigma_x_mean"], sigma_x.mean())
