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
    first prior; both converge to the same log p(y) as K grows."""
    if kind == "aef_partition":
        return
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
    assert torch.allclose(seq, step, atol=0.1), (seq, step)


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
    bpd = sequence_bits_per_dim(wm, batch, num_samples=2)
    assert bpd.shape == (4,) and torch.all(bpd > 0) and torch.all(bpd < 16)


def test_open_loop_prediction_shapes_and_context(kind):
    torch.manual_seed(0)
    wm = tiny_world_model(kind)
    batch = random_batch(2, 9)
    out = open_loop_prediction(wm, batch, context=3)
    assert out["pred"].shape == batch["pixels"].shape and out["pred"].dtype == torch.uint8
    assert torch.equal(out["real"], batch["pixels"])
    assert out["mse"].shape == (6,) and out["ssim"].shape == (6,)
    assert torch.all(out["mse"] >= 0) and math.isfinite(float(out["ssim"].mean()))
