"""World-model quality: sequence likelihood in bits/dim (SPEC §6) and open-loop prediction.

Sequence likelihood of ``y_{1:T}`` given the actions:

* ``aef_partition``: exact, ``Σ_t log p(y_t | h_t)`` (z_t is a deterministic function of the past).
* ``vae``: importance sampling with K trajectories of posterior samples through the RSSM,
  ``log w = Σ_t [log p(y_t | h_t, z_t) + log p(z_t | h_t) − log q(z_t | h_t, e_t)]``.
* ``aef``: importance sampling over ``u_{1:T}``, ``u_t ~ N(W·y_t + b, s²I)``,
  ``log w = Σ_t [J_t(y_t, u_t) − log N(u_t; W·y_t + b, s²I)]``.

Both estimators return ``logsumexp_k log w_k − log K`` (sequential importance sampling: the
proposal of z_t depends on the sampled past through h_t, which the weights account for).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tensordict import TensorDictBase

from aefrl import keys
from aefrl.metrics import mse, sharpness_ratio, ssim
from aefrl.obs_models.aef import PROPOSAL_SCALES
from aefrl.world_model.world_model import WorldModel, stored_start


def _repeat(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.repeat_interleave(k, 0) if x is not None else None


@torch.no_grad()
def sequence_log_likelihood(
    world_model: WorldModel, batch: TensorDictBase, num_samples: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(y_{1:T} | a), Σ_t ℓ_P)`` per sequence, each ``[B]`` (nats).

    ``batch`` is a ``[B, T]`` replay batch; the dequantisation noise is drawn once per sequence.
    The scan starts from zeros even where the batch stores contexts (``agent.replay_context``),
    so that runs with and without them score the same quantity.
    """
    wm = world_model
    om = wm.obs_model
    pixels = batch[keys.PIXELS]
    b, t = pixels.shape[:2]
    y, logdet = wm.encode_pixels(pixels.flatten(0, 1))
    embed, coords = om.embed(y)
    k = 1 if om.exact_likelihood else int(num_samples)
    if k < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    embed_k = _repeat(embed.unflatten(0, (b, t)), k)  # [B*K, T, E], sample-major within sequence
    coords_k = None if coords is None else _repeat(coords.unflatten(0, (b, t)), k)
    xi = torch.randn(b * k, t, om.latent_dim, dtype=embed.dtype, device=embed.device)
    coords_k, noise, log_q = om.proposal(coords_k, xi)  # [B*K, T, d], ..., [B*K, T]
    obs = wm.rssm.observe(
        embed_k,
        coords_k,
        _repeat(batch[keys.PREV_ACTION], k).to(embed.dtype),
        _repeat(batch[keys.IS_FIRST], k),
        noise=noise,
    )
    h, z = obs.state.h, obs.state.z
    log_px, _ = om.decoder_log_px(_repeat(y.unflatten(0, (b, t)), k), z, h)  # [B*K, T]
    # The proposal's weight at each step (ObservationModel.proposal); for the partition family
    # (no proposal) log p(y | z) + log p(z) + Σ log σ_q is the exact density.
    log_w = log_px + obs.prior().log_prob(z) + obs.sigma_q.log().sum(-1) - log_q
    log_w = log_w.sum(1).view(b, k)
    log_p = torch.logsumexp(log_w, 1) - math.log(k)
    return log_p, logdet.view(b, t).sum(1)


def sequence_bits_per_dim(
    world_model: WorldModel, batch: TensorDictBase, num_samples: int = 8
) -> torch.Tensor:
    """Bits/dim of each sequence of the discrete frames (a bound through dequantisation)."""
    log_p, logdet = sequence_log_likelihood(world_model, batch, num_samples)
    steps = batch[keys.PIXELS].shape[1]
    return world_model.preprocess.bits_per_dim(log_p, logdet, frames=steps)


@torch.no_grad()
def tune_sequence_proposal_scale(
    world_model: WorldModel,
    batches: Sequence[TensorDictBase],
    num_samples: int = 32,
    scales: Sequence[float] = PROPOSAL_SCALES,
) -> dict[float, float]:
    """Expansion AEF: set the proposal scale s (SPEC §6: "s tuned on held-out data") to the
    grid value whose mean sequence ``log p(y_{1:T} | a)`` over ``batches`` is largest.

    ``batches`` must be held out from the sequences reported afterwards (taking the best of
    several noisy estimates on the reported data would flatter it). Returns ``{s: mean log p}``
    (nats per sequence); every s sees the same random draws.
    """
    om = world_model.obs_model
    if om.kind != "aef":
        raise ValueError(f"only the expansion AEF ('aef') has a proposal scale, not {om.kind!r}")
    if not batches:
        raise ValueError("tune_sequence_proposal_scale needs at least one batch of sequences")

    def mean_log_likelihood() -> float:
        log_p = [sequence_log_likelihood(world_model, b, num_samples)[0] for b in batches]
        return float(torch.cat(log_p).mean())

    return om.search_proposal_scale(mean_log_likelihood, scales)


@torch.no_grad()
def open_loop_prediction(
    world_model: WorldModel, batch: TensorDictBase, context: int = 5
) -> dict[str, torch.Tensor]:
    """Filter ``context`` real frames, then imagine the rest of the sequence open-loop under the
    recorded actions (SPEC §4; BENCHMARKS §3: 5 context frames, 45 predicted).

    Returns ``real``, ``pred`` (uint8 ``[B, T, C, H, W]``; the first ``context`` predicted
    frames are the posterior reconstructions) and ``mse``, ``ssim`` per horizon ``[T - context]``
    (images in [0, 1]), averaged over the sequences still in their context's episode at that
    horizon: a replay window may cross into a new episode, whose frames the imagination of the
    old one cannot predict (NaN at horizons no sequence reaches); ``sharpness``, the predicted
    frames' mean gradient magnitude over the real ones' on the same frames (below 1: blur;
    NaN if there are none).

    With rewards in the batch, also the reward head's mean on the imagined states against the
    recorded rewards (row t's ``r_t`` arrives with ``o_t``, :mod:`aefrl.keys`), averaged as the
    frames: ``reward_abs_error`` and ``reward_bias`` (predicted minus real) per horizon
    ``[T - context]``, and ``reward_pred`` ``[B, T - context]``. The actor and critic learn
    from the reward head on imagined states (under the policy's actions, 15 steps deep by
    default); the imagined frames do not enter their losses.
    """
    wm = world_model
    ctx = {k: batch[k][:, :context] for k in (keys.PIXELS, keys.PREV_ACTION, keys.IS_FIRST)}
    # A replay batch with stored contexts (agent.replay_context) starts where training does.
    filt = wm.filter(ctx, stored_start(batch, dtype=wm.dtype))  # any mapping of [B, T] entries
    recon = wm.decode_pixels(filt.observed.state)
    future_actions = batch[keys.PREV_ACTION][:, context:].to(filt.y.dtype)
    imagined = wm.rssm.imagine(filt.observed.last, future_actions)
    pred = torch.cat([recon, wm.decode_pixels(imagined)], 1)
    real = batch[keys.PIXELS]
    r = real[:, context:].flatten(0, 1).float() / 255
    p = pred[:, context:].flatten(0, 1).float() / 255
    steps = real.shape[1] - context
    # [B, steps]: no episode start between the context and this horizon (inclusive).
    same = batch[keys.IS_FIRST][:, context:].reshape(-1, steps).cumsum(1) == 0
    count = same.sum(0)
    count = torch.where(count > 0, count, torch.nan)

    def mean_over_same_episode(per_frame: torch.Tensor) -> torch.Tensor:
        return (per_frame.view(-1, steps) * same).sum(0) / count

    out = {
        "real": real,
        "pred": pred,
        "mse": mean_over_same_episode(mse(p, r)),
        "ssim": mean_over_same_episode(ssim(p, r)),
        "sharpness": (
            sharpness_ratio(p[same.flatten()], r[same.flatten()]) if same.any() else math.nan
        ),
    }
    if keys.REWARD in batch:
        reward_pred = wm.reward_head(imagined.feat).mean.float()  # [B, steps]
        diff = reward_pred - batch[keys.REWARD][:, context:].squeeze(-1).float()
        out["reward_pred"] = reward_pred
        out["reward_abs_error"] = mean_over_same_episode(diff.abs())
        out["reward_bias"] = mean_over_same_episode(diff)
    return out


@torch.no_grad()
def filtered_reward_error(world_model: WorldModel, batch: TensorDictBase) -> dict[str, float]:
    """The reward head on the posterior states of a whole ``[B, T]`` batch (filtered from the
    window's start, as in training) against its recorded rewards: ``abs_error`` and ``bias``
    (predicted minus real), means over every row. Beside :func:`open_loop_prediction`'s
    per-horizon errors it tells a reward head that misreads imagined states (prior samples)
    from one that has not learned the rewards at all."""
    wm = world_model
    filt = wm.filter(batch, stored_start(batch, dtype=wm.dtype))
    pred = wm.reward_head(filt.observed.state.feat).mean.float()  # [B, T]
    diff = pred - batch[keys.REWARD].squeeze(-1).float()
    return {"abs_error": float(diff.abs().mean()), "bias": float(diff.mean())}


__all__ = [
    "filtered_reward_error",
    "open_loop_prediction",
    "sequence_bits_per_dim",
    "sequence_log_likelihood",
    "tune_sequence_proposal_scale",
]
