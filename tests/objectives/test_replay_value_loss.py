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


def _agent(repval):
    torch.manual_seed(0)
    value_loss = {"repval": repval}
    return DreamerAgent(OBS, ACTIONS, **TINY, value_loss=value_loss)


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
