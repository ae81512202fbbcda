"""Actor, critic, λ-returns and return normalisation for learning in imagination (SPEC §7)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.distributions.utils import _sum_rightmost
from torchrl.modules import IndependentNormal, TanhNormal
from torchrl.objectives.value.functional import td_lambda_return_estimate

from aefrl.nn import MLP
from aefrl.world_model.heads import TwoHotHead
from aefrl.world_model.rssm import RSSM, RSSMState

#: Action distributions of :class:`Actor`.
ACTOR_DISTS = ("tanh_normal", "bounded_normal")


class BoundedNormal(IndependentNormal):
    """DreamerV3's continuous policy: ``N(tanh(μ), σ²)`` per action dimension, its samples
    clipped to ``[-1, 1]`` only when acted on (:meth:`Actor.act`).

    Unlike a tanh-squashed Gaussian, its spread in action space is σ wherever the mean is, so
    exploration cannot vanish by pushing the pre-squash mean into tanh's flat tails, and the
    entropy bonus acts on σ alone. torchrl's ``IndependentNormal`` does not apply its
    ``tanh_loc`` in ``__init__`` (only in ``update``), so the mean is squashed by the caller.
    """

    def rsample_and_log_prob(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised sample ``[..., A]`` (not clipped) and its log-density ``[...]``;
        the interface of torchrl's ``TanhNormal``."""
        action = self.rsample()
        return action, self.log_prob(action)


def sample_from_noise(
    dist: TanhNormal | BoundedNormal, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample ``[..., A]`` that ``dist.rsample()`` draws when its standard-normal draw is
    ``noise [..., A]`` (reparameterised: the gradient reaches the distribution's parameters),
    and its log-density ``[...]``. A tanh-normal is scored at the exact pre-tanh value, as
    torchrl's ``TanhNormal.rsample_and_log_prob`` does (inverting a saturated tanh is not)."""
    if noise.shape != dist.batch_shape + dist.event_shape:
        raise ValueError(
            f"noise must have the sample's shape {tuple(dist.batch_shape + dist.event_shape)}, "
            f"got {tuple(noise.shape)}"
        )
    return _draw(dist, noise, constant=False)


def score_log_prob(dist: TanhNormal | BoundedNormal, noise: torch.Tensor) -> torch.Tensor:
    """``log π(sg(a)) [...]`` of the sample ``a`` that ``noise [..., A]`` draws
    (:func:`sample_from_noise`), differentiable in the distribution's parameters only: the
    score function ``∇ log π(a)`` of the REINFORCE gradient, where the sample is a constant.
    A tanh-normal is scored at its pre-tanh value (its log-Jacobian there is a constant)."""
    return _draw(dist, noise, constant=True)[1]


def _draw(
    dist: TanhNormal | BoundedNormal, noise: torch.Tensor, constant: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample ``noise`` draws and its log-density; ``constant``: the sample (a
    tanh-normal's pre-tanh value) detached, so that only the density's parameters carry a
    gradient."""
    if isinstance(dist, BoundedNormal):
        action = dist.mean + dist.stddev * noise
        action = action.detach() if constant else action
        return action, dist.log_prob(action)
    base, (transform,) = dist.base_dist, dist.transforms
    preimage = base.mean + base.stddev * noise
    preimage = preimage.detach() if constant else preimage
    action = transform(preimage)
    ladj = transform.log_abs_det_jacobian(preimage, action)
    return action, base.log_prob(preimage) - _sum_rightmost(ladj, len(dist.event_shape))


class Actor(nn.Module):
    """``feat [..., F] ->`` a distribution over actions in ``[-1, 1]^A``.

    The std is kept in ``[min_std, max_std]`` through a shifted sigmoid (DreamerV3):
    ``σ = min + (max − min)·sigmoid(s + 2)``. ``dist`` picks the distribution:

    * ``"tanh_normal"`` (default; DreamerV1, SPEC §7): ``a = tanh(x)``, ``x ~ N(5·tanh(μ/5), σ²)``
      (the pre-tanh mean soft-clipped to ``[-5, 5]``). σ bounds the noise before the tanh only:
      a mean in tanh's tails makes the action-space spread ``tanh'(mean)·σ`` arbitrarily small.
    * ``"bounded_normal"`` (DreamerV3): ``a ~ N(tanh(μ), σ²)`` (:class:`BoundedNormal`), whose
      action-space spread is σ; samples outside ``[-1, 1]`` are clipped when acting.
    """

    def __init__(
        self,
        feat_dim: int,
        action_dim: int,
        hidden: int = 256,
        layers: int = 2,
        min_std: float = 0.1,
        max_std: float = 1.0,
        dist: str = "tanh_normal",
    ) -> None:
        super().__init__()
        if not 0 < min_std < max_std:
            raise ValueError(f"need 0 < min_std < max_std, got {min_std} and {max_std}")
        if dist not in ACTOR_DISTS:
            raise ValueError(f"dist must be one of {', '.join(ACTOR_DISTS)}, got {dist!r}")
        self.net = MLP(feat_dim, 2 * action_dim, hidden, layers)
        self.min_std, self.max_std = float(min_std), float(max_std)
        self.dist = dist
        # The action bounds as tensors that move with the module: given Python floats,
        # TanhNormal builds device tensors from them on every call, a blocking host-to-device
        # copy that a CUDA-graph capture refuses. Non-persistent: checkpoints stay as they were.
        self.register_buffer("action_low", torch.tensor(-1.0), persistent=False)
        self.register_buffer("action_high", torch.tensor(1.0), persistent=False)

    def forward(self, feat: torch.Tensor) -> TanhNormal | BoundedNormal:
        loc, raw = self.net(feat).chunk(2, -1)
        std = self.min_std + (self.max_std - self.min_std) * torch.sigmoid(raw + 2.0)
        if self.dist == "bounded_normal":
            # Checking loc and scale reads them back to the host (a sync a CUDA graph refuses);
            # torchrl's import turns the check off globally, this keeps it off without it.
            return BoundedNormal(torch.tanh(loc), std, validate_args=False)
        return TanhNormal(
            loc, std, upscale=5.0, tanh_loc=True, low=self.action_low, high=self.action_high
        )

    def act(
        self,
        feat: torch.Tensor,
        explore: bool,
        reparameterize: bool = False,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The action to execute, ``[..., A]`` in ``[-1, 1]``: a sample (``explore``) or the
        distribution's mode. ``reparameterize``: the sample as ``rsample`` draws it, carrying the
        gradient to ``feat`` and the weights (a loss that backpropagates through actions, e.g.
        torchrl's ``DreamerActorLoss``); acting has no use for it. ``noise [..., A]``: the
        sample's standard-normal draw (drawn when omitted; given, the sample is the
        reparameterised one whatever ``reparameterize`` says, and ignored when not
        ``explore``). Clipping changes nothing for ``tanh_normal``."""
        dist = self(feat)
        if not explore:
            action = dist.deterministic_sample
        elif noise is not None:
            action = sample_from_noise(dist, noise)[0]
        else:
            action = dist.rsample() if reparameterize else dist.sample()
        return action.clamp(self.action_low, self.action_high)

    def extra_repr(self) -> str:
        return f"dist={self.dist!r}, min_std={self.min_std}, max_std={self.max_std}"


class Critic(TwoHotHead):
    """State value ``v(feat)`` as a two-hot distribution, ``twohot="symlog"`` or ``"symexp"``
    (:class:`~aefrl.world_model.heads.TwoHotHead`; output layer zero-initialised)."""


class SlowCopy(nn.Module):
    """An exponential moving average of a module's parameters (the slow critic).

    ``update()`` does ``θ_slow ← (1 − τ)·θ_slow + τ·θ``; the copy is never trained directly.
    """

    def __init__(self, module: nn.Module, tau: float = 0.02) -> None:
        super().__init__()
        if not 0 < tau <= 1:
            raise ValueError(f"tau must lie in (0, 1], got {tau}")
        self.tau = float(tau)
        self.source = [module]  # a list keeps the source out of this module's state_dict
        self.copy = copy.deepcopy(module).requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        for slow, fast in zip(self.copy.parameters(), self.source[0].parameters()):
            slow.lerp_(fast, self.tau)

    def forward(self, *args, **kwargs):
        return self.copy(*args, **kwargs)


def lambda_returns(
    reward: torch.Tensor,
    value: torch.Tensor,
    discount: torch.Tensor,
    lmbda: float,
    done: torch.Tensor | None = None,
) -> torch.Tensor:
    """TD(λ) returns of a trajectory, by torchrl's ``td_lambda_return_estimate``.

    With states ``s_0..s_K``, ``reward[k] = r(s_{k+1})``, ``value[k] = v(s_{k+1})`` and
    ``discount[k] = γ·c(s_{k+1})`` (all ``[N, K]``, K the horizon)::

        R_k = reward[k] + discount[k]·((1 − λ)·value[k] + λ·R_{k+1}),   with R_K = value[K−1]

    where ``done[k]`` (bool ``[N, K]``, optional: a trajectory cut after ``s_{k+1}``) replaces
    ``R_{k+1}`` by ``value[k]``. Returns ``[N, K]``: ``R_k`` is the return from ``s_k``.
    """
    if done is None:
        done = torch.zeros_like(reward, dtype=torch.bool)
    return td_lambda_return_estimate(
        discount.unsqueeze(-1),
        lmbda,
        value.unsqueeze(-1),
        reward.unsqueeze(-1),
        done.bool().unsqueeze(-1),
        terminated=torch.zeros_like(done, dtype=torch.bool).unsqueeze(-1),
    ).squeeze(-1)


def quantiles(x: torch.Tensor, levels: tuple[float, ...]) -> list[torch.Tensor]:
    """``torch.quantile(x, q)`` (linear interpolation) of a 1-d tensor for each level ``q``, from
    one sort, with the positions computed on the host from the static length: no value is read
    back from the device (ATen's quantile may validate ``q`` there, which a CUDA-graph capture
    refuses). Returns 0-d tensors."""
    x = torch.sort(x).values
    out = []
    for q in levels:
        pos = q * (x.numel() - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, x.numel() - 1)
        out.append(torch.lerp(x[lo], x[hi], pos - lo))
    return out


class ReturnNormalizer(nn.Module):
    """Scale ``S = EMA(P95(R) − P5(R))`` of λ-returns (DreamerV3); divide by ``max(1, S)``.

    Dividing by at least 1 shrinks large returns without amplifying the noise of small ones.
    """

    def __init__(self, decay: float = 0.99, low: float = 0.05, high: float = 0.95) -> None:
        super().__init__()
        self.decay, self.low, self.high = float(decay), float(low), float(high)
        self.register_buffer("scale", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def update(self, returns: torch.Tensor) -> torch.Tensor:
        """Fold the spread of ``returns`` (any shape) into the scale; returns ``scale`` ``[]``.

        Branch-free (``torch.where`` on the ``initialized`` flag rather than ``if``), so the
        update never synchronises with the host and can be captured in a CUDA graph.
        """
        flat = returns.detach().flatten().float()
        low, high = quantiles(flat, (self.low, self.high))
        spread = (high - low).to(self.scale.dtype)
        ema = torch.lerp(self.scale, spread, 1 - self.decay)
        self.scale.copy_(torch.where(self.initialized, ema, spread))
        self.initialized.fill_(True)
        return self.scale

    def forward(self, returns: torch.Tensor) -> torch.Tensor:
        return returns / self.scale.clamp_min(1.0)


def imagine(
    rssm: RSSM,
    actor: Actor,
    start: RSSMState,
    horizon: int,
    input_grad: bool = False,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[RSSMState, torch.Tensor, torch.Tensor]:
    """Roll the prior forward ``horizon`` = K steps from ``start`` (RSSMState ``[N, ...]``) with
    actions from ``actor`` (reparameterised, so returns are differentiable w.r.t. the actor).

    The actor sees ``sg(s_k)``, as in every Dreamer: the gradient reaches action ``a_k`` from
    the states and rewards after it through the dynamics, but not through the later actions'
    dependence on those states, and the entropy estimate ``−log π(a_k | s_k)`` is taken at a
    fixed state. ``input_grad=True`` keeps the actor's input in the graph instead (the full
    pathwise derivative; the project's runs before the option existed trained that way).

    A ``bounded_normal`` actor's samples can leave ``[-1, 1]``; the dynamics get them clipped,
    as the environment executes them and as the replay stores them (:meth:`Actor.act`), so the
    model is never asked about actions it has not seen, and the gradient of an action beyond a
    bound is zero, as the environment's is. The log-probability stays the unclipped sample's.

    ``noise``: the standard-normal draws ``(actions [N, K, A], states [N, K, d])`` of the
    actions' and the prior states' samples (drawn when omitted): for deterministic tests, and
    for the REINFORCE actor loss, which evaluates the actor again at the samples they drew.

    Returns ``(states [N, K+1, ...], actions [N, K, A], log_probs [N, K])``: action k (as the
    dynamics took it) is taken in state k and leads to state k + 1.
    """
    if noise is not None:
        n = start.h.shape[0]
        shapes = ((n, horizon, rssm.action_dim), (n, horizon, start.z.shape[-1]))
        got = tuple(tuple(x.shape) for x in noise)
        if got != shapes:
            raise ValueError(f"noise must be shaped {shapes} (actions, states), got {got}")
    hs, zs, actions, log_probs = [start.h], [start.z], [], []
    state = start
    clip = actor.dist == "bounded_normal"  # a tanh-normal's samples are inside already
    for k in range(horizon):
        feat = state.feat if input_grad else state.feat.detach()
        if noise is None:
            action, log_prob = actor(feat).rsample_and_log_prob()
        else:
            action, log_prob = sample_from_noise(actor(feat), noise[0][:, k])
        if clip:
            action = action.clamp(actor.action_low, actor.action_high)
        if noise is None:
            state = rssm.img_step(state, action)
        else:
            state = rssm.img_step(state, action, noise[1][:, k])
        hs.append(state.h)
        zs.append(state.z)
        actions.append(action)
        log_probs.append(log_prob)
    return (
        RSSMState(torch.stack(hs, 1), torch.stack(zs, 1)),
        torch.stack(actions, 1),
        torch.stack(log_probs, 1),
    )
