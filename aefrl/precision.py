"""Mixed precision of the updates: bf16 autocast around the loss forwards (``agent.autocast``).

Under ``torch.autocast`` matmuls and convolutions run in bfloat16 while reductions, logs,
softmaxes and the losses stay in float32 (PyTorch's autocast op lists); the parameters, their
gradients and the optimiser states stay float32, and backward runs outside the context, in the
dtypes the forward chose. Acting and reports stay float32. Whether it pays depends on the CPU:
on the project's AMD EPYC VM bf16 products run at 2.0-4.0x float32's rate and a whole update
1.4x faster, on its Intel Xeon VM (which also reports AVX-512 BF16) at 0.54-0.60x
(docs/benchmarks.md, finding 9), so the default is ``"none"``.
"""

from __future__ import annotations

import contextlib

import torch

#: The values of ``agent.autocast``.
AUTOCAST_MODES = ("none", "bf16")


def check_autocast(mode) -> str:
    """``mode`` if it is one of :data:`AUTOCAST_MODES`, else one-sentence ValueError."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got {mode!r}")
    return mode


def autocast(mode: str, device: torch.device):
    """The context the loss forwards of an update run in on ``device``: bf16 autocast (without
    the weight cast cache, which a CUDA-graph capture cannot keep) or nothing."""
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()
