"""Symlog two-hot and Bernoulli heads."""

import pytest
import torch
from torch import distributions as D

from aefrl.actor_critic import Critic
from aefrl.world_model import (
    BernoulliHead,
    TwoHot,
    TwoHotHead,
    symexp,
    symlog,
    two_hot,
    twohot_bins,
)
from tests.world_model.conftest import tiny_world_model


def test_symlog_symexp_are_inverse():
    x = torch.tensor([-1e4, -3.0, -0.1, 0.0, 0.5, 7.0, 2e3], dtype=torch.float64)
    assert torch.allclose(symexp(symlog(x)), x)
    assert torch.allclose(symlog(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 0.6931472]))


def test_two_hot_round_trip_and_clipping():
    bins = torch.linspace(-20, 20, 255, dtype=torch.float64)
    x = torch.tensor([-19.99, -3.3, 0.0, 0.01, 5.5, 19.7], dtype=torch.float64)
    w = two_hot(x, bins)
    assert torch.allclose(w.sum(-1), torch.ones(6, dtype=torch.float64))
    assert torch.allclose((w * bins).sum(-1), x)
    assert ((w > 0).sum(-1) <= 2).all()
    assert torch.allclose(
        (two_hot(torch.tensor([50.0, -50.0]).double(), bins) * bins).sum(-1),
        torch.tensor([20.0, -20.0]).double(),
    )


def test_two_hot_distribution_mean_and_log_prob():
    bins = torch.linspace(-20, 20, 255)
    target = torch.tensor([3.0, -150.0])
    logits = torch.log(two_hot(symlog(target), bins) + 1e-12)
    dist = TwoHot(logits, bins)
    assert torch.allclose(dist.mean, target, rtol=1e-4)
    # The exact two-hot target is the log-likelihood maximiser among nearby distributions.
    other = TwoHot(logits.roll(1, -1), bins)
    assert torch.all(dist.log_prob(target) > other.log_prob(target))


def test_heads_start_at_zero_and_score_like_torch():
    head = TwoHotHead(5, hidden=8, layers=1)
    assert torch.allclose(head(torch.randn(4, 5)).mean, torch.zeros(4), atol=1e-6)
    bern = BernoulliHead(5, hidden=8, layers=1)
    dist = bern(torch.randn(4, 5))
    target = torch.tensor([1.0, 0.0, 1.0, 1.0])
    expect = D.Bernoulli(logits=dist.logits).log_prob(target)
    assert torch.allclose(dist.log_prob(target), expect)
    assert torch.allclose(dist.log_prob(target.bool()), expect)


def test_reward_and_critic_bins_span_symlog_pm20_so_large_targets_are_not_clipped():
    """SPEC §7 / DreamerV3: 255 bins evenly spaced from −20 to 20 in symlog space. Fails if the
    range shrinks (e.g. ±10, which clips any |target| above symexp(10) ≈ 2.2e4) or the count or
    spacing changes, for the world model's reward head or the critic."""
    expect = [-20.0 + 40.0 * k / 254 for k in range(255)]  # written out, not torch.linspace
    reward_head = tiny_world_model("aef").reward_head
    critic = Critic(5, hidden=8, layers=1)
    targets = torch.tensor([1e6, -1e6, 3.5e7, 12345.0], dtype=torch.float64)
    assert abs(symlog(targets[:1]).item() - 13.8155) < 1e-3  # well inside ±20, outside ±10
    for head in (reward_head, critic):
        bins = head.bins.double()
        assert bins.shape == (255,)
        want = torch.tensor(expect, dtype=torch.float64)
        torch.testing.assert_close(bins, want, atol=1e-5, rtol=0)
        gaps = bins.diff()
        torch.testing.assert_close(gaps, torch.full_like(gaps, 40.0 / 254), atol=1e-5, rtol=0)
        # Encode then decode by hand: Σ_k w_k b_k back through symexp recovers the target.
        w = two_hot(symlog(targets), head.bins).double()
        decoded = torch.sign(w @ bins) * torch.expm1((w @ bins).abs())
        torch.testing.assert_close(decoded, targets, rtol=1e-4, atol=0)
        # And a head whose logits put the two-hot weights on those bins predicts the target.
        dist = TwoHot(torch.log(w.float() + 1e-30), head.bins)
        torch.testing.assert_close(dist.mean.double(), targets, rtol=1e-4, atol=0)


def test_symexp_bins_are_dreamerv3s_and_exactly_antisymmetric():
    """DreamerV3's symexp_twohot: symexp of linspace(−20, 20) for an odd count, as its code
    builds them (a negative half and its negation), so Σ p b is 0 for uniform p."""
    bins = twohot_bins(255, 20.0, "symexp").double()
    x = torch.linspace(-20, 20, 255, dtype=torch.float64)
    torch.testing.assert_close(bins, torch.sign(x) * torch.expm1(x.abs()), rtol=1e-6, atol=1e-6)
    for count in (2, 3, 4, 255, 256):
        b = twohot_bins(count, 20.0, "symexp")
        assert b.shape == (count,) and (b.diff() > 0).all()
        assert torch.equal(b, -b.flip(0))  # exact, not close
    assert twohot_bins(5, 20.0, "symexp")[2] == 0 and 0 not in twohot_bins(4, 20.0, "symexp")


def test_symexp_two_hot_mean_and_log_prob_against_float64_sums():
    torch.manual_seed(0)
    bins = twohot_bins(255, 20.0, "symexp")
    logits = 3 * torch.randn(6, 255)
    dist = TwoHot(logits, bins, "symexp")
    p = logits.double().softmax(-1)
    torch.testing.assert_close(dist.mean.double(), p @ bins.double(), rtol=1e-5, atol=1e-3)
    # log_prob: the real target split linearly between its two neighbouring real-valued bins.
    target = torch.tensor([0.3, -7.0, 80.0, 1234.5, 0.0, -2e5])
    logp = logits.double().log_softmax(-1)
    b = bins.double()
    for i, y in enumerate(target.double()):
        k = int((b <= y).sum()) - 1
        w_hi = (y - b[k]) / (b[k + 1] - b[k])
        want = (1 - w_hi) * logp[i, k] + w_hi * logp[i, k + 1]
        torch.testing.assert_close(dist.log_prob(target)[i].double(), want, rtol=1e-5, atol=1e-5)
    # Uniform probabilities (a zero-initialised head) average to exactly 0 in float32.
    head = TwoHotHead(5, hidden=8, layers=1, twohot="symexp")
    assert torch.equal(head(torch.randn(4, 5)).mean, torch.zeros(4))


def test_a_two_target_fit_averages_in_symlog_space_or_in_real_space():
    """The cross-entropy optimum over targets {0, 20} (half each) is the average two-hot
    encoding; its prediction is the targets' mean (10) for symexp bins and symexp of their
    symlogs' mean, √21 − 1 ≈ 3.58, for symlog bins (the bias towards zero the docs name)."""
    targets = torch.tensor([0.0, 20.0], dtype=torch.float64)
    for twohot, want in (("symexp", 10.0), ("symlog", 21**0.5 - 1)):
        bins = twohot_bins(255, 20.0, twohot).double()
        enc = two_hot(targets if twohot == "symexp" else symlog(targets), bins).mean(0)
        dist = TwoHot(torch.log(enc + 1e-300), bins, twohot)
        torch.testing.assert_close(dist.mean, torch.tensor(want, dtype=torch.float64))
        # and no nearby distribution scores the two targets better
        other = TwoHot(torch.log(enc.roll(1) + 1e-300), bins, twohot)
        assert dist.log_prob(targets).sum() > other.log_prob(targets).sum()


def test_a_head_refuses_the_other_forms_bins_from_a_checkpoint():
    symexp_head = TwoHotHead(5, hidden=8, layers=1, twohot="symexp")
    symlog_head = TwoHotHead(5, hidden=8, layers=1)
    own = symlog_head.bins.clone()
    with pytest.raises(RuntimeError, match="not this head's 'symlog' two-hot bins"):
        symlog_head.load_state_dict(symexp_head.state_dict())
    assert torch.equal(symlog_head.bins, own)  # refused, and not loaded either
    symexp_head.load_state_dict(TwoHotHead(5, hidden=8, layers=1, twohot="symexp").state_dict())
    with pytest.raises(ValueError, match="twohot must be one of symlog, symexp, got 'real'"):
        TwoHotHead(5, twohot="real")


def test_a_checkpoint_of_the_other_two_hot_form_is_one_sentence(tmp_path):
    """A world model whose configuration says symexp, loaded from symlog weights (an edited
    configuration): a CheckpointError naming the bins, not torch's multi-line report."""
    from aefrl.checkpoint import CheckpointError, load_checkpoint
    from aefrl.world_model.modules import world_model_from_checkpoint
    from tests.tiny_run import write_tiny_dreamer_run

    write_tiny_dreamer_run(tmp_path, time_limit=0.1)
    state = load_checkpoint(tmp_path)
    state["run_config"]["agent"]["world_model"]["reward_twohot"] = "symexp"
    with pytest.raises(CheckpointError, match=r"reward_head\.bins are not this head's 'symexp'"):
        world_model_from_checkpoint(state)
