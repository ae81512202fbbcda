"""Actor, λ-returns, return normalisation, slow critic, frozen modules."""

import math

import pytest
import torch

from aefrl.actor_critic import Actor, ReturnNormalizer, SlowCopy, lambda_returns, quantiles
from aefrl.nn import MLP, frozen


def test_lambda_returns_against_a_hand_computation():
    # One trajectory, H = 3: R_2 = r2 + d2·v2; R_k = r_k + d_k((1−λ)v_k + λR_{k+1}).
    r = torch.tensor([[1.0, 2.0, 3.0]])
    v = torch.tensor([[10.0, 20.0, 30.0]])
    d = torch.tensor([[0.9, 0.5, 0.8]])
    lam = 0.7
    r2 = 3.0 + 0.8 * 30.0
    r1 = 2.0 + 0.5 * (0.3 * 20.0 + 0.7 * r2)
    r0 = 1.0 + 0.9 * (0.3 * 10.0 + 0.7 * r1)
    assert torch.allclose(lambda_returns(r, v, d, lam), torch.tensor([[r0, r1, r2]]))
    # λ = 0: one-step TD targets; λ = 1: discounted Monte-Carlo sums bootstrapped at the end.
    assert torch.allclose(lambda_returns(r, v, d, 0.0), r + d * v)
    mc2 = 3.0 + 0.8 * 30.0
    mc = torch.tensor([[1.0 + 0.9 * (2.0 + 0.5 * mc2), 2.0 + 0.5 * mc2, mc2]])
    assert torch.allclose(lambda_returns(r, v, d, 1.0), mc)


def test_return_normalizer_tracks_the_5_95_percentile_spread():
    norm = ReturnNormalizer(decay=0.9)
    x = torch.arange(101.0)  # P5 = 5, P95 = 95
    assert torch.isclose(norm.update(x), torch.tensor(90.0))  # the first spread as it is
    assert torch.isclose(norm.update(x * 2), torch.tensor(0.9 * 90 + 0.1 * 180.0))
    assert torch.allclose(norm(torch.tensor([99.0])), torch.tensor([1.0]))
    small = ReturnNormalizer()
    small.update(torch.linspace(0, 0.1, 50))
    assert torch.allclose(small(torch.tensor([0.05])), torch.tensor([0.05]))  # never amplifies


def test_quantiles_match_torch_quantile():
    torch.manual_seed(0)
    for n in (1, 2, 7, 1000):
        x = torch.randn(n, dtype=torch.float64)
        levels = (0.0, 0.05, 0.5, 0.95, 1.0)
        ours = torch.stack(quantiles(x, levels))
        torch.testing.assert_close(ours, torch.quantile(x, torch.tensor(levels, dtype=x.dtype)))


def test_slow_copy_is_an_ema_and_is_not_in_the_source_state():
    fast = torch.nn.Linear(3, 2)
    slow = SlowCopy(fast, tau=0.25)
    before = slow.copy.weight.clone()
    with torch.no_grad():
        fast.weight.add_(1.0)
    slow.update()
    assert torch.allclose(slow.copy.weight, before + 0.25)
    assert set(slow.state_dict()) == {"copy.weight", "copy.bias"}
    assert not any(p.requires_grad for p in slow.parameters())


def test_actor_actions_are_bounded_and_mode_is_deterministic():
    actor = Actor(6, 3, hidden=16, layers=1)
    feat = torch.randn(5, 6) * 100
    dist = actor(feat)
    a, log_p = dist.rsample_and_log_prob()
    assert a.shape == (5, 3) and log_p.shape == (5,)
    assert a.abs().max() <= 1.0 and torch.isfinite(log_p).all()
    assert torch.equal(actor(feat).deterministic_sample, dist.deterministic_sample)
    std = dist.base_dist.base_dist.scale
    assert std.min() >= 0.1 - 1e-6 and std.max() <= 1.0 + 1e-6


def test_actor_distribution_written_from_its_definition():
    """a = tanh(x), x ~ N(5·tanh(μ/5), σ), σ = 0.1 + 0.9·sigmoid(s + 2) from the net's (μ, s):
    the log-density by the change of variables, log N(x) − log(1 − a²), in float64."""
    actor = Actor(6, 3, hidden=16, layers=1).double()
    feat = torch.randn(5, 6, dtype=torch.float64)
    dist = actor(feat)
    a, log_p = dist.rsample_and_log_prob()
    loc, raw = actor.net(feat).chunk(2, -1)
    mean = 5 * torch.tanh(loc / 5)
    base = torch.distributions.Normal(mean, 0.1 + 0.9 * torch.sigmoid(raw + 2))
    want = (base.log_prob(torch.atanh(a)) - torch.log1p(-a.square())).sum(-1)
    torch.testing.assert_close(log_p, want)
    torch.testing.assert_close(dist.log_prob(a), want)
    torch.testing.assert_close(dist.deterministic_sample, torch.tanh(mean))


def test_bounded_normal_written_from_its_definition():
    """a ~ N(tanh(μ), σ), σ = 0.1 + 0.9·sigmoid(s + 2) from the net's (μ, s), in float64;
    acting clips a sample to [-1, 1] and the eval action is tanh(μ)."""
    actor = Actor(6, 3, hidden=16, layers=1, dist="bounded_normal").double()
    feat = torch.randn(5, 6, dtype=torch.float64)
    dist = actor(feat)
    a, log_p = dist.rsample_and_log_prob()
    loc, raw = actor.net(feat).chunk(2, -1)
    want_dist = torch.distributions.Normal(torch.tanh(loc), 0.1 + 0.9 * torch.sigmoid(raw + 2))
    torch.testing.assert_close(log_p, want_dist.log_prob(a).sum(-1))
    torch.testing.assert_close(dist.deterministic_sample, torch.tanh(loc))
    torch.testing.assert_close(actor.act(feat, explore=False), torch.tanh(loc))
    torch.manual_seed(4)
    acted = actor.act(feat, explore=True)
    torch.manual_seed(4)
    torch.testing.assert_close(acted, actor(feat).sample().clamp(-1, 1))
    # The reparameterised gradient flows to μ and σ through the sample.
    grads = torch.autograd.grad(a.sum(), actor.net.parameters(), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bounded_normal_keeps_exploring_where_tanh_normal_saturates():
    """With the net's mean far in tanh's tail (the pre-squash mean soft-clipped to ~5), the
    tanh-Gaussian's actions pile up at the bound (spread ~2e-3 at σ ≈ 0.89) while the bounded
    normal's spread stays σ."""
    torch.manual_seed(0)
    spreads = {}
    for dist in ("tanh_normal", "bounded_normal"):
        actor = Actor(6, 1, hidden=16, layers=1, dist=dist).double()
        with torch.no_grad():  # mean output +30 (pre-squash), std output 0 (σ ≈ 0.89)
            actor.net[-1].weight.zero_()
            actor.net[-1].bias.copy_(torch.tensor([30.0, 0.0]))
        samples = actor(torch.zeros(20000, 6, dtype=torch.float64)).sample()
        spreads[dist] = float(samples.std())
    sigma = 0.1 + 0.9 * torch.sigmoid(torch.tensor(2.0)).item()
    assert spreads["tanh_normal"] < 0.01 * sigma
    assert abs(spreads["bounded_normal"] - sigma) < 0.02


class _RecordingDynamics:
    """An RSSM stand-in whose next belief is the action: records what imagination feeds it."""

    def __init__(self):
        self.actions = []

    def img_step(self, state, action):
        from aefrl.world_model.rssm import RSSMState

        self.actions.append(action)
        return RSSMState(action * 1.0, state.z)


@pytest.mark.parametrize("dist", ["tanh_normal", "bounded_normal"])
def test_imagination_feeds_the_dynamics_actions_in_bounds(dist):
    """The world model trains on executed (clipped) actions, so imagination gives the dynamics
    a bounded normal's samples clipped too: an action beyond a bound has no gradient, as the
    environment's response to it has none; the log-probability is the unclipped sample's."""
    from aefrl.actor_critic import imagine
    from aefrl.world_model.rssm import RSSMState

    torch.manual_seed(0)
    actor = Actor(4, 2, hidden=16, layers=1, dist=dist).double()
    with torch.no_grad():  # a mean of 0.9, σ ≈ 0.89: about 45 % of the samples beyond 1
        actor.net[-1].weight.zero_()
        actor.net[-1].bias[:2] = math.atanh(0.9)
    start = RSSMState(torch.zeros(256, 2, dtype=torch.float64), torch.zeros(256, 2).double())
    dyn = _RecordingDynamics()
    torch.manual_seed(1)
    states, actions, log_probs = imagine(dyn, actor, start, horizon=3)
    fed = torch.stack(dyn.actions, 1)
    assert torch.equal(actions, fed) and fed.abs().max() <= 1
    torch.manual_seed(1)  # the same draws, taken from the actor directly
    dist0 = actor(start.feat)
    raw, log_p0 = dist0.rsample_and_log_prob()
    torch.testing.assert_close(log_probs[:, 0], log_p0)
    if dist == "bounded_normal":
        inside = raw.abs() <= 1
        assert (~inside).float().mean() > 0.3
        torch.testing.assert_close(fed[:, 0], raw.clamp(-1, 1))
        # d(state)/d(mean's bias) = Σ_samples in bounds tanh'(b): the clipped ones give none
        grad = torch.autograd.grad(states.h[:, 1].sum(), actor.net[-1].bias)[0][:2]
        torch.testing.assert_close(grad, inside.sum(0).double() * (1 - 0.9**2))
    else:
        torch.testing.assert_close(fed[:, 0], raw)


def test_actor_refuses_an_unknown_distribution():
    with pytest.raises(ValueError, match="dist must be one of"):
        Actor(6, 3, dist="beta")


def test_frozen_passes_gradients_through_but_not_into_the_module():
    model, head = MLP(3, 3, 8, 1), torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)
    with frozen(model):
        head(model(x)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert head.weight.grad is not None
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("dist", ["tanh_normal", "bounded_normal"])
def test_sample_from_noise_is_the_rsample_of_that_draw(dist):
    """Given the standard-normal draw ``rsample`` would take, ``sample_from_noise`` returns the
    same action, log-density and gradients (float64; means far in tanh's tail included, where
    scoring a tanh-normal by inverting the action would be wrong)."""
    from aefrl.actor_critic import sample_from_noise

    torch.manual_seed(0)
    actor = Actor(4, 3, hidden=16, layers=1, dist=dist).double()
    feat = torch.randn(64, 4, dtype=torch.float64)
    with torch.no_grad():
        actor.net[-1].bias[:3] = torch.tensor([0.0, 8.0, -12.0])
    torch.manual_seed(1)
    want, want_lp = actor(feat).rsample_and_log_prob()
    torch.manual_seed(1)
    noise = torch.randn(64, 3, dtype=torch.float64)
    got, got_lp = sample_from_noise(actor(feat), noise)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-12, atol=1e-10)
    params = list(actor.parameters())
    g_want = torch.autograd.grad((want.sum() + want_lp.sum()), params)
    g_got = torch.autograd.grad((got.sum() + got_lp.sum()), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"noise must have the sample's shape \(64, 3\)"):
        sample_from_noise(actor(feat), noise[:, :2])
    if dist == "tanh_normal":  # draws deep in tanh's tails, against the density written out
        far = torch.tensor([40.0, -40.0, 30.0], dtype=torch.float64).expand(64, 3)
        d = actor(feat)
        pre = d.base_dist.mean + d.base_dist.stddev * far
        gauss = torch.distributions.Normal(d.base_dist.mean, d.base_dist.stddev)
        # log(1 − tanh²(x)) = 2·(log 2 − x − softplus(−2x)), exact where 1 − tanh² underflows
        log_jac = 2 * (math.log(2.0) - pre - torch.nn.functional.softplus(-2 * pre))
        want_far = (gauss.log_prob(pre) - log_jac).sum(-1)
        assert pre.abs().max() > 15  # where scoring by inverting the action is far off
        torch.testing.assert_close(sample_from_noise(d, far)[1], want_far, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dist", ["tanh_normal", "bounded_normal"])
def test_actor_act_takes_its_noise_as_an_argument(dist):
    """With its draw given, exploring is deterministic whatever the global RNG does, and the
    action is that draw's sample, clipped; the mode ignores the noise."""
    from aefrl.actor_critic import sample_from_noise

    torch.manual_seed(0)
    actor = Actor(4, 2, hidden=16, layers=1, dist=dist)
    feat, noise = torch.randn(32, 4), 2 * torch.randn(32, 2)
    torch.manual_seed(1)
    a1 = actor.act(feat, explore=True, noise=noise)
    torch.manual_seed(2)
    a2 = actor.act(feat, explore=True, noise=noise)
    assert torch.equal(a1, a2)
    want = sample_from_noise(actor(feat), noise)[0].clamp(-1, 1)
    torch.testing.assert_close(a1, want, rtol=0, atol=0)
    assert not torch.equal(a1, actor.act(feat, explore=True, noise=-noise))
    assert torch.equal(actor.act(feat, explore=False, noise=noise), actor.act(feat, explore=False))


def test_imagine_with_given_noise_repeats_imagine_on_the_same_draws():
    """``imagine(noise=...)`` draws nothing: it equals the sampling rollout whose RNG produced
    the same draws, in the order the rollout takes them (an action, then a prior state, per
    step), and a second call with other global RNG state gives the same result."""
    from aefrl.actor_critic import imagine
    from tests.world_model.conftest import ACTIONS, tiny_world_model

    torch.manual_seed(0)
    wm = tiny_world_model("aef", torch.float64)
    actor = Actor(8 + 3, ACTIONS, hidden=16, layers=1).double()
    start = wm.rssm.initial(5)
    start = type(start)(torch.randn_like(start.h), torch.randn_like(start.z))
    horizon = 4
    torch.manual_seed(3)
    want = imagine(wm.rssm, actor, start, horizon)
    torch.manual_seed(3)
    a_noise = torch.empty(5, horizon, ACTIONS, dtype=torch.float64)
    z_noise = torch.empty(5, horizon, 3, dtype=torch.float64)
    for k in range(horizon):
        a_noise[:, k] = torch.randn(5, ACTIONS, dtype=torch.float64)
        z_noise[:, k] = torch.randn(5, 3, dtype=torch.float64)
    for seed in (7, 8):
        torch.manual_seed(seed)
        got = imagine(wm.rssm, actor, start, horizon, noise=(a_noise, z_noise))
        torch.testing.assert_close(got[0].h, want[0].h, rtol=0, atol=1e-12)
        torch.testing.assert_close(got[0].z, want[0].z, rtol=0, atol=1e-12)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-12)
    # A state draw of one dimension broadcast silently; a longer one was cut without a word.
    for bad in ((a_noise, z_noise[..., :1]), (a_noise[:, :3], z_noise[:, :3])):
        with pytest.raises(ValueError, match=r"noise must be shaped \(\(5, 4, 2\), \(5, 4, 3\)\)"):
            imagine(wm.rssm, actor, start, horizon, noise=bad)
