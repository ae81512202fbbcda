"""One spelling per torch device, so devices named by users compare equal to tensors' own."""

from __future__ import annotations

import torch


def canonical_device(device) -> torch.device:
    """The device as tensors on it report theirs: ``"cuda"`` -> ``cuda:<current>``,
    ``"cpu:0"`` -> ``cpu``. ``torch.device("cuda") != torch.device("cuda:0")``, so a check of a
    user's ``"cuda"`` against a model's parameters needs this first (without CUDA, ``"cuda"``
    stays as it is, for the caller's own error). Raises what ``torch.device`` raises for a bad
    name."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        return torch.device("cpu")
    return device
