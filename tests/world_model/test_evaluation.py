"""Sequence likelihoods (SPEC §6) and open-loop prediction."""

import math

import torch

from aefrl.world_model.evaluation import (
    open_loop_prediction,
    sequence_bits_per_dim,
    sequence_log_likelihood,
)
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
