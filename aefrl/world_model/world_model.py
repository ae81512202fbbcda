"""The world model: pre-processing, observation model, RSSM, reward and continue heads.

``obs_model="vae" | "aef" | "aef_partition"`` switches only the observation model; the RSSM,
heads and trunk sizes are identical, so VAE-vs-AEF comparisons are architecturally fair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from torch import nn

from aefrl import keys
from aefrl.obs_models import make_obs_model
from aefrl.preprocess import Preprocess
from aefrl.world_model.heads import TWOHOT, BernoulliHead, TwoHotHead
from aefrl.world_model.rssm import RSSM, Observed, RSSMState


@dataclass
class Filtered:
    """A ``[B, T]`` batch after pre-processing and filtering."""

    y: torch.Tensor  # [B, T, *obs_shape], pre-processed observations
    logdet: torch.Tensor  # [B, T], ℓ_P of the pre-processing
    observed: Observed  # posterior / prior parameters and states


def stored_start(
    batch, belief: str = keys.CONTEXT_BELIEF, state: str = keys.CONTEXT_STATE, dtype=None
) -> RSSMState | None:
    """The state a ``[B, T]`` window's scan starts from: its first row's stored context
    ``(h [B, H], z [B, d])`` (``agent.replay_context``, :mod:`aefrl.keys`), or None (zeros)
    when the batch has none. ``belief`` / ``state``: the keys; ``dtype``: the model's."""
    h, z = batch.get(belief, None), batch.get(state, None)
    if h is None and z is None:
        return None
    if h is None or z is None:
        raise ValueError(
            f"a replay context needs both {belief} and {state}; the batch has only "
            f"{belief if z is None else state}"
        )
    return RSSMState(h[:, 0].to(dtype), z[:, 0].to(dtype))


class WorldModel(nn.Module):
    """Composition of the world-model pieces (SPEC §1–4).

    Args:
        obs_shape: ``(C, H, W)`` of the pixels.
        action_dim: A.
        obs_model: ``"vae"``, ``"aef"`` or ``"aef_partition"``.
        latent_dim: d, size of z.
        deter: size of the GRU belief h.
        hidden: width of the reward and continue heads' MLPs (and of the RSSM's unless
            ``rssm_hidden`` is given).
        rssm_hidden: width of the RSSM's MLPs: its input layer (the GRU's input), its prior
            head and the observation model's posterior head. None: ``hidden`` (the posterior
            head: the observation model's own ``hidden``, as before the setting existed).
            DreamerV1 and torchrl size these with the belief, 200 beside 400-wide heads.
        layers: hidden layers of the reward / continue heads.
        depth: conv trunk depth.
        conv_style, conv_norm: conv trunk geometry (``"v3"`` / ``"v1"``) and norms.
        prior_std_min: lower bound of the prior std.
        dynamics_noise: noise on z where the recurrence reads it in training, in units of the
            prior's std (:class:`~aefrl.world_model.rssm.RSSM`); 0: off.
        alpha, actnorm: pre-processing (see :class:`~aefrl.preprocess.Preprocess`).
        reward_bins, reward_twohot: the reward head's bin count and two-hot form (``"symlog"``
            or ``"symexp"``: :mod:`aefrl.world_model.heads`).
        obs_options: extra options for :func:`~aefrl.obs_models.make_obs_model`.
    """

    def __init__(
        self,
        obs_shape: tuple[int, int, int],
        action_dim: int,
        obs_model: str = "aef",
        latent_dim: int = 32,
        deter: int = 256,
        hidden: int = 256,
        rssm_hidden: int | None = None,
        layers: int = 2,
        depth: int = 32,
        conv_style: str = "v3",
        conv_norm: bool = True,
        prior_std_min: float = 0.1,
        dynamics_noise: float = 0.0,
        alpha: float = 0.05,
        actnorm: bool = False,
        reward_bins: int = 255,
        reward_twohot: str = "symlog",
        obs_options: dict | None = None,
    ) -> None:
        super().__init__()
        if reward_twohot not in TWOHOT:  # named here: the head's own message says "twohot"
            raise ValueError(
                f"reward_twohot must be one of {', '.join(TWOHOT)}, got {reward_twohot!r}"
            )
        self.obs_shape = tuple(obs_shape)
        self.action_dim = int(action_dim)
        self.preprocess = Preprocess(self.obs_shape, alpha=alpha, actnorm=actnorm)
        rssm_width = hidden if rssm_hidden is None else rssm_hidden
        obs_options = dict(obs_options or {})
        # Unset, the posterior head keeps the observation model's own width (as before).
        given = obs_options.pop("posterior_hidden", None)
        if rssm_hidden is not None and given not in (None, rssm_hidden):
            raise ValueError(
                f"posterior_hidden ({given}) and rssm_hidden ({rssm_hidden}) both set the "
                "posterior head's width; set rssm_hidden alone"
            )
        if rssm_hidden is not None or given is not None:
            obs_options["posterior_hidden"] = rssm_hidden if rssm_hidden is not None else given
        options = {
            "depth": depth,
            "hidden": hidden,
            "conv_style": conv_style,
            "conv_norm": conv_norm,
            **obs_options,
        }
        self.obs_model = make_obs_model(obs_model, self.obs_shape, latent_dim, deter, **options)
        self.rssm = RSSM(
            self.obs_model, action_dim, deter, rssm_width, prior_std_min, dynamics_noise
        )
        feat = self.rssm.feat_dim
        self.reward_head = TwoHotHead(feat, hidden, layers, reward_bins, twohot=reward_twohot)
        self.continue_head = BernoulliHead(feat, hidden, layers)

    @property
    def kind(self) -> str:
        return self.obs_model.kind

    @property
    def feat_dim(self) -> int:
        return self.rssm.feat_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.rssm.gru.weight_hh.dtype

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are (one device: the model moves as a whole)."""
        return self.rssm.gru.weight_hh.device

    def encode_pixels(
        self, pixels: torch.Tensor, dequantize: str = "random"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 pixels ``[N, C, H, W]`` -> ``(y, ℓ_P)`` in the model's dtype.

        ``dequantize="random"`` draws ``v ~ U[0, 1)`` (training, likelihoods); ``"mid"`` uses the
        bin centre ``v = 1/2``, so acting adds no noise and AEF filtering is deterministic.
        """
        if dequantize == "mid":
            noise = torch.full(pixels.shape, 0.5, dtype=self.dtype, device=pixels.device)
            return self.preprocess.encode(pixels, noise)
        if dequantize != "random":
            raise ValueError(f"dequantize must be 'random' or 'mid', got {dequantize!r}")
        return self.preprocess.encode(pixels, dtype=self.dtype)

    def filter(
        self,
        batch: TensorDictBase,
        state: RSSMState | None = None,
        noise: torch.Tensor | None = None,
        train_noise: bool = False,
    ) -> Filtered:
        """Pre-process and filter a ``[B, T]`` replay batch (a tensordict or any mapping with
        keys pixels uint8 ``[B, T, C, H, W]``, prev_action ``[B, T, A]``, is_first
        ``[B, T, 1]``); ``train_noise``: the training loss's filter (``dynamics_noise``)."""
        pixels = batch[keys.PIXELS]
        b, t = pixels.shape[:2]
        y, logdet = self.encode_pixels(pixels.flatten(0, 1))
        embed, coords = self.obs_model.embed(y)
        observed = self.rssm.observe(
            embed.unflatten(0, (b, t)),
            None if coords is None else coords.unflatten(0, (b, t)),
            batch[keys.PREV_ACTION].to(embed.dtype),
            batch[keys.IS_FIRST],
            state,
            noise,
            train_noise,
        )
        return Filtered(y.unflatten(0, (b, t)), logdet.unflatten(0, (b, t)), observed)

    def decode_pixels(self, state: RSSMState) -> torch.Tensor:
        """Decoder mean of ``state [..., ·]`` mapped back to uint8 pixels ``[..., C, H, W]``."""
        lead = state.h.shape[:-1]
        flat = state.h.reshape(-1, state.h.shape[-1]), state.z.reshape(-1, state.z.shape[-1])
        mu_x = self.obs_model.decode(flat[1], flat[0])
        # Contiguous NCHW for consumers (videos, metrics); the decoder's own output is
        # channels-last.
        return self.preprocess.decode(mu_x).reshape(*lead, *self.obs_shape).contiguous()
