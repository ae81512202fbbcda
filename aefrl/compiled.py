"""``torch.compile`` where it can pay: the per-step functions of the sequential loops and the
MLP heads, not the loops themselves.

A whole loss module compiles to a graph unrolled over T = 64 filtering steps and H = 15
imagination steps (minutes of compilation, recompiled for every new T); compiling one RSSM step
and the heads instead fuses what runs inside them (LayerNorm + SiLU, the GRU gates, the
reparameterised sample) once, and the loops call the fused code. On a GPU this cuts the kernels
per update that a CUDA graph (``aefrl/cuda_graph.py``) replays; on this project's CPU it does not
pay (docs/benchmarks.md, finding 9), so it is off by default (``agent.compile``).

Parameter names are unchanged (methods are replaced on the instances, MLPs compiled in place with
``nn.Module.compile``), so checkpoints of compiled and eager agents are interchangeable.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter

import torch
from torch import nn

#: The RSSM methods :func:`compile_steps` replaces on the instance.
COMPILED_METHODS = ("filter_step", "img_step")


def compile_steps(world_model: nn.Module, *mlp_owners: nn.Module, **options) -> None:
    """Compile ``world_model.rssm``'s ``filter_step`` and ``img_step`` and the ``net`` MLP of the
    world model's reward and continue heads and of every module in ``mlp_owners`` (actor,
    critic, slow critic copy), in place. ``options`` go to ``torch.compile`` (default:
    ``dynamic=False``: the loops call each with one fixed shape; the REINFORCE actor loss adds
    one, the actor batched over all imagined states)."""
    options = {"dynamic": False, **options}
    # Every MLP owner's forward is one code object, compiled per owner, shape and grad mode
    # (training, acting, imagination, reports): a tiny agent's first update, act and report
    # already made 8 variants of it, dynamo's default limit, past which it runs eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    rssm = world_model.rssm
    for name in COMPILED_METHODS:
        setattr(rssm, name, torch.compile(getattr(rssm, name), **options))
    for owner in (world_model.reward_head, world_model.continue_head, *mlp_owners):
        owner.net.compile(**options)


def eager_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that runs on its own parameters, eagerly.

    ``copy.deepcopy`` drops ``nn.Module.compile``'s callable by itself (``Module.__getstate__``)
    but keeps the RSSM methods :func:`compile_steps` replaced on the instance, and those are
    bound to the *original*: the copy would filter with the original's weights, follow its
    training and stay on its device. This copy drops them too."""
    dup = copy.deepcopy(module)
    for sub in dup.modules():
        for name in COMPILED_METHODS:
            sub.__dict__.pop(name, None)  # the class's method again
    return dup


class RecompileLimitWatch(logging.Handler):
    """Names the functions that hit dynamo's recompile limit, from its warning.

    Past the limit dynamo runs that function eagerly from then on and says so once, in a log line
    that a benchmark's result file would not show: a compiled timing could then be partly eager.
    :func:`compile_stats` counts the hits from dynamo's own counters (whatever the logging
    settings) and takes their names from here (none where ``TORCH_LOGS`` silences dynamo's
    warnings). Attach it with :meth:`install` (idempotent; one per process).
    """

    _LOGGER = "torch._dynamo.convert_frame"
    _PATTERN = re.compile(r"hit config\.\w*(recompile|cache_size)_limit")
    _FUNCTION = re.compile(r"function: '([^']+)' \((.*?:\d+)\)")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self._PATTERN.search(message):
            found = self._FUNCTION.search(message)
            # name and place: every module's function is called forward
            where = f"{found.group(1)} ({_short_place(found.group(2))})" if found else "?"
            self.hits[where] += 1

    @classmethod
    def find(cls) -> RecompileLimitWatch | None:
        return next(
            (h for h in logging.getLogger(cls._LOGGER).handlers if isinstance(h, cls)), None
        )

    @classmethod
    def install(cls) -> RecompileLimitWatch:
        handler = cls.find()
        if handler is None:
            handler = cls()
            logging.getLogger(cls._LOGGER).addHandler(handler)
        return handler


def _short_place(place: str) -> str:
    """``/long/path/aefrl/nn.py:97`` -> ``aefrl/nn.py:97`` (the last two path parts)."""
    return "/".join(place.replace("\\", "/").split("/")[-2:])


# dynamo counts each function past the limit once, under an "unsupported" reason worded by
# version: "Dynamo recompile limit exceeded" (2.13), "Dynamo cache limit exceeded" (earlier
# graph-break registry), "recompile_limit reached" / "accumulated_cache_size_limit reached"
# (older RecompileLimitExceeded)
_LIMIT_REASON = re.compile(r"(recompile|cache)(_size)?[ _]limit (exceeded|reached)")


def compile_stats() -> dict:
    """What dynamo did in this process so far: ``{"unique_graphs", "recompile_limit_hits",
    "functions_past_limit"}``.

    A compiled timing is only what it says when ``recompile_limit_hits`` is 0: past the limit a
    function runs eagerly for good. The hits are dynamo's own count; the names (``"forward
    (aefrl/nn.py:97)"``) come from :class:`RecompileLimitWatch`'s reading of its warnings, so
    they are listed only when the watch was installed before compiling and the warnings were not
    silenced. (Graph breaks are not counted here: dynamo's counters file the data-dependent ones
    with other unsupported constructs; ``torch._dynamo.explain`` counts them per function.)"""
    from torch._dynamo.utils import counters

    hits = sum(n for why, n in counters["unimplemented"].items() if _LIMIT_REASON.search(why))
    watch = RecompileLimitWatch.find()
    names = sorted(watch.hits) if watch is not None else []
    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        # a torch whose counter wording this misses still names them in its warning
        "recompile_limit_hits": int(max(hits, len(names))),
        "functions_past_limit": names,
    }
