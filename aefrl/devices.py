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


def usable_device(name, option: str = "device=", other_types: bool = False) -> torch.device:
    """The device ``name`` (``auto`` for CUDA when there is one, ``cpu``, ``cuda``, ``cuda:N``,
    or a ``torch.device``), checked against this machine; a ValueError says in one sentence what
    was wrong, naming the setting as ``option`` (``device=`` for Hydra, ``--device `` for
    argparse, ``map_location=`` for a loader). ``other_types``: let torch's other device types
    through unchecked (a loader's ``meta`` or ``mps``; training runs on CPU or CUDA only)."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if not isinstance(name, str):  # device=null, device=0: torch takes 0 as cuda:0
            raise RuntimeError
        device = torch.device(name)
    except RuntimeError:
        shown = "null" if name is None else name  # as the configuration spells it
        message = f"{option}{shown} is not a device: use auto, cpu, cuda or cuda:N"
        raise ValueError(message) from None
    if device.type not in ("cpu", "cuda") and not other_types:
        raise ValueError(f"{option}{name} is not supported: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}{name} was asked for but CUDA is not available; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(
            f"{option}{name} names a GPU this machine does not have: it has {count} "
            f"(cuda:0 to cuda:{count - 1})"
        )
    return device
