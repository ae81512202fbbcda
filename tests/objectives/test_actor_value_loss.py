"""Actor and critic losses in imagination against an independent re-computation (SPEC §7)."""

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from aefrl import keys
from aefrl.actor_critic import Actor, Critic, ReturnNormalizer, SlowCopy
from aefrl.objectives import DreamerActorLoss, DreamerValueLoss
from aefrl.world_model import RSSMState
from tests.world_model.conftest import ACTIONS, tiny_world_model

N, HORIZON, GAMMA, LMBDA, ETA = 5, 4, 0.9, 0.7, 0.05


def _setup(actor_dist="tanh_normal"):
    torch.manual_seed(0)
    wm = tiny_world_model("aef", dtype=torch.float64)
    # Non-zero heads: rewards of a few units (a return spread > 1, so normalisation acts) and
    # continue probabilities away from 0 and 1 (so the weights and discounts matter).
    nn.init.normal_(wm.reward_head.net[-1].weight, std=1.0)
    nn.init.normal_(wm.continue_head.net[-1].weight, std=1.0)
    actor = Actor(wm.feat_dim, ACTIONS, hidden=16, layers=1, dist=actor_dist).double()
    nn.init.normal_(actor.net[-1].weight, std=1.0)  # some actions at the bounds
    critic = Critic(wm.feat_dim, hidden=16, layers=1).double()
    nn.init.normal_(critic.net[-1].weight, std=1.0)
    slow = SlowCopy(critic)
    with torch.no_grad():  # the slow critic differs from the critic (its EMA lags behind)
        for p in slow.copy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    g = torch.Generator().manual_seed(1)
    start = TensorDict(
        {
            keys.BELIEF: torch.randn(N, 8, generator=g, dtype=torch.float64),
            keys.STATE: torch.randn(N, 3, generator=g, dtype=torch.float64),
            keys.TERMINATED: torch.tensor([[False], [True], [False], [False], [True]]),
        },
        [N],
    )
    return wm, actor, critic, slow, start


def _reference(wm, actor, slow, start, bootstrap_net=None, input_grad=False):
    """The actor objective written from the spec, step by step, without the library helpers;
    the λ-returns bootstrap from ``bootstrap_net`` (default: the slow critic); the actor acts
    on sg(s_k) (DreamerV1-V3) unless ``input_grad``; a bounded normal's action reaches the
    dynamics clipped to [-1, 1], as the environment executes it."""
    state = RSSMState(start[keys.BELIEF], start[keys.STATE])
    feats, log_probs, actions = [state.feat], [], []
    for _ in range(HORIZON):
        policy_input = state.feat if input_grad else state.feat.detach()
        action, log_prob = actor(policy_input).rsample_and_log_prob()
        if actor.dist == "bounded_normal":  # executed, stored and imagined clipped
            action = action.clamp(-1.0, 1.0)
        state = wm.rssm.img_step(state, action)
        feats.append(state.feat)
        log_probs.append(log_prob)
        actions.append(action)
    feat = torch.stack(feats, 1)  # s_0 .. s_H
    reward = wm.reward_head(feat[:, 1:]).mean  # r(s_{k+1})
    cont = wm.continue_head(feat[:, 1:]).mean
    value = (bootstrap_net or slow)(feat).mean  # v(s_0) .. v(s_H)
    # R_k = r_k + γ c_k ((1 − λ) v(s_{k+1}) + λ R_{k+1}),  R_{H-1} = r + γ c v(s_H)
    returns = [None] * HORIZON
    nxt = value[:, HORIZON]
    for k in reversed(range(HORIZON)):
        disc = GAMMA * cont[:, k]
        if k == HORIZON - 1:
            returns[k] = reward[:, k] + disc * value[:, k + 1]
        else:
            returns[k] = reward[:, k] + disc * ((1 - LMBDA) * value[:, k + 1] + LMBDA * nxt)
        nxt = returns[k]
    returns = torch.stack(returns, 1)
    # w_0 = 1 − terminated(start), w_k = w_{k-1} · γ c_{k-1}
    weights = [1.0 - start[keys.TERMINATED].squeeze(-1).double()]
    for k in range(1, HORIZON):
        weights.append(weights[-1] * GAMMA * cont[:, k - 1])
    weight = torch.stack(weights, 1).detach()
    flat = returns.detach().flatten()
    spread = torch.quantile(flat, 0.95) - torch.quantile(flat, 0.05)
    entropy = -torch.stack(log_probs, 1)
    objective = returns / spread.clamp_min(1.0) + ETA * entropy
    saturation = (torch.stack(actions, 1).abs() > 0.99).double().mean()
    slow_value = slow(feat).mean[:, :-1]
    return -(weight * objective).mean(), returns, weight, slow_value, spread, feat, saturation


@pytest.mark.parametrize(
    ("actor_dist", "bootstrap", "input_grad"),
    [
        ("tanh_normal", "slow", False),
        ("bounded_normal", "slow", False),
        ("tanh_normal", "fast", False),
        ("tanh_normal", "slow", True),
        ("bounded_normal", "fast", True),
    ],
)
def test_actor_loss_matches_the_spec_in_value_and_gradient(actor_dist, bootstrap, input_grad):
    wm, actor, critic, slow, start = _setup(actor_dist)
    loss = DreamerActorLoss(
        wm, actor, slow, ReturnNormalizer(), horizon=HORIZON, gamma=GAMMA, lmbda=LMBDA,
        entropy_coef=ETA, bootstrap=bootstrap, critic=critic, actor_input_grad=input_grad,
    )  # fmt: skip
    torch.manual_seed(3)
    out = loss(start)
    actor_params = list(actor.parameters())
    out["loss_actor"].backward()
    got = [p.grad for p in actor_params]
    # Dynamics backprop through a frozen world model and critics: they get no gradient.
    frozen = [*wm.parameters(), *slow.parameters(), *critic.parameters()]
    assert all(p.grad is None for p in frozen)

    torch.manual_seed(3)  # the same action and prior noise
    net = critic if bootstrap == "fast" else slow
    want_loss, returns, weight, slow_value, spread, feat, saturation = _reference(
        wm, actor, slow, start, net, input_grad
    )
    assert spread > 1.5  # the normalisation divides by the spread here, not by 1
    assert weight[1].abs().sum() == 0 and weight[0, -1] < weight[0, 0]
    torch.testing.assert_close(out["loss_actor"], want_loss)
    torch.testing.assert_close(out["lambda_return"], returns.detach())
    torch.testing.assert_close(out["weight"], weight)
    torch.testing.assert_close(out["slow_value"], slow_value.detach())
    torch.testing.assert_close(out["return_scale"], spread.to(out["return_scale"].dtype))
    torch.testing.assert_close(out[keys.BELIEF], feat[..., :8].detach())
    torch.testing.assert_close(out[keys.STATE], feat[..., 8:].detach())
    assert 0 < saturation < 1  # some actions at the bounds, not all
    torch.testing.assert_close(out["action_saturation"], saturation.float())
    want = torch.autograd.grad(want_loss, actor_params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bootstrap", ["slow", "fast"])
def test_actor_loss_diagnostics_are_the_means_they_name(bootstrap):
    """``actor_entropy``, ``imag_reward``, ``imag_value`` and ``imag_return`` against the
    entropy, rewards, slow-critic values and λ-returns of the same imagination (seed 3),
    recomputed step by step: each a mean over ``[N, K]``. Fails if one logs a max, or the value
    logs the returns."""
    wm, actor, critic, slow, start = _setup()
    loss = DreamerActorLoss(
        wm, actor, slow, ReturnNormalizer(), horizon=HORIZON, gamma=GAMMA, lmbda=LMBDA,
        entropy_coef=ETA, bootstrap=bootstrap, critic=critic,
    )  # fmt: skip
    torch.manual_seed(3)
    out = loss(start)
    torch.manual_seed(3)  # the same action and prior noise
    state = RSSMState(start[keys.BELIEF], start[keys.STATE])
    feats, log_probs = [state.feat], []
    with torch.no_grad():
        for _ in range(HORIZON):
            action, log_prob = actor(state.feat).rsample_and_log_prob()
            state = wm.rssm.img_step(state, action)
            feats.append(state.feat)
            log_probs.append(log_prob)
        feat = torch.stack(feats, 1)
        entropy = -torch.stack(log_probs, 1)  # [N, K]
        reward = wm.reward_head(feat[:, 1:]).mean  # r(s_1) .. r(s_K)
        value = slow(feat[:, :-1]).mean  # the slow critic at s_0 .. s_{K-1}
    torch.manual_seed(3)
    returns = _reference(wm, actor, slow, start, critic if bootstrap == "fast" else slow)[1]
    for x in (entropy, reward, value):  # a max would differ from the mean
        assert x.max() > x.mean() + 0.1
    torch.testing.assert_close(out["actor_entropy"], entropy.mean())
    torch.testing.assert_close(out["imag_reward"], reward.mean())
    torch.testing.assert_close(out["imag_value"], value.mean())
    assert not torch.isclose(value.mean(), returns.mean())
    torch.testing.assert_close(out["imag_return"], returns.detach().mean())


def test_fast_and_slow_bootstraps_differ_and_checkpoints_do_not():
    """The two bootstraps give different returns here (the critics differ), and the loss's
    state_dict is the same either way (the agent saves the critic, not the loss)."""
    wm, actor, critic, slow, start = _setup()
    outs, states = [], []
    for bootstrap in ("slow", "fast"):
        loss = DreamerActorLoss(
            wm, actor, slow, ReturnNormalizer(), horizon=HORIZON, bootstrap=bootstrap,
            critic=critic,
        )  # fmt: skip
        torch.manual_seed(3)
        outs.append(loss(start))
        states.append(set(loss.state_dict()))
    assert (outs[0]["lambda_return"] - outs[1]["lambda_return"]).abs().max() > 0.1
    torch.testing.assert_close(outs[0]["slow_value"], outs[1]["slow_value"])
    assert states[0] == states[1]


def test_the_actor_input_gradient_changes_the_gradient_only():
    """With the actor's input in the graph the loss and returns are the same numbers but the
    actor's gradient differs: later actions feed back on earlier ones and the entropy bonus
    acts through the states. With the returns' share set to zero (a zero reward head and slow
    critic), what is left of the default's gradient is the entropy bonus of π at fixed states,
    recomputed here from the imagined states alone."""
    wm, actor, _, slow, start = _setup()
    outs, grads = [], []
    for input_grad in (False, True):
        loss = DreamerActorLoss(
            wm, actor, slow, ReturnNormalizer(), horizon=HORIZON, gamma=GAMMA, lmbda=LMBDA,
            entropy_coef=ETA, actor_input_grad=input_grad,
        )  # fmt: skip
        torch.manual_seed(3)
        outs.append(loss(start))
        grads.append(torch.autograd.grad(outs[-1]["loss_actor"], list(actor.parameters())))
    torch.testing.assert_close(outs[0]["loss_actor"], outs[1]["loss_actor"])
    torch.testing.assert_close(outs[0]["lambda_return"], outs[1]["lambda_return"])
    assert max((a - b).abs().max() for a, b in zip(*grads)) > 1e-3

    with torch.no_grad():  # uniform two-hot logits: symmetric bins, mean symexp(0) = 0
        for layer in (wm.reward_head.net[-1], slow.copy.net[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
    loss = DreamerActorLoss(
        wm, actor, slow, ReturnNormalizer(), horizon=HORIZON, gamma=GAMMA, lmbda=LMBDA,
        entropy_coef=ETA,
    )  # fmt: skip
    torch.manual_seed(3)
    out = loss(start)
    assert out["lambda_return"].abs().max() < 1e-9  # only the entropy bonus is left
    got = torch.autograd.grad(out["loss_actor"], list(actor.parameters()))
    # The same action noise on the imagined states, as constants: −mean_k w_k η H_k.
    feat = torch.cat([out[keys.BELIEF], out[keys.STATE]], -1)[:, :-1]  # s_0 .. s_{H-1}
    torch.manual_seed(3)
    log_probs = []
    for k in range(HORIZON):
        _, log_prob = actor(feat[:, k]).rsample_and_log_prob()
        wm.rssm.img_step(RSSMState(feat[:, k, :8], feat[:, k, 8:]), torch.zeros(N, ACTIONS))
        log_probs.append(log_prob)
    want_loss = -(out["weight"] * ETA * -torch.stack(log_probs, 1)).mean()
    want = torch.autograd.grad(want_loss, list(actor.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bootstrap": "target"}, "bootstrap must be one of slow, fast, got 'target'"),
        ({"actor_input_grad": "no"}, "actor_input_grad must be true or false, got 'no'"),
        ({"bootstrap": "fast"}, 'bootstrap="fast" needs the critic'),
    ],
)
def test_actor_loss_refuses_a_bad_bootstrap(kwargs, message):
    wm, actor, _, slow, _ = _setup()
    with pytest.raises(ValueError, match=message):
        DreamerActorLoss(wm, actor, slow, ReturnNormalizer(), **kwargs)


def test_value_loss_matches_the_spec_in_value_and_gradient():
    wm, actor, critic, slow, start = _setup()
    actor_loss = DreamerActorLoss(
        wm, actor, slow, ReturnNormalizer(), horizon=HORIZON, gamma=GAMMA, lmbda=LMBDA
    )
    torch.manual_seed(3)
    traj = actor_loss(start)
    value_loss = DreamerValueLoss(critic, slow_reg=0.3)
    out = value_loss(traj)
    params = list(critic.parameters())
    out["loss_value"].backward()
    got = [p.grad.clone() for p in params]

    # States s_0 .. s_{H-1} (where each return starts), detached from imagination.
    feat = torch.cat([traj[keys.BELIEF], traj[keys.STATE]], -1)[:, :HORIZON]
    dist = critic(feat)
    nll = -dist.log_prob(traj["lambda_return"]) - 0.3 * dist.log_prob(traj["slow_value"])
    want_loss = (traj["weight"] * nll).mean()
    torch.testing.assert_close(out["loss_value"], want_loss)
    torch.testing.assert_close(
        out["value_mae"], (dist.mean - traj["lambda_return"]).abs().mean().detach()
    )
    want = torch.autograd.grad(want_loss, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # The critic learns from fixed targets: nothing reaches the actor or the world model.
    assert all(p.grad is None for p in [*actor.parameters(), *wm.parameters()])


def test_make_value_estimator_sets_the_returns_gamma_and_lambda():
    """torchrl's API for a loss's value estimator: here it sets the TD(λ) returns' γ and λ
    (it raised NotImplementedError); other estimators and arguments are refused."""
    from torchrl.objectives.utils import ValueEstimators

    wm, actor, critic, slow, start = _setup()
    loss = DreamerActorLoss(
        wm, actor, slow, ReturnNormalizer(), horizon=HORIZON, gamma=0.5, lmbda=0.2,
        entropy_coef=ETA,
    )  # fmt: skip
    assert loss.make_value_estimator(ValueEstimators.TDLambda, gamma=GAMMA, lmbda=LMBDA) is loss
    assert loss.value_type == ValueEstimators.TDLambda
    torch.manual_seed(3)
    out = loss(start)
    torch.manual_seed(3)
    want_loss, returns, *_ = _reference(wm, actor, slow, start)  # at GAMMA and LMBDA
    torch.testing.assert_close(out["lambda_return"], returns.detach())
    torch.testing.assert_close(out["loss_actor"], want_loss)
    loss.make_value_estimator(gamma=0.9)  # the default type; λ kept
    assert (loss.gamma, loss.lmbda) == (0.9, LMBDA)
    with pytest.raises(NotImplementedError, match="TD\\(lambda\\) returns"):
        loss.make_value_estimator(ValueEstimators.GAE)
    with pytest.raises(TypeError, match="take gamma and lmbda, not \\['value_network'\\]"):
        loss.make_value_estimator(value_network=critic)
    with pytest.raises(ValueError, match="gamma must lie in"):
        loss.make_value_estimator(gamma=1.5)
    assert loss.gamma == 0.9  # a refused call changes nothing
