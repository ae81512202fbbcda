"""RSSM shapes and the time alignment drawn in aefrl/world_model/rssm.py."""

import math

import pytest
import torch

from aefrl.objectives.world_model import WorldModelLoss
from aefrl.world_model import RSSMState
from aefrl.world_model.evaluation import (
    filtered_reward_error,
    open_loop_prediction,
    sequence_log_likelihood,
)
from tests.world_model.conftest import random_batch, tiny_world_model


def _filter(wm, batch, noise):
    torch.manual_seed(0)  # same dequantisation noise every call
    return wm.filter(batch, noise=noise).observed


def test_shapes(kind):
    wm = tiny_world_model(kind)
    obs = wm.filter(random_batch(2, 5)).observed
    assert obs.state.h.shape == (2, 5, 8) and obs.state.z.shape == (2, 5, 3)
    for x in (obs.mu_q, obs.sigma_q, obs.mu_p, obs.sigma_p):
        assert x.shape == (2, 5, 3)
    assert obs.last.h.shape == (2, 8)
    assert obs.state.feat.shape == (2, 5, 11) and wm.feat_dim == 11
    imagined = wm.rssm.imagine(obs.last, torch.rand(2, 4, 2))
    assert imagined.h.shape == (2, 4, 8) and imagined.z.shape == (2, 4, 3)


def test_time_alignment(kind):
    """h_t sees a_{t-1} (stored in row t) and o_{<t}; z_t sees o_t; is_first cuts the past."""
    torch.manual_seed(1)
    wm = tiny_world_model(kind, dtype=torch.float64)
    batch = random_batch(2, 7, first_at=(0, 5), dtype=torch.float64)
    noise = torch.randn(2, 7, 3, dtype=torch.float64)
    base = _filter(wm, batch, noise)

    def changed(obs, attr):
        a, b = getattr(obs.state, attr), getattr(base.state, attr)
        return [not torch.allclose(a[:, t], b[:, t]) for t in range(7)]

    moved = batch.clone()
    moved["prev_action"][:, 3] += 0.5  # a_2, stored in row 3
    obs = _filter(wm, moved, noise)
    assert changed(obs, "h") == [False, False, False, True, True, False, False]

    moved = batch.clone()
    moved["pixels"][:, 3] = 255 - moved["pixels"][:, 3]  # o_3
    obs = _filter(wm, moved, noise)
    assert changed(obs, "h") == [False, False, False, False, True, False, False]
    assert changed(obs, "z") == [False, False, False, True, True, False, False]


def test_observe_equals_step_by_step_filtering(kind):
    wm = tiny_world_model(kind, dtype=torch.float64)
    batch = random_batch(3, 4, first_at=(0, 2), dtype=torch.float64)
    noise = torch.randn(3, 4, 3, dtype=torch.float64)
    torch.manual_seed(0)
    filt = wm.filter(batch, noise=noise)
    embed, coords = wm.obs_model.embed(filt.y.flatten(0, 1))
    embed = embed.unflatten(0, (3, 4))
    coords = None if coords is None else coords.unflatten(0, (3, 4))
    state = wm.rssm.initial(3, dtype=torch.float64)
    for t in range(4):
        state, mu_q, _ = wm.rssm.obs_step(
            state,
            batch["prev_action"][:, t],
            embed[:, t],
            None if coords is None else coords[:, t],
            batch["is_first"][:, t],
            noise[:, t],
        )
        assert torch.allclose(state.h, filt.observed.state.h[:, t])
        assert torch.allclose(state.z, filt.observed.state.z[:, t])
        assert torch.allclose(mu_q, filt.observed.mu_q[:, t])


def test_observe_gradients_equal_step_by_step_gradients(kind):
    """observe() projects all embeddings at once and splits its inputs with unbind; the
    gradients (parameters, embeddings, coords) must be those of the plain per-step loop."""
    torch.manual_seed(3)
    wm = tiny_world_model(kind, dtype=torch.float64)
    rssm = wm.rssm
    b, t, d = 3, 5, 3
    embed = torch.randn(b, t, wm.obs_model.embed_dim, dtype=torch.float64, requires_grad=True)
    coords = torch.randn(b, t, d, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(b, t, d, dtype=torch.float64)
    batch = random_batch(b, t, first_at=(0, 3), dtype=torch.float64)
    act, first = batch["prev_action"], batch["is_first"]
    params = [p for p in wm.parameters() if p.requires_grad]

    def loss(h, z, mu_q):
        return (
            (h * torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)).sum()
            + z.square().sum()
            + mu_q.sin().sum()
        )

    obs = rssm.observe(embed, coords, act, first, noise=noise)
    got = torch.autograd.grad(
        loss(obs.state.h, obs.state.z, obs.mu_q), [embed, coords, *params], allow_unused=True
    )
    state, hs, zs, mus = rssm.initial(b, dtype=torch.float64), [], [], []
    for i in range(t):
        state, mu_q, _ = rssm.obs_step(
            state, act[:, i], embed[:, i], coords[:, i], first[:, i], noise[:, i]
        )
        hs.append(state.h), zs.append(state.z), mus.append(mu_q)
    ref = loss(torch.stack(hs, 1), torch.stack(zs, 1), torch.stack(mus, 1))
    want = torch.autograd.grad(ref, [embed, coords, *params], allow_unused=True)
    assert got[0].abs().sum() > 0
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)


def test_prior_std_is_bounded_below():
    """σ_p = prior_std_min + softplus(raw): with the head's raw scale driven far negative the
    std sits on the floor, not below it (nor at 0, which a missing floor would give)."""
    wm = tiny_world_model("aef")
    head = wm.rssm.prior_head[-1]
    d = wm.rssm.latent_dim
    with torch.no_grad():
        head.weight[d:].zero_()
        head.bias[d:] = -50.0
    _, sigma = wm.rssm.prior_params(torch.randn(100, 8))
    torch.testing.assert_close(sigma, torch.full_like(sigma, 0.1))
    with torch.no_grad():
        head.bias[d:] = 2.0
    _, sigma = wm.rssm.prior_params(torch.randn(100, 8))
    want = 0.1 + torch.nn.functional.softplus(torch.tensor(2.0))
    torch.testing.assert_close(sigma, torch.full_like(sigma, want.item()))


def test_img_step_samples_the_prior():
    wm = tiny_world_model("vae", dtype=torch.float64)
    prev = RSSMState(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    a = torch.rand(4, 2, dtype=torch.float64)
    noise = torch.randn(4, 3, dtype=torch.float64)
    nxt = wm.rssm.img_step(prev, a, noise)
    mu, sigma = wm.rssm.prior_params(wm.rssm.recurrent(prev, a))
    assert torch.allclose(nxt.z, mu + sigma * noise)


def test_rssm_hidden_sizes_the_rssm_mlps_and_nothing_else(kind):
    """``rssm_hidden`` sets the GRU input, the prior head and the posterior head (torchrl's
    DreamerV1 sizes them with the belief), while the reward and continue heads keep ``hidden``;
    unset, every MLP is ``hidden`` wide, as in checkpoints from before the setting."""

    def widths(model):
        return {
            "gru_in": model.rssm.gru.input_size,
            "img_in": model.rssm.img_in[0].out_features,
            "prior": model.rssm.prior_head[0].out_features,
            "posterior": model.obs_model.posterior_head[0].out_features,
            "reward": model.reward_head.net[0].out_features,
            "continue": model.continue_head.net[0].out_features,
        }

    narrow = tiny_world_model(kind, rssm_hidden=8)
    rssm_mlps = dict.fromkeys(("gru_in", "img_in", "prior", "posterior"), 8)
    assert widths(narrow) == {**rssm_mlps, "reward": 16, "continue": 16}
    assert set(widths(tiny_world_model(kind)).values()) == {16}
    obs = narrow.filter(random_batch(2, 5)).observed
    assert obs.mu_q.shape == obs.mu_p.shape == (2, 5, 3)


def test_a_reset_clears_a_non_finite_state(kind):
    """is_first restarts from zeros even when the state before is nan or inf (a reset by
    multiplication kept them: inf · 0 is nan), and so does the acting carry's reset."""
    from agents.base import Carry

    wm = tiny_world_model(kind)
    bad = RSSMState(torch.full((2, 8), float("nan")), torch.full((2, 3), float("inf")))
    zero = RSSMState(torch.zeros(2, 8), torch.zeros(2, 3))
    embed, coords = wm.obs_model.embed(wm.encode_pixels(random_batch(2, 1)["pixels"][:, 0])[0])
    first = torch.tensor([[True], [False]])
    noise = torch.zeros(2, 3)
    action = torch.full((2, 2), float("nan"))
    got, _, _ = wm.rssm.obs_step(bad, action, embed, coords, first, noise)
    want, _, _ = wm.rssm.obs_step(zero, torch.zeros(2, 2), embed, coords, first, noise)
    assert torch.equal(got.h[0], want.h[0]) and torch.equal(got.z[0], want.z[0])
    assert got.h[1].isnan().all()  # the row that did not start over keeps its state
    carry = Carry(bad, action).reset(torch.tensor([True, False]))
    assert (carry.state.h[0] == 0).all() and (carry.prev_action[0] == 0).all()
    assert carry.state.z[1].isinf().all()


def test_without_rssm_hidden_the_posterior_head_keeps_the_obs_model_width(kind):
    """Runs from before rssm_hidden that set obs_model.options.hidden build the same model; a
    posterior width given both ways must agree."""
    import pytest

    model = tiny_world_model(kind, obs_options={"hidden": 12})
    assert model.obs_model.posterior_head[0].out_features == 12
    assert model.rssm.img_in[0].out_features == 16
    model = tiny_world_model(kind, rssm_hidden=8, obs_options={"posterior_hidden": 8})
    assert model.obs_model.posterior_head[0].out_features == 8
    with pytest.raises(ValueError, match="set rssm_hidden alone"):
        tiny_world_model(kind, rssm_hidden=8, obs_options={"posterior_hidden": 4})


def test_dynamics_noise_feeds_the_recurrence_only_and_only_in_training(kind):
    """With ``train_noise``, step t+1's recurrence reads ``z_t + s·σ_p(h_t)·ε_t`` (recomputed
    step by step with the same draws) while the returned z, and ``last``, are the filter's
    own; without it, or with s = 0, nothing changes and nothing is drawn."""
    torch.manual_seed(3)
    wm = tiny_world_model(kind, dtype=torch.float64, dynamics_noise=0.7)
    rssm = wm.rssm
    b, t, d = 3, 5, 3
    embed = torch.randn(b, t, wm.obs_model.embed_dim, dtype=torch.float64)
    coords = torch.randn(b, t, d, dtype=torch.float64)
    noise = torch.randn(b, t, d, dtype=torch.float64)
    batch = random_batch(b, t, first_at=(0, 3), dtype=torch.float64)
    act, first = batch["prev_action"], batch["is_first"]
    plain = rssm.observe(embed, coords, act, first, noise=noise)
    torch.manual_seed(11)
    obs = rssm.observe(embed, coords, act, first, noise=noise, train_noise=True)
    torch.manual_seed(11)
    state = rssm.initial(b, dtype=torch.float64)
    for i in range(t):
        state, _, _ = rssm.obs_step(
            state, act[:, i], embed[:, i], coords[:, i], first[:, i], noise[:, i]
        )
        torch.testing.assert_close(obs.state.h[:, i], state.h)
        torch.testing.assert_close(obs.state.z[:, i], state.z)
        exact = state
        sigma = rssm.prior_params(state.h)[1]
        state = RSSMState(state.h, state.z + 0.7 * sigma * torch.randn(b, d, dtype=torch.float64))
    torch.testing.assert_close(obs.last.z, exact.z)
    torch.testing.assert_close(obs.last.h, exact.h)
    # The noise moved every belief after the first step, but not where is_first reset it
    # (row 3: the reset zeroes the noisy z too) and not the first row.
    moved = [not torch.allclose(obs.state.h[:, i], plain.state.h[:, i]) for i in range(t)]
    assert moved == [False, True, True, False, True]
    # Off: the filter of evaluation and acting, and s = 0, draw nothing.
    rssm.dynamics_noise = 0.0
    torch.manual_seed(11)
    off = rssm.observe(embed, coords, act, first, noise=noise, train_noise=True)
    drawn_next = torch.rand(1)
    torch.manual_seed(11)
    assert torch.equal(drawn_next, torch.rand(1))
    torch.testing.assert_close(off.state.h, plain.state.h, rtol=0, atol=0)


def test_dynamics_noise_trains_no_prior_through_its_scale(kind):
    """σ_p only scales the noise (held fixed): a loss on the beliefs alone gives the prior
    head no gradient, with noise or without, while the recurrence gets one."""
    torch.manual_seed(4)
    wm = tiny_world_model(kind, dynamics_noise=1.0)
    batch = random_batch(2, 5)
    obs = wm.filter(batch, train_noise=True).observed
    obs.state.h.square().sum().backward()
    assert all(p.grad is None for p in wm.rssm.prior_head.parameters())
    assert wm.rssm.gru.weight_ih.grad.abs().sum() > 0


def test_world_model_loss_filters_with_the_dynamics_noise(kind):
    """The training loss draws the recurrence's noise (two draws, two losses); evaluation's
    likelihood does not (the same number with and without the setting)."""
    torch.manual_seed(5)
    wm = tiny_world_model(kind, dynamics_noise=1.0)
    loss = WorldModelLoss(wm)
    batch = random_batch(2, 5)

    def obs_loss(seed, s):
        torch.manual_seed(seed)
        wm.rssm.dynamics_noise = s
        return float(loss(batch)["loss_obs"].detach())

    assert obs_loss(0, 1.0) != obs_loss(0, 0.0)
    assert obs_loss(0, 1.0) == obs_loss(0, 1.0)  # seeded: the draws, not something else

    def log_p(s):
        wm.rssm.dynamics_noise = s
        torch.manual_seed(1)
        return sequence_log_likelihood(wm, batch, num_samples=2)[0]

    assert torch.equal(log_p(1.0), log_p(0.0))

    # Evaluation's other paths filter through WorldModel.filter, whose default is no noise.
    def evaluated(s):
        wm.rssm.dynamics_noise = s
        torch.manual_seed(2)
        with torch.no_grad():
            h = wm.filter(batch).observed.state.h
            pred = open_loop_prediction(wm, batch, context=2)["reward_pred"]
            return h, pred, filtered_reward_error(wm, batch), torch.rand(1)

    noisy, plain = evaluated(1.0), evaluated(0.0)
    assert torch.equal(noisy[0], plain[0]) and torch.equal(noisy[1], plain[1])
    assert noisy[2] == plain[2] and torch.equal(noisy[3], plain[3])  # nor any draw


def test_dynamics_noise_must_be_finite_and_non_negative():
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="dynamics_noise must be a finite number >= 0"):
            tiny_world_model("aef", dynamics_noise=bad)
