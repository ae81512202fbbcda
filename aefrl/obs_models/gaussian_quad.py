"""The decoder likelihood's quadratic term with a hand-written backward.

``Σ_i m_i ((y_i − μ_i) / σ_i)²`` over the event axes of an image batch is the one part of the
world-model loss that touches every pixel (16 x 50 x 3 x 64 x 64 = 9.8 M values at the benchmark's
sizes). Autograd of the composite ``((y − μ) / σ).square().sum()`` makes about ten full passes
over the batch backward (pow, the two-sided div, neg); this function makes four, from the one
saved tensor ``r = m ⊙ (y − μ) / σ``:

    ∂/∂μ = −2 g r / σ =: t,      ∂/∂y = −t,      ∂/∂σ = Σ_broadcast t ⊙ r   (= −2 g r² / σ)

with ``g`` the incoming gradient of each sample's sum, and every gradient summed back to its
input's (broadcast) shape. The forward's sum of squares is a 2-norm reduction (one read, no
squared copy). Inputs broadcast like the composite; layouts (channels-last) are kept.
"""

from __future__ import annotations

import torch


class _GaussianQuad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, mu, sigma, mask, event: int):
        r = _inplace_if_same_shape(y - mu, torch.Tensor.div_, torch.div, sigma)
        if mask is not None:
            r = _inplace_if_same_shape(r, torch.Tensor.mul_, torch.mul, mask)
        ctx.save_for_backward(r, sigma)
        ctx.shapes, ctx.event = (y.shape, mu.shape, sigma.shape), event
        ctx.dtypes = (y.dtype, mu.dtype, sigma.dtype)
        axes = tuple(range(-event, 0))
        return torch.linalg.vector_norm(r, 2, dim=axes).square()

    @staticmethod
    def backward(ctx, grad):
        r, sigma = ctx.saved_tensors
        y_shape, mu_shape, sigma_shape = ctx.shapes
        coef = (-2.0 * grad).reshape(*grad.shape, *([1] * ctx.event))
        t = (r * coef).div_(sigma)  # ∂/∂μ, before summing to μ's shape
        need_y, need_mu, need_sigma = ctx.needs_input_grad[:3]
        y_dtype, mu_dtype, sigma_dtype = ctx.dtypes
        grad_sigma = (t * r).sum_to_size(sigma_shape).to(sigma_dtype) if need_sigma else None
        grad_y = (-t).sum_to_size(y_shape).to(y_dtype) if need_y else None
        grad_mu = t.sum_to_size(mu_shape).to(mu_dtype) if need_mu else None
        return grad_y, grad_mu, grad_sigma, None, None


def _inplace_if_same_shape(x, inplace, outofplace, other):
    """``inplace(x, other)`` when the result keeps ``x``'s shape (saves a full-size buffer),
    else ``outofplace(x, other)`` (``other`` broadcasts ``x`` up)."""
    if torch.broadcast_shapes(x.shape, other.shape) == x.shape:
        return inplace(x, other)
    return outofplace(x, other)


def gaussian_quad(
    y: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    event: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_event (mask ⊙ (y − μ) / σ)²``: ``y``, ``mu``, ``sigma`` (and ``mask``, 0/1) broadcast
    to ``[..., *event_shape]``; returns ``[...]``. The mask is not differentiated."""
    sigma = torch.as_tensor(sigma, dtype=torch.result_type(y, mu), device=y.device)
    return _GaussianQuad.apply(y, mu, sigma, mask, int(event))


__all__ = ["gaussian_quad"]
