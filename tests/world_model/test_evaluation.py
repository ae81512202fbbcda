"""Sequence likelihoods (SPEC §6) and open-loop prediction."""

import math

import pytest
import torch
from torch import distributions as D

from aefrl.metrics import sharpness_ratio
from aefrl.world_model.evaluation import (
    filtered_reward_error,
    open_loop_prediction,
    sequence_bits_per_dim,
    sequence_log_likelihood,
    tune_sequence_proposal_scale,
)
from aefrl.world_model.rssm import RSSMState
from tests.world_model.conftest import random_batch, tiny_world_model


def test_partition_sequence_likelihood_is_the_sum_of_exact_step_likelihoods():
    torch.manual_seed(0)
    wm = tiny_world_model("aef_partition", dtype=torch.float64)
    batch = random_batch(2, 5, first_at=(0, 3), dtype=torch.float64)
    torch.manual_seed(7)
    log_p, logdet = sequence_log_likelihood(wm, batch)
    torch.manual_seed(7)  # the same dequantisation noise
    filt = wm.filter(batch)
    obs = filt.observed
    om = wm.obs_model
    expect = sum(
        om.log_likelihood(filt.y[:, t], obs.state.h[:, t], wm.rssm.prior(obs.state.h[:, t]))
        for t in range(5)
    )
    assert torch.allclose(log_p, expect)
    assert torch.allclose(logdet, filt.logdet.sum(1))


def test_single_step_sequence_estimators_match_the_observation_model(kind):
    """For T = 1 the sequence estimators reduce to the observation model's, with the RSSM's
    first prior; both converge to the same log p(y) as K grows (the partition family's are
    exact and equal)."""
    torch.manual_seed(0)
    # One latent dimension and a wide proposal make K = 4096 accurate to ~0.03 nats, so a
    # wrong proposal density or a missing −log K (8.3 nats) cannot hide in Monte-Carlo noise.
    options = {"sigma_x": "fixed", "sigma_x_init": 1.0}
    wm = tiny_world_model(kind, dtype=torch.float64, latent_dim=1, obs_options=options)
    if kind == "aef":
        wm.obs_model.proposal_scale = 3.0
    batch = random_batch(3, 1, dtype=torch.float64)
    torch.manual_seed(3)
    seq, _ = sequence_log_likelihood(wm, batch, num_samples=4096)
    torch.manual_seed(3)
    y, _ = wm.encode_pixels(batch["pixels"][:, 0])
    h = wm.rssm.recurrent(wm.rssm.initial(3, dtype=torch.float64), torch.zeros(3, 2).double())
    step = wm.obs_model.log_likelihood(y, h, wm.rssm.prior(h), num_samples=4096)
    atol = 1e-9 if kind == "aef_partition" else 0.1
    torch.testing.assert_close(seq, step, atol=atol, rtol=0)


def test_importance_sampled_sequence_estimate_tightens_with_k(kind):
    torch.manual_seed(0)
    wm = tiny_world_model(kind, dtype=torch.float64)
    batch = random_batch(4, 3, dtype=torch.float64)
    estimates = []
    for k in (1, 64):
        torch.manual_seed(5)
        estimates.append(sequence_log_likelihood(wm, batch, num_samples=k)[0])
    if kind == "aef_partition":
        assert torch.equal(estimates[0], estimates[1])  # exact: K is irrelevant
    else:  # E[log of the average] grows with K (Jensen gap shrinks)
        assert estimates[1].mean() > estimates[0].mean()
    torch.manual_seed(6)
    log_p, logdet = sequence_log_likelihood(wm, batch, num_samples=2)
    torch.manual_seed(6)
    bpd = sequence_bits_per_dim(wm, batch, num_samples=2)
    dims = 3 * math.prod(batch["pixels"].shape[2:])  # T·D
    expect = (-(log_p + logdet) + dims * math.log(256)) / (dims * math.log(2))
    torch.testing.assert_close(bpd, expect)


def test_open_loop_errors_leave_out_sequences_past_an_episode_start():
    """A window that crosses into a new episode (replay windows may) is averaged in only up to
    the horizon before the new episode's first frame; no sequence left there gives NaN."""
    torch.manual_seed(0)
    wm = tiny_world_model("aef")
    batch = random_batch(3, 9)
    batch["is_first"][1, 5] = True  # horizon 2 (frame 5) of sequence 1 starts an episode
    batch["is_first"][:, 8] = True  # every sequence's last frame: nobody left at horizon 5
    batch["pixels"][1, 5:] = 128  # flat frames where no average looks: counted, they would
    batch["pixels"][:, 8] = 128  # lower the real frames' mean gradient (the sharpness below)
    torch.manual_seed(4)
    out = open_loop_prediction(wm, batch, context=3)
    err = ((out["pred"][:, 3:].double() - batch["pixels"][:, 3:].double()) / 255).square()
    per_seq = err.mean((2, 3, 4)).float()  # [B, 6]
    torch.testing.assert_close(out["mse"][:2], per_seq[:, :2].mean(0))
    torch.testing.assert_close(out["mse"][2:5], per_seq[[0, 2], 2:5].mean(0))
    assert math.isnan(out["mse"][5]) and math.isnan(out["ssim"][5])
    assert all(math.isfinite(v) for v in out["ssim"][:5])
    # The sharpness of the predicted frames counts the same frames.
    counted = torch.ones(3, 6, dtype=torch.bool)
    counted[1, 2:] = False
    counted[:, 5] = False
    frames = (
        out["pred"][:, 3:][counted].float() / 255,
        batch["pixels"][:, 3:][counted].float() / 255,
    )
    assert out["sharpness"] == pytest.approx(sharpness_ratio(*frames), rel=1e-6)
    everything = [x[:, 3:].flatten(0, 1).float() / 255 for x in (out["pred"], batch["pixels"])]
    assert sharpness_ratio(*everything) > 1.2 * out["sharpness"]


def test_open_loop_prediction_shapes_and_context(kind):
    torch.manual_seed(0)
    wm = tiny_world_model(kind)
    batch = random_batch(2, 9)
    torch.manual_seed(4)
    out = open_loop_prediction(wm, batch, context=3)
    assert out["pred"].shape == batch["pixels"].shape and out["pred"].dtype == torch.uint8
    assert torch.equal(out["real"], batch["pixels"])
    # Per-horizon errors of the predicted frames, images in [0, 1], averaged over the batch.
    err = (out["pred"][:, 3:].double() - batch["pixels"][:, 3:].double()) / 255
    torch.testing.assert_close(out["mse"], err.square().mean((0, 2, 3, 4)).float())
    assert out["ssim"].shape == (6,) and math.isfinite(float(out["ssim"].mean()))

    def predict(edit):
        moved = batch.clone()
        edit(moved)
        torch.manual_seed(4)  # the same dequantisation, posterior and prior noise
        return open_loop_prediction(wm, moved, context=3)["pred"]

    def changed(pred):
        return [not torch.equal(pred[:, t], out["pred"][:, t]) for t in range(9)]

    # Open loop: frames after the context never see their own pixels ...
    assert (
        changed(predict(lambda b: b["pixels"][:, 3:].copy_(255 - b["pixels"][:, 3:])))
        == [False] * 9
    )
    # ... but follow the last context frame and the recorded actions: a_3, stored in row 4,
    # first moves frame 4.
    assert (
        changed(predict(lambda b: b["pixels"][:, 2].copy_(255 - b["pixels"][:, 2])))[2:]
        == [True] * 7
    )
    assert changed(predict(lambda b: b["prev_action"][:, 4].mul_(-1))) == [False] * 4 + [True] * 5


def _reward_model(kind):
    """A tiny model whose reward head reads its input: the output layer starts at zero, so an
    untrained head predicts 0 everywhere and could not show a misaligned row."""
    torch.manual_seed(0)
    wm = tiny_world_model(kind)
    torch.nn.init.normal_(wm.reward_head.net[-1].weight)
    return wm


def test_open_loop_reward_errors_are_the_head_on_the_imagined_states(kind):
    """Recomputed from the pieces with the same draws: filter the context, imagine under the
    recorded actions, the reward head's mean on each imagined state against row
    ``context + k``'s reward; a window crossing into a new episode counts only before it."""
    wm = _reward_model(kind)
    batch = random_batch(3, 9)
    batch["reward"].mul_(4)  # rewards the untrained head does not meet by chance
    batch["is_first"][1, 6] = True  # sequence 1 leaves its episode at horizon 3 (frame 6)
    torch.manual_seed(4)
    out = open_loop_prediction(wm, batch, context=3)
    torch.manual_seed(4)  # the same dequantisation, posterior and prior noise
    with torch.no_grad():
        ctx = {k: batch[k][:, :3] for k in ("pixels", "prev_action", "is_first")}
        filt = wm.filter(ctx)
        wm.decode_pixels(filt.observed.state)  # draws nothing; mirrors the call order
        imagined = wm.rssm.imagine(filt.observed.last, batch["prev_action"][:, 3:])
        want = wm.reward_head(imagined.feat).mean
    torch.testing.assert_close(out["reward_pred"], want)
    assert want.std() > 0.1  # the head reads the states: a row shift would change the errors
    diff = want - batch["reward"][:, 3:, 0]
    torch.testing.assert_close(out["reward_abs_error"][:3], diff[:, :3].abs().mean(0))
    torch.testing.assert_close(out["reward_abs_error"][3:], diff[[0, 2], 3:].abs().mean(0))
    torch.testing.assert_close(out["reward_bias"][3:], diff[[0, 2], 3:].mean(0))
    shifted = (want[:, 1:] - batch["reward"][:, 3:-1, 0]).abs().mean(0)  # off by one row
    assert not torch.allclose(out["reward_abs_error"][:5], shifted[:5])
    # Without rewards (e.g. a caller's own frames), the frames' numbers alone.
    torch.manual_seed(4)
    plain = open_loop_prediction(wm, batch.exclude("reward"), context=3)
    assert "reward_abs_error" not in plain and torch.equal(plain["pred"], out["pred"])


def test_filtered_reward_error_is_the_head_on_the_posterior_states(kind):
    wm = _reward_model(kind)
    batch = random_batch(2, 6, first_at=(0, 4))
    torch.manual_seed(5)
    got = filtered_reward_error(wm, batch)
    torch.manual_seed(5)
    with torch.no_grad():
        pred = wm.reward_head(wm.filter(batch).observed.state.feat).mean  # [2, 6]
    diff = pred - batch["reward"][..., 0]
    assert got["abs_error"] == pytest.approx(float(diff.abs().mean()), rel=1e-6)
    assert got["bias"] == pytest.approx(float(diff.mean()), rel=1e-6, abs=1e-7)
    assert got["abs_error"] > abs(got["bias"])  # errors of both signs: not the same number
    # A replayed window with stored contexts (agent.replay_context) starts from them, as
    # training does; the first row is no episode start here, so they matter.
    batch = random_batch(2, 6, first_at=(4,))
    batch["context_belief"] = torch.randn(2, 6, wm.rssm.deter)
    batch["context_state"] = torch.randn(2, 6, wm.rssm.latent_dim)
    torch.manual_seed(5)
    got = filtered_reward_error(wm, batch)
    torch.manual_seed(5)
    with torch.no_grad():
        start = RSSMState(batch["context_belief"][:, 0], batch["context_state"][:, 0])
        pred = wm.reward_head(wm.filter(batch, start).observed.state.feat).mean
    assert got["abs_error"] == pytest.approx(float((pred - batch["reward"][..., 0]).abs().mean()))
    torch.manual_seed(5)
    zeros = filtered_reward_error(wm, batch.exclude("context_belief", "context_state"))
    assert zeros["abs_error"] != pytest.approx(got["abs_error"], rel=1e-3)


def _one_latent_model(kind):
    """d = 1, σ_x fixed: the sequence marginal is a low-dimensional integral."""
    options = {"sigma_x": "fixed", "sigma_x_init": 1.0}
    return tiny_world_model(kind, dtype=torch.float64, latent_dim=1, obs_options=options)


def _log_marginal_by_quadrature(wm, y, prev_action, is_first, n=161):
    """``log p(y_{1:T} | a)`` by nested trapezoidal quadrature over z_1, z_2, ... (d = 1):
    ``∫ p(z_1|h_1) p(y_1|h_1,z_1) ∫ p(z_2|h_2(z_1)) p(y_2|h_2,z_2) ... dz``; a reset (is_first)
    makes the rest of the sequence independent of the past. y ``[T, C, H, W]``."""
    om, rssm = wm.obs_model, wm.rssm

    def from_step(t, state):  # [M] log-integrals of steps t.. for M past states
        keep = 1.0 - is_first[t].double()
        prev = RSSMState(state.h * keep, state.z * keep)
        h = rssm.recurrent(prev, prev_action[t : t + 1].expand(len(state.h), -1) * keep)
        mu, sigma = rssm.prior_params(h)  # [M, 1]
        z = mu + sigma * torch.linspace(-9, 9, n, dtype=torch.float64)  # [M, n]
        m = len(h)
        hz, zz = h.repeat_interleave(n, 0), z.reshape(-1, 1)
        mu_x, sigma_x = om.decoder_params(zz, hz)
        log_f = om.log_px(y[t].expand(m * n, *y.shape[1:]), mu_x, sigma_x).view(m, n)
        log_f = log_f + D.Normal(mu, sigma).log_prob(z)
        if t + 1 < len(y):
            if is_first[t + 1]:
                log_f = log_f + from_step(t + 1, rssm.initial(1, dtype=torch.float64))
            else:
                log_f = log_f + from_step(t + 1, RSSMState(hz, zz)).view(m, n)
        top = log_f.max(1, keepdim=True).values
        return top[:, 0] + torch.trapezoid((log_f - top).exp(), z, dim=1).log()

    return from_step(0, rssm.initial(1, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["vae", "aef"])
@pytest.mark.parametrize("first_at", [(0,), (0, 2)], ids=["T2", "T3-reset"])
@torch.no_grad()
def test_sequence_estimators_converge_to_the_nested_integral(kind, first_at):
    """Sequential importance sampling over whole trajectories (the proposal of z_t depends on
    the sampled past through h_t) against an independent quadrature of the marginal; the
    T = 3 case resets at t = 2, which the estimator must honour through is_first."""
    torch.manual_seed(0)
    wm = _one_latent_model(kind)
    if kind == "aef":
        wm.obs_model.proposal_scale = 3.0
    t = len(first_at) + 1
    batch = random_batch(1, t, first_at=first_at, dtype=torch.float64)
    torch.manual_seed(3)  # encode_pixels draws the dequantisation noise first in both paths
    y, _ = wm.encode_pixels(batch["pixels"].flatten(0, 1))
    truth = _log_marginal_by_quadrature(wm, y, batch["prev_action"][0], batch["is_first"][0])
    torch.manual_seed(3)
    estimate, _ = sequence_log_likelihood(wm, batch, num_samples=8192)
    # ~0.05 nats of Monte-Carlo error at this K; a missing −log K is 9 nats, a dropped reset
    # or a misaligned action changes the integrand itself.
    torch.testing.assert_close(estimate, truth, atol=0.25, rtol=0)


@torch.no_grad()
def test_proposal_scale_tuned_on_held_out_sequences_tightens_the_estimate():
    torch.manual_seed(1)
    wm = _one_latent_model("aef")
    om = wm.obs_model
    held_out = random_batch(2, 2, dtype=torch.float64)
    scales = (0.01, 0.1, 1.0, 3.0)
    torch.manual_seed(4)
    search = tune_sequence_proposal_scale(wm, [held_out], num_samples=16, scales=scales)
    assert set(search) == set(scales) and om.proposal_scale == max(search, key=search.get)
    torch.manual_seed(4)  # every s sees the same draws: the search repeats exactly
    assert tune_sequence_proposal_scale(wm, [held_out], num_samples=16, scales=scales) == search
    # On other sequences, the tuned s at K = 16 lands nearer the true marginal than a narrow s.
    batch = random_batch(1, 2, dtype=torch.float64)
    torch.manual_seed(5)
    y, _ = wm.encode_pixels(batch["pixels"].flatten(0, 1))
    truth = _log_marginal_by_quadrature(wm, y, batch["prev_action"][0], batch["is_first"][0])
    errors = {}
    for s in (om.proposal_scale, 0.01):
        om.proposal_scale = s
        torch.manual_seed(5)
        errors[s] = float((truth - sequence_log_likelihood(wm, batch, num_samples=16)[0]).abs())
    tuned, narrow = errors.values()
    assert tuned < narrow / 3, errors  # ~1-2 against ~10 nats


def test_only_the_expansion_aef_has_a_proposal_scale_to_tune():
    wm = tiny_world_model("vae")
    with pytest.raises(ValueError, match="only the expansion AEF"):
        tune_sequence_proposal_scale(wm, [random_batch(1, 2)])
