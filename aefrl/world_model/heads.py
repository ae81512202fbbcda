"""Prediction heads that return distributions with the same methods (``mean``, ``log_prob``).

The agent never special-cases a head: reward and critic are symlog two-hot categoricals
(DreamerV3), the continue flag is a Bernoulli. Every head is trained on ``−log_prob(target)``.
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


class TwoHot:
    """Categorical over fixed bins in symlog space, scored on real targets by two-hot encoding.

    ``logits [..., K]``, ``bins [K]`` (increasing, symlog space). ``mean`` and ``log_prob`` take
    and return real values with shape ``[...]``.
    """

    def __init__(self, logits: torch.Tensor, bins: torch.Tensor) -> None:
        self.logits = logits
        self.bins = bins

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    @property
    def mean(self) -> torch.Tensor:
        """``symexp(Σ_k p_k b_k)``, ``[...]``."""
        return symexp((self.probs * self.bins).sum(-1))

    def log_prob(self, target: torch.Tensor) -> torch.Tensor:
        """``Σ_k twohot(symlog(target))_k · log p_k``, ``[...]``."""
        return (two_hot(symlog(target), self.bins) * self.logits.log_softmax(-1)).sum(-1)


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
    """``feat [..., F] -> TwoHot`` over ``bins`` bins in ``[-limit, limit]`` (symlog space).

    The output layer starts at zero, so initial predictions are exactly 0 (DreamerV3).
    """

    def __init__(
        self, in_dim: int, hidden: int = 256, layers: int = 2, bins: int = 255, limit: float = 20.0
    ) -> None:
        super().__init__()
        bins = check_size("bins", bins, 2)
        self.net = MLP(in_dim, bins, hidden, layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("bins", torch.linspace(-limit, limit, bins))

    def forward(self, feat: torch.Tensor) -> TwoHot:
        return TwoHot(self.net(feat), self.bins)


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
