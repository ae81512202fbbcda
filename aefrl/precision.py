"""Mixed precision of the updates (``agent.autocast``): the network trunks in bfloat16,
everything between them in float32.

With ``agent.autocast=bf16`` the MLPs and conv trunks of :mod:`aefrl.nn` run under bf16
autocast inside the updates' loss forwards — their products, norms and activations — and hand
their outputs back in float32. Everything between the trunks stays float32: distributions and
their log-densities, the AEF's affine layers and log-determinants, the GRU, two-hot encodings,
λ-returns and the losses. An autocast around whole loss forwards would not do that on the CPU:
CPU autocast, unlike CUDA's, runs ``log_softmax``, ``layer_norm``, ``exp``, ``log`` and sums in
bf16 when their input is bf16, which computed the KL and entropy terms to three significant
digits. Trunks on fewer than :data:`MIN_ROWS` rows (the RSSM's per-step MLPs on a batch of 16,
acting) stay float32: there the casts cost more than bf16 saves. Parameters, gradients and
optimiser states are float32 throughout; acting and reports run in float32.

Whether it pays depends on the CPU: on the project's AMD EPYC VM bf16 products run at 2.1-4.1x
float32's rate and one update 1.38x faster (1.13x at the ``exp=cpu`` sizes), on its Intel Xeon
VM (which also reports AVX-512 BF16) products run at 0.54-0.60x (docs/benchmarks.md, finding 9),
so the default is ``"none"``.
"""

from __future__ import annotations

import contextlib

import torch

#: The values of ``agent.autocast``.
AUTOCAST_MODES = ("none", "bf16")
#: Rows (samples) from which a trunk runs in the reduced precision.
MIN_ROWS = 256

# The trunks' dtype inside trunk_precision (None: unchanged). A module-level dict, not a
# ContextVar: torch.compile cannot trace ContextVar.get, which broke every compiled RSSM step
# into seven graphs (six graph breaks per step); a dict entry it reads and guards on. The
# updates run on one thread, so nothing needs a per-thread or per-task value.
_TRUNK = {"dtype": None}


def check_autocast(mode) -> str:
    """``mode`` if it is one of :data:`AUTOCAST_MODES`, else one-sentence ValueError."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got {mode!r}")
    return mode


@contextlib.contextmanager
def trunk_precision(mode: str):
    """Within the body, :func:`run_trunk` runs trunks in bf16 (``mode="bf16"``) or unchanged."""
    before = _TRUNK["dtype"]
    _TRUNK["dtype"] = torch.bfloat16 if check_autocast(mode) == "bf16" else None
    try:
        yield
    finally:
        _TRUNK["dtype"] = before


def run_trunk(forward, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``forward(x)``; inside ``trunk_precision("bf16")`` and for at least :data:`MIN_ROWS`
    ``rows``, under bf16 autocast (without the weight cast cache, which a CUDA-graph capture
    cannot keep) with the result cast back to ``x``'s dtype."""
    dtype = _TRUNK["dtype"]
    if dtype is None or rows < MIN_ROWS:
        return forward(x)
    with torch.autocast(x.device.type, dtype=dtype, cache_enabled=False):
        y = forward(x)
    return y.to(x.dtype)
