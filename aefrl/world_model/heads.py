"""Prediction heads that return distributions with the same methods (``mean``, ``log_prob``).

The agent never special-cases a head: reward and critic are two-hot categoricals (DreamerV3),
the continue flag is a Bernoulli. Every head is trained on ``−log_prob(target)``.

Two two-hot forms (``TWOHOT``), both DreamerV3's: ``symlog`` (its 2023 code) spaces the bins
evenly in symlog space and averages there, ``symexp(Σ p_k b_k)``; ``symexp`` (its current
``symexp_twohot``) spaces them by ``symexp`` and averages in real space, ``Σ p_k b_k``. The
symlog average is biased towards zero when the prediction is spread over bins of different
magnitudes (two equally likely targets {0, 20} predict √21 − 1 ≈ 3.58 at the cross-entropy's
optimum, not 10); the real-space one is the distribution's mean.
"""

from __future__ import annotations

import torch
from torch import distributions as D
from torch import nn
from torch.nn import functional as F

from aefrl.nn import MLP, check_size


def symlog(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)·log(1 + |x|)``: compresses large magnitudes, identity-like near 0."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`symlog`."""
    return torch.sign(x) * torch.expm1(x.abs())


TWOHOT = ("symlog", "symexp")


def twohot_bins(count: int, limit: float, twohot: str = "symlog") -> torch.Tensor:
    """``[count]`` increasing bins spanning ``symexp(±limit)``: ``linspace(-limit, limit)`` in
    symlog space (``symlog``), or those points mapped by ``symexp`` (``symexp``), built as a
    negative half and its exact negation so that uniform probabilities average to exactly 0 (in
    float32 the bins reach ±4.9e8 at limit 20: a plain sum left residues of that order times
    the rounding error). Even counts have no bin at 0 (DreamerV3's even form repeats it)."""
    if twohot not in TWOHOT:
        raise ValueError(f"twohot must be one of {', '.join(TWOHOT)}, got {twohot!r}")
    if twohot == "symlog":
        return torch.linspace(-limit, limit, count)
    half = symexp(torch.linspace(-limit, 0.0, count // 2 + 1))  # ends at 0
    negative = half[:-1] if count % 2 == 0 else half  # odd counts keep the 0 as the middle bin
    return torch.cat([negative, -half[:-1].flip(0)])


class TwoHot:
    """Categorical over fixed bins, scored on real targets by two-hot encoding.

    ``logits [..., K]``, ``bins [K]`` (increasing; symlog space for ``twohot="symlog"``, real
    values, antisymmetric as :func:`twohot_bins` builds them, for ``"symexp"``). ``mean`` and
    ``log_prob`` take and return real values with shape ``[...]``.
    """

    def __init__(self, logits: torch.Tensor, bins: torch.Tensor, twohot: str = "symlog") -> None:
        self.logits = logits
        self.bins = bins
        self.twohot = twohot

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    @property
    def mean(self) -> torch.Tensor:
        """``symexp(Σ_k p_k b_k)`` (symlog) or ``Σ_k p_k b_k`` (symexp), ``[...]``."""
        probs = self.probs
        if self.twohot == "symlog":
            return symexp((probs * self.bins).sum(-1))
        # Σ p_k b_k over the bins paired with their negations, b_{K-1-k} = -b_k: the sum of
        # (p_k - p_{K-1-k})·b_k over the positive half is exactly 0 for uniform probabilities
        # (the zero-initialised heads' first predictions), which a plain sum is not.
        half = probs.shape[-1] // 2
        upper = probs[..., probs.shape[-1] - half :]
        return ((upper - probs[..., :half].flip(-1)) * self.bins[-half:]).sum(-1)

    def log_prob(self, target: torch.Tensor) -> torch.Tensor:
        """``Σ_k twohot(f(target))_k · log p_k``, ``[...]``: f = symlog (symlog) or identity."""
        value = symlog(target) if self.twohot == "symlog" else target
        return (two_hot(value, self.bins) * self.logits.log_softmax(-1)).sum(-1)


def two_hot(x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Encode ``x [...]`` as weights ``[..., K]`` on the two nearest bins (clipped to the range),
    so that ``Σ_k w_k b_k = x`` inside the range."""
    # float32 throughout: under bf16 autocast x may arrive in bf16, and two-hot targets (and the
    # scatter into them) need the bins' precision anyway.
    x = x.to(bins.dtype).clamp(bins[0], bins[-1])
    above = torch.searchsorted(bins, x.detach().contiguous(), right=True).clamp(1, len(bins) - 1)
    below = above - 1
    lo, hi = bins[below], bins[above]
    w_hi = (x - lo) / (hi - lo)
    out = torch.zeros(*x.shape, len(bins), dtype=x.dtype, device=x.device)
    out.scatter_(-1, below.unsqueeze(-1), (1 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, above.unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


class TwoHotHead(nn.Module):
    """``feat [..., F] -> TwoHot`` over ``bins`` bins spanning ``symexp(±limit)`` in the form
    ``twohot`` (``TWOHOT``; :func:`twohot_bins`).

    The output layer starts at zero, so initial predictions are exactly 0 (DreamerV3).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 256,
        layers: int = 2,
        bins: int = 255,
        limit: float = 20.0,
        twohot: str = "symlog",
    ) -> None:
        super().__init__()
        bins = check_size("bins", bins, 2)
        self.twohot = twohot
        self.register_buffer("bins", twohot_bins(bins, limit, twohot))
        self.net = MLP(in_dim, bins, hidden, layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, feat: torch.Tensor) -> TwoHot:
        return TwoHot(self.net(feat), self.bins, self.twohot)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # The bins are a buffer: a checkpoint of the other form would load its bins into this
        # head and its predictions would be read in the wrong space, without an error.
        saved = state_dict.get(prefix + "bins")
        if (
            saved is not None
            and saved.shape == self.bins.shape
            and not torch.allclose(saved.to(self.bins), self.bins, rtol=1e-5, atol=1e-6)
        ):
            other = next(t for t in TWOHOT if t != self.twohot)
            # Reported as torch reports a mismatch: load_state_dict raises a RuntimeError,
            # which the checkpoint loaders turn into their one-sentence CheckpointError.
            error_msgs.append(
                f"the checkpoint's {prefix}bins are not this head's {self.twohot!r} two-hot "
                f"bins (a {other!r} head's?): build the model with the run's own twohot setting"
            )
            return  # nothing of it loaded: a caller that goes on keeps this head's own bins
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"twohot={self.twohot!r}"


class Bernoulli(D.Bernoulli):
    """``torch.distributions.Bernoulli`` with ``log_prob`` accepting float or bool targets."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return -F.binary_cross_entropy_with_logits(
            self.logits, value.to(self.logits.dtype), reduction="none"
        )


class BernoulliHead(nn.Module):
    """``feat [..., F] -> Bernoulli`` with event shape ``[]`` (e.g. the continue flag)."""

    def __init__(self, in_dim: int, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.net = MLP(in_dim, 1, hidden, layers)

    def forward(self, feat: torch.Tensor) -> Bernoulli:
        return Bernoulli(logits=self.net(feat).squeeze(-1), validate_args=False)
