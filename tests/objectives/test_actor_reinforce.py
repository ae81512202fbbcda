"""``DreamerActorLoss(gradient="reinforce")``: the score-function actor gradient of the current
DreamerV3 code, against a re-computation from the densities written out by hand, and against
dynamics backprop, whose gradient it must equal in expectation."""

import math

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from aefrl import keys
from aefrl.actor_critic import Actor, Critic, ReturnNormalizer, SlowCopy
from aefrl.objectives import DreamerActorLoss
from aefrl.world_model import RSSMState
from tests.objectives.test_actor_value_loss import ETA, GAMMA, HORIZON, LMBDA, N, _setup
from tests.world_model.conftest import ACTIONS, tiny_world_model


def _policy(actor, feat, noise):
    """The actor's sample ``a [.., A]`` for ``noise``, ``log π(a)`` through the sample (the
    pathwise entropy estimate's) and ``log π(sg a)`` (the score's), from the densities
    written out: tanh-normal ``a = tanh(u)``, ``u ~ N(5 tanh(μ/5), σ²)``, ``log π(a) = log N(u)
    − Σ log(1 − tanh² u)``; bounded normal ``a ~ N(tanh μ, σ²)``."""
    loc, raw = actor.net(feat).chunk(2, -1)
    std = actor.min_std + (actor.max_std - actor.min_std) * torch.sigmoid(raw + 2.0)

    def log_normal(x, mean):
        return (-((x - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    if actor.dist == "bounded_normal":
        mean = torch.tanh(loc)
        a = mean + std * noise
        return a, log_normal(a, mean), log_normal(a.detach(), mean)
    mean = 5.0 * torch.tanh(loc / 5.0)
    u = mean + std * noise

    def log_jacobian(x):  # log(1 − tanh² x), in a form that stays finite in tanh's tails
        return (2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))).sum(-1)

    lp = log_normal(u, mean) - log_jacobian(u)
    score = log_normal(u.detach(), mean) - log_jacobian(u.detach())
    return torch.tanh(u), lp, score


def _reference(wm, actor, slow, start, a_noise, z_noise, bootstrap_net):
    """−mean_k w_k · (sg(A_k) log π(sg a_k | s_k) + η H_k) written from the spec, with
    ``A_k = (R^λ_k − v(s_k)) / max(1, S)`` against the bootstrap critic ``bootstrap_net``."""
    state = RSSMState(start[keys.BELIEF], start[keys.STATE])
    feats, lps, scores = [state.feat], [], []
    for k in range(HORIZON):
        a, lp, score = _policy(actor, state.feat.detach(), a_noise[:, k])
        if actor.dist == "bounded_normal":
            a = a.clamp(-1.0, 1.0)
        with torch.no_grad():
            state = wm.rssm.img_step(state, a.detach(), z_noise[:, k])
        feats.append(state.feat)
        lps.append(lp)
        scores.append(score)
    with torch.no_grad():
        feat = torch.stack(feats, 1)
        reward = wm.reward_head(feat[:, 1:]).mean
        cont = wm.continue_head(feat[:, 1:]).mean
        value = bootstrap_net(feat).mean  # v(s_0) .. v(s_H)
        returns = torch.zeros_like(reward)
        nxt = value[:, HORIZON]
        for k in reversed(range(HORIZON)):
            disc = GAMMA * cont[:, k]
            tail = (
                value[:, k + 1] if k == HORIZON - 1 else (1 - LMBDA) * value[:, k + 1] + LMBDA * nxt
            )
            returns[:, k] = reward[:, k] + disc * tail
            nxt = returns[:, k]
        weights = [1.0 - start[keys.TERMINATED].squeeze(-1).double()]
        for k in range(1, HORIZON):
            weights.append(weights[-1] * GAMMA * cont[:, k - 1])
        weight = torch.stack(weights, 1)
        flat = returns.flatten()
        spread = torch.quantile(flat, 0.95) - torch.quantile(flat, 0.05)
        advantage = (returns - value[:, :-1]) / spread.clamp_min(1.0)
    objective = advantage * torch.stack(scores, 1) - ETA * torch.stack(lps, 1)
    return -(weight * objective).mean(), returns, advantage, spread


@pytest.mark.parametrize(
    ("actor_dist", "bootstrap"),
    [("tanh_normal", "slow"), ("bounded_normal", "slow"), ("tanh_normal", "fast")],
)
def test_reinforce_matches_the_spec_in_value_and_gradient(actor_dist, bootstrap):
    wm, actor, critic, slow, start = _setup(actor_dist)
    loss = DreamerActorLoss(
        wm, actor, slow, ReturnNormalizer(), horizon=HORIZON, gamma=GAMMA, lmbda=LMBDA,
        entropy_coef=ETA, bootstrap=bootstrap, critic=critic, gradient="reinforce",
    )  # fmt: skip
    torch.manual_seed(3)
    out = loss(start)
    out["loss_actor"].backward()
    # Nothing is differentiated through the world model or the critics.
    assert all(p.grad is None for p in [*wm.parameters(), *slow.parameters(), *critic.parameters()])
    got = [p.grad.clone() for p in actor.parameters()]

    torch.manual_seed(3)  # the loss draws the actions' noise first, then the prior states'
    a_noise = torch.empty(N, HORIZON, ACTIONS, dtype=torch.float64).normal_()
    z_noise = torch.empty(N, HORIZON, 3, dtype=torch.float64).normal_()
    net = critic if bootstrap == "fast" else slow
    want_loss, returns, advantage, spread = _reference(
        wm, actor, slow, start, a_noise, z_noise, net
    )
    assert spread > 1.5 and advantage.abs().max() > 0.1  # normalised by S; not all zero
    torch.testing.assert_close(out["loss_actor"], want_loss)
    torch.testing.assert_close(out["lambda_return"], returns)
    want = torch.autograd.grad(want_loss, list(actor.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_reinforce_and_backprop_agree_in_expectation():
    """At horizon 1 both estimate ∇ E[R^λ_0] (the baseline v(s_0) does not depend on the
    action): the means of many independent estimates must agree within their errors, and be
    far from zero, so that a wrong sign or scale of either fails."""
    torch.manual_seed(0)
    wm = tiny_world_model("aef", dtype=torch.float64)
    nn.init.normal_(wm.reward_head.net[-1].weight, std=0.03)
    actor = Actor(wm.feat_dim, ACTIONS, hidden=16, layers=1).double()
    nn.init.normal_(actor.net[-1].weight, std=0.3)
    critic = Critic(wm.feat_dim, hidden=16, layers=1).double()
    nn.init.normal_(critic.net[-1].weight, std=0.03)
    slow = SlowCopy(critic)
    g = torch.Generator().manual_seed(1)
    one = (torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(1, 3, generator=g))
    n = 4000  # copies of one start state per estimate
    start = TensorDict(
        {
            keys.BELIEF: one[0].expand(n, 8),
            keys.STATE: one[1].double().expand(n, 3),
            keys.TERMINATED: torch.zeros(n, 1, dtype=torch.bool),
        },
        [n],
    )
    estimates = {}
    for gradient in ("backprop", "reinforce"):
        loss = DreamerActorLoss(
            wm, actor, slow, ReturnNormalizer(), horizon=1, entropy_coef=0.0, gradient=gradient
        )
        rows = []
        for _ in range(30):
            out = loss(start)
            assert out["return_scale"] <= 1.0  # a spread below 1: both divide by 1
            grads = torch.autograd.grad(out["loss_actor"], list(actor.parameters()))
            rows.append(torch.cat([x.flatten() for x in grads]))
        estimates[gradient] = torch.stack(rows)
    mean = {k: v.mean(0) for k, v in estimates.items()}
    se2 = sum(v.var(0) / v.shape[0] for v in estimates.values())  # of the difference
    z = (mean["backprop"] - mean["reinforce"]) / se2.sqrt()
    assert z.abs().max() < 4.5, z.abs().max()
    # Near 1 per component if both are unbiased (1.8 here: the components are correlated); a
    # flipped sign of the advantage reads ~7000.
    assert (z**2).mean() < 4.0
    # The gradient itself is resolved: the same statistic against zero is large.
    signal = mean["backprop"] / (estimates["backprop"].var(0) / 30).sqrt()
    assert (signal**2).mean() > 50


def test_reinforce_refuses_the_actor_input_gradient():
    wm, actor, _, slow, _ = _setup()
    with pytest.raises(ValueError, match="gradient=reinforce does not"):
        DreamerActorLoss(
            wm, actor, slow, ReturnNormalizer(), gradient="reinforce", actor_input_grad=True
        )
    with pytest.raises(ValueError, match="gradient must be one of backprop, reinforce, got 'sgd'"):
        DreamerActorLoss(wm, actor, slow, ReturnNormalizer(), gradient="sgd")


@pytest.mark.parametrize("gradient", ["backprop", "reinforce"])
def test_each_forward_folds_its_returns_into_the_scale_once(gradient):
    """S = EMA(P95 − P5) with decay 0.99: after two forwards, lerp(S_1, S_2, 0.01) of the two
    batches' spreads; a second update per forward would move it twice."""
    wm, actor, _, slow, start = _setup()
    loss = DreamerActorLoss(
        wm, actor, slow, ReturnNormalizer(), horizon=HORIZON, gamma=GAMMA, lmbda=LMBDA,
        entropy_coef=ETA, gradient=gradient,
    )  # fmt: skip
    spreads = []
    for shift in (0.0, 2.0):  # two different batches of starts
        moved = start.clone()
        moved[keys.BELIEF] = moved[keys.BELIEF] + shift
        out = loss(moved)
        flat = out["lambda_return"].flatten()
        spreads.append(torch.quantile(flat, 0.95) - torch.quantile(flat, 0.05))
    assert not torch.isclose(spreads[0], spreads[1])
    want = torch.lerp(spreads[0], spreads[1], 0.01)
    torch.testing.assert_close(out["return_scale"].double(), want, rtol=1e-5, atol=1e-6)
