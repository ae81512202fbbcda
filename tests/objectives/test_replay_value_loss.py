"""DreamerV3's replay value loss (``agent.value_loss.repval``) against its own recursion."""

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from aefrl import keys
from aefrl.actor_critic import Critic, SlowCopy
from aefrl.objectives import ReplayValueLoss
from agents.dreamer import DreamerAgent
from tests.agents.test_dreamer import TINY
from tests.world_model.conftest import ACTIONS, OBS, random_batch

B, T, H, D, GAMMA, LMBDA, SLOW_REG = 3, 9, 8, 3, 0.9, 0.7, 0.6


def dreamerv3_lambda_return(last, term, rew, boot, disc, lam):
    """danijar/dreamerv3 (e3f0224) agent.py's ``lambda_return``, transcribed to torch: all
    ``[B, T]``; returns ``[B, T - 1]``."""
    rets = [boot[:, -1]]
    live = (1 - term.double())[:, 1:] * disc
    cont = (1 - last.double())[:, 1:] * lam
    interm = rew[:, 1:] + (1 - cont) * live * boot[:, 1:]
    for t in reversed(range(live.shape[1])):
        rets.append(interm[:, t] + live[:, t] * cont[:, t] * rets[-1])
    return torch.stack(list(reversed(rets))[:-1], 1)


def _window():
    g = torch.Generator().manual_seed(0)
    is_first = torch.zeros(B, T, 1, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[0, 4] = True  # an episode ends at row 3 of the first window
    is_first[1, 7] = True  # ... and at row 6 (G_5 bootstraps fully) of the second
    terminated = torch.zeros(B, T, 1, dtype=torch.bool)
    terminated[2, 5] = True  # a true terminal: no bootstrap after row 5
    return TensorDict(
        {
            keys.BELIEF: torch.randn(B, T, H, generator=g, dtype=torch.float64),
            keys.STATE: torch.randn(B, T, D, generator=g, dtype=torch.float64),
            keys.REWARD: torch.rand(B, T, 1, generator=g, dtype=torch.float64) * 3,
            keys.IS_FIRST: is_first,
            keys.TERMINATED: terminated,
            "imag_return": torch.randn(B, T, generator=g, dtype=torch.float64) * 5 + 10,
        },
        [B, T],
    )


def _critics():
    torch.manual_seed(1)
    critic = Critic(H + D, hidden=16, layers=1).double()
    nn.init.normal_(critic.net[-1].weight, std=1.0)
    slow = SlowCopy(critic)
    with torch.no_grad():
        for p in slow.copy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return critic, slow


def test_replay_returns_are_dreamerv3s_and_the_loss_its_weighted_two_terms():
    critic, slow = _critics()
    loss = ReplayValueLoss(critic, slow, gamma=GAMMA, lmbda=LMBDA, slow_reg=SLOW_REG)
    window = _window()
    returns, weight = loss.returns(window)
    first = window[keys.IS_FIRST][..., 0]
    last = torch.cat([first[:, 1:], torch.zeros_like(first[:, :1])], 1)  # row t ends its episode
    want = dreamerv3_lambda_return(
        last,
        window[keys.TERMINATED][..., 0],
        window[keys.REWARD][..., 0],
        window["imag_return"],
        GAMMA,
        LMBDA,
    )
    torch.testing.assert_close(returns, want)
    torch.testing.assert_close(weight, 1.0 - last[:, :-1].double())
    assert weight[0, 3] == 0 and weight[1, 6] == 0 and weight.sum() == B * (T - 1) - 2
    # Where the next row ends its episode, the return bootstraps fully: G_5 = r_6 + γ·B_6.
    r, b = window[keys.REWARD][..., 0], window["imag_return"]
    torch.testing.assert_close(returns[1, 5], r[1, 6] + GAMMA * b[1, 6])
    torch.testing.assert_close(returns[2, 4], r[2, 5])  # terminal: no bootstrap at all

    out = loss(window)
    feat = torch.cat([window[keys.BELIEF], window[keys.STATE]], -1)[:, :-1]
    dist = critic(feat)
    nll = -dist.log_prob(want) - SLOW_REG * dist.log_prob(slow(feat).mean.detach())
    torch.testing.assert_close(out["loss_repval"], (weight * nll).mean())
    torch.testing.assert_close(out["repval_return"], (weight * want).sum() / weight.sum())
    out["loss_repval"].backward()
    assert all(p.grad is not None for p in critic.parameters())
    assert all(p.grad is None for p in slow.copy.parameters())


@pytest.mark.parametrize("state_grad", [False, True])
def test_state_grad_sends_the_replay_losss_gradient_into_belief_and_state(state_grad):
    """``state_grad``: the loss's gradient with respect to the window's ``belief`` and
    ``state`` is that of the loss written out (the slow critic's target a constant); without
    it neither gets one."""
    critic, slow = _critics()
    loss = ReplayValueLoss(
        critic, slow, gamma=GAMMA, lmbda=LMBDA, slow_reg=SLOW_REG, state_grad=state_grad
    )
    window = _window()
    belief = window[keys.BELIEF].clone().requires_grad_()
    state = window[keys.STATE].clone().requires_grad_()
    window[keys.BELIEF], window[keys.STATE] = belief, state
    out = loss(window)["loss_repval"]
    if not state_grad:
        assert torch.autograd.grad(out, [belief, state], allow_unused=True) == (None, None)
        return
    got = torch.autograd.grad(out, [belief, state])
    returns, weight = loss.returns(window)
    b, s = (x.detach().clone().requires_grad_() for x in (belief, state))
    feat = torch.cat([b, s], -1)[:, :-1]
    dist = critic(feat)
    target = slow(feat.detach()).mean
    nll = -dist.log_prob(returns) - SLOW_REG * dist.log_prob(target)
    want = torch.autograd.grad((weight * nll).mean(), [b, s])
    for g, w, name in zip(got, want, ("belief", "state")):
        torch.testing.assert_close(g, w, msg=name)
        assert torch.equal(g[:, :-1].abs().sum(-1) > 0, weight > 0), name  # weighted rows
        assert not g[:, -1].any(), name  # the last row only bootstraps


def _agent(repval, repval_grad=False, kind="aef"):
    torch.manual_seed(0)
    value_loss = {"repval": repval, "repval_grad": repval_grad}
    world_model = {**TINY["world_model"], "obs_model": kind}
    big = {"model": 1e9, "actor": 1e9, "critic": 1e9}  # no clipping: the gradients as computed
    return DreamerAgent(
        OBS,
        ACTIONS,
        **{**TINY, "world_model": world_model},
        value_loss=value_loss,
        grad_clip=big,
    )


def test_repval_changes_the_critics_update_only():
    """The same agent and batch with repval 0 and 0.3: the world model and actor take the same
    step (the replay loss reaches the critic, and its slow copy, alone), the critic's gradient
    differs, and the critic's norm in the metrics is that of the summed loss."""
    batch = random_batch(3, 8, first_at=(0, 5))
    agents = {r: _agent(r) for r in (0.0, 0.3)}
    metrics = {}
    for r, agent in agents.items():
        torch.manual_seed(5)
        metrics[r] = agent.train_step(batch.clone())
    assert "loss_repval" in metrics[0.3] and "loss_repval" not in metrics[0.0]
    assert torch.isfinite(metrics[0.3]["loss_repval"])
    plain, rep = (dict(agents[r].named_parameters()) for r in (0.0, 0.3))
    critic = [n for n in plain if n.startswith("critic.")]
    for name in (n for n in plain if not n.startswith(("critic.", "slow_critic."))):
        assert torch.equal(plain[name], rep[name]), name
    # Adam's first step is lr·sign(g), so the gradients are compared (the zero-initialised
    # output layer leaves the hidden layers' first ones at zero either way).
    assert any(not torch.equal(plain[n].grad, rep[n].grad) for n in critic)
    assert metrics[0.3]["grad_norm_critic"] != metrics[0.0]["grad_norm_critic"]


def test_a_negative_repval_is_refused():
    with pytest.raises(ValueError, match=r"repval must be >= 0, got -0\.1"):
        _agent(-0.1)


def _frozen_steps(agent):
    """Optimiser steps that change nothing: every loss of an update then sees the parameters
    the update started from, and each parameter's ``.grad`` is left as computed."""
    for opt in agent.optimizers.values():
        opt.step = lambda *args, **kwargs: None


@pytest.mark.parametrize("kind", ["aef", "vae"])
def test_repval_grad_adds_the_replay_losss_gradient_to_the_world_models(kind):
    """With the steps frozen, repval_grad's world-model gradient less plain repval's is
    repval times the replay loss's gradient through the posteriors, computed here on its own
    (the same draws: the update's noise comes from the same seed in the same order); actor and
    critic gradients do not change."""
    batch = random_batch(3, 8, first_at=(0, 5))
    agents = {g: _agent(0.3, g, kind) for g in (False, True)}
    fresh = _agent(0.3, True, kind)  # the same agent, whose slow critic no update has moved
    for agent in (*agents.values(), fresh):
        _frozen_steps(agent)
        # The critic's zero-initialised output layer (DreamerV3's) has no input gradient yet.
        out = agent.critic.net[-1].weight
        with torch.no_grad():
            out.copy_(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
    for agent in agents.values():
        torch.manual_seed(5)
        agent.train_step(batch.clone())
    plain, joint = (dict(agents[g].named_parameters()) for g in (False, True))
    for name in (n for n in plain if n.startswith(("actor.", "critic."))):
        torch.testing.assert_close(joint[name].grad, plain[name].grad, msg=name)

    agent = fresh  # the replay loss on its own, from the parameters both started from
    torch.manual_seed(5)
    wm_out = agent.wm_loss(batch.clone())
    h, z = wm_out[keys.BELIEF], wm_out[keys.STATE]
    assert h.requires_grad and z.requires_grad
    start = TensorDict(
        {
            keys.BELIEF: h.detach().flatten(0, 1),
            keys.STATE: z.detach().flatten(0, 1),
            keys.TERMINATED: batch[keys.TERMINATED].flatten(0, 1),
        },
        [],
    )
    boot = agent.actor_loss(start)["lambda_return"][:, 0].reshape(batch.shape)
    replay = batch.select(keys.REWARD, keys.IS_FIRST, keys.TERMINATED)
    replay.update({keys.BELIEF: h, keys.STATE: z, "imag_return": boot})
    loss = 0.3 * agent.replay_value_loss(replay)["loss_repval"]
    names = [n for n in plain if n.startswith("world_model.")]
    params = dict(fresh.named_parameters())
    want = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    reached = 0
    for name, g in zip(names, want):
        g = torch.zeros_like(params[name]) if g is None else g
        reached += bool(g.abs().max() > 0)
        diff = joint[name].grad - plain[name].grad
        scale = plain[name].grad.abs().max().item() + g.abs().max().item()
        torch.testing.assert_close(
            diff, g, rtol=1e-3, atol=1e-5 * scale + 1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )
    # The encoder, the RSSM and the posterior all feed the replayed states.
    assert any(n.startswith("world_model.rssm.gru") for n, g in zip(names, want) if g is not None)
    assert reached > len(names) // 3


def test_repval_grad_imagines_with_the_world_model_before_its_step():
    """DreamerV3 computes every loss from one set of parameters: with repval_grad the world
    model steps after the actor's loss, which then imagines with the model the update started
    from; without it, with the model after its step."""
    batch = random_batch(3, 8, first_at=(0, 5))
    for grad in (False, True):
        agent = _agent(0.3, grad)
        weight = agent.world_model.rssm.gru.weight_hh
        before, seen = weight.detach().clone(), []
        agent.actor_loss.register_forward_pre_hook(
            lambda module, args, weight=weight, seen=seen: seen.append(weight.detach().clone())
        )
        torch.manual_seed(5)
        agent.train_step(batch.clone())
        assert torch.equal(seen[0], before) == grad
        assert not torch.equal(weight, before)  # the world model did step


def test_repval_grad_reports_both_norms_and_keeps_the_contexts_detached():
    batch = random_batch(3, 8, first_at=(0, 5))
    b, t = batch.shape
    agent = _agent(0.3, True)
    agent.replay_context = True
    batch[keys.CONTEXT_BELIEF] = torch.randn(b, t, agent.world_model.rssm.deter)
    batch[keys.CONTEXT_STATE] = torch.randn(b, t, agent.world_model.rssm.latent_dim)
    torch.manual_seed(5)
    metrics = agent.train_step(batch)
    for name in ("model", "actor", "critic"):
        assert torch.isfinite(metrics[f"grad_norm_{name}"]) and metrics[f"grad_norm_{name}"] > 0
    assert not metrics[keys.CONTEXT_BELIEF].requires_grad
    assert not metrics[keys.CONTEXT_STATE].requires_grad
    assert all(not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize(
    ("repval", "repval_grad", "message"),
    [
        (0.0, True, "repval_grad=true trains the world model .* which repval=0 turns off"),
        (0.3, 1, "repval_grad must be true or false, got 1"),
    ],
)
def test_bad_repval_grad_settings_are_refused(repval, repval_grad, message):
    with pytest.raises(ValueError, match=message):
        _agent(repval, repval_grad)


def test_a_world_model_loss_is_stepped_by_the_actor_critic_half_only_with_repval_grad():
    """train_actor_critic steps a given model_loss with repval_grad only (the world model
    would otherwise silently never step on it), and repval_grad needs both."""
    batch = random_batch(3, 8, first_at=(0, 5))
    for grad in (False, True):
        agent = _agent(0.3, grad)
        wm_out = agent.wm_loss(batch)
        start = TensorDict(
            {
                keys.BELIEF: wm_out[keys.BELIEF].detach().flatten(0, 1),
                keys.STATE: wm_out[keys.STATE].detach().flatten(0, 1),
                keys.TERMINATED: batch[keys.TERMINATED].flatten(0, 1),
            },
            [],
        )
        model_loss = None if grad else agent.wm_loss.total(wm_out)
        message = "needs the world model's loss" if grad else "with repval_grad only"
        with pytest.raises(ValueError, match=message):
            agent.train_actor_critic(start, None, model_loss)
