"""A whole update captured once in a CUDA graph and replayed on every new batch.

On a GPU a Dreamer update is launch-bound: the RSSM scan over T steps and the imagination over
H steps issue thousands of small kernels, each costing more to launch from Python than to run.
Replaying one captured graph launches all of them at once. This is the whole-network capture
of the PyTorch CUDA-graph notes (``torch.cuda.graph`` around forward, backward and optimiser
steps), with three things those notes leave to the user:

* warm-up iterations (needed so that lazy state such as Adam's moments exists before capture)
  would change the weights; :class:`CudaGraphed` snapshots modules and optimisers first and
  restores them in place afterwards, so the first replay is the first real update (and it puts
  the CUDA generator back where it was, so the first replay draws the same random numbers);
* optimisers are switched to ``capturable`` (their step counters move to the GPU) and, for
  Adam, to the fused kernel;
* the outputs of a replay are overwritten by the next one, so ``__call__`` returns clones.

The update must not synchronise with the host (no ``.item()``, no ``if tensor:``, no
host-to-device copies of fresh tensors): ``tests/test_cuda_graph.py`` checks that for our agent
by running its update on the meta device, where any such call raises.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable

import torch
from tensordict import TensorDictBase
from torch import nn

Update = Callable[[TensorDictBase], dict[str, torch.Tensor]]


#: The param-group settings of an optimiser that capture changes (and loading restores).
GROUP_FLAGS = ("capturable", "fused", "foreach")


def make_capturable(optimizer: torch.optim.Optimizer, fused: bool = True) -> Callable[[], None]:
    """Switch ``optimizer`` to graph-capturable steps (in place): ``capturable=True`` in every
    param group, step counters moved next to their parameters, and Adam's fused kernel.

    Returns a function that switches it back (a failed capture falls back to eager updates,
    which should not run, nor be checkpointed, with the graph's settings). Raises
    ``TypeError`` for optimisers without a ``capturable`` option.
    """
    if "capturable" not in optimizer.defaults:
        raise TypeError(
            f"{type(optimizer).__name__} cannot be captured in a CUDA graph (no 'capturable' "
            "option); use torch.optim.Adam or AdamW."
        )
    groups = [{k: group[k] for k in GROUP_FLAGS if k in group} for group in optimizer.param_groups]
    steps = {}
    use_fused = fused and "fused" in optimizer.defaults
    for group in optimizer.param_groups:
        group["capturable"] = True
        if use_fused:
            group["fused"], group["foreach"] = True, False
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                steps[p] = (state["step"].device, state["step"].dtype)
                # Capturable (and fused) Adam keep the step count as a float32 on the device.
                state["step"] = state["step"].to(p.device, torch.float32)

    def undo() -> None:
        restore_flags(optimizer, groups, steps)

    return undo


def restore_flags(
    optimizer: torch.optim.Optimizer,
    flags: list[dict],
    steps: dict[torch.Tensor, tuple[torch.device, torch.dtype]] | None = None,
) -> None:
    """Give each param group of ``optimizer`` its ``flags`` (one dict of :data:`GROUP_FLAGS`
    per group) again, with the step counters where torch keeps them for those: the device and
    dtype recorded in ``steps`` for a parameter listed there, else on the CPU unless capturable
    or fused (a device counter would be read back with ``.item()`` at every eager step)."""
    steps = steps or {}
    for group, group_flags in zip(optimizer.param_groups, flags):  # groups added later: kept
        group.update(group_flags)
        on_device = bool(group_flags.get("capturable") or group_flags.get("fused"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not (state and torch.is_tensor(state.get("step"))):
                continue
            if p in steps:
                state["step"] = state["step"].to(*steps[p])
            elif on_device:
                state["step"] = state["step"].to(p.device, torch.float32)
            else:
                state["step"] = state["step"].to("cpu", torch.get_default_dtype())


class _Snapshot:
    """In-place copies of module tensors and optimiser states, restorable without changing
    any tensor's address (a captured graph keeps reading the same memory)."""

    def __init__(self, modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer]):
        # parameters() and buffers(), not state_dict(): agents override state_dict, and
        # non-persistent buffers change too.
        self.tensors = [
            (t, t.detach().clone()) for m in modules for t in (*m.parameters(), *m.buffers())
        ]
        self.optimizers = list(optimizers)
        self.opt_states = [
            {
                p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                for p, s in o.state.items()
            }
            for o in self.optimizers
        ]

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self.tensors:
            live.detach().copy_(saved)
        for opt, before in zip(self.optimizers, self.opt_states):
            for p, state in opt.state.items():
                saved = before.get(p)
                for k, v in state.items():
                    if not torch.is_tensor(v):
                        continue
                    if saved is None:
                        # Created by the warm-up: zeros are Adam's fresh state (step 0, m = v = 0).
                        v.zero_()
                    else:
                        v.copy_(saved[k])


class CudaGraphed:
    """``fn(batch)`` captured once in a CUDA graph; calling copies a new batch into the graph's
    input buffers and replays it.

    Args:
        fn: the update, ``batch -> {name: tensor}`` (e.g. ``DreamerAgent.train_step``); it must
            not synchronise with the host.
        example: a batch with the shapes, dtypes and device of every later batch (a
            ``TensorDict`` ``[B, T]`` on CUDA); copied, not kept.
        modules: every module whose parameters or buffers ``fn`` changes (restored after the
            warm-up).
        optimizers: the optimisers ``fn`` steps; made capturable (:func:`make_capturable`).
        warmup: eager iterations on a side stream before the capture (cuBLAS / cuDNN handles,
            autograd's and the optimisers' lazy state).
        fused: use fused Adam kernels.

    Calling with a batch of another shape, dtype or key set raises ``ValueError``.
    """

    def __init__(
        self,
        fn: Update,
        example: TensorDictBase,
        modules: Iterable[nn.Module],
        optimizers: Iterable[torch.optim.Optimizer],
        warmup: int = 3,
        fused: bool = True,
    ) -> None:
        if example.device is None or example.device.type != "cuda":
            raise ValueError(
                f"CUDA-graph updates need the batch on a CUDA device, got {example.device}; "
                "use the eager update on CPU."
            )
        modules, optimizers = list(modules), list(optimizers)
        device = example.device
        stream = torch.cuda.current_stream(device)
        undo, snapshot, rng = [], None, None
        try:
            for opt in optimizers:
                undo.append(make_capturable(opt, fused=fused))
            self.static = example.clone()
            self._signature = _signature(self.static)
            snapshot = _Snapshot(modules, optimizers)
            rng = torch.cuda.get_rng_state(device)
            # Everything on the batch's device, the capture stream included: torch.cuda.graph's
            # default capture stream is made once, on whichever device is current then, and the
            # kernels of a cuda:1 update would not land in a capture on a cuda:0 stream (the
            # graph would replay nothing).
            with torch.cuda.device(device):
                side = torch.cuda.Stream(device=device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side), warnings.catch_warnings():
                    # Each capturable optimiser warns that it steps outside a capture here.
                    warnings.filterwarnings("ignore", message=".*capturable=True.*")
                    for _ in range(max(int(warmup), 1)):
                        fn(self.static)
                torch.cuda.current_stream(device).wait_stream(side)
                snapshot.restore()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, stream=side):
                    self.out = fn(self.static)
                # Warm-up and capture drew from the CUDA generator; put it back, so the first
                # replay draws what an eager update at this point would (each replay reads the
                # generator's state and advances it by the graph's total draw), and a resumed
                # run, which captures again, draws the same numbers as the uninterrupted one.
                torch.cuda.set_rng_state(rng, device)
        except BaseException:
            # A failed warm-up or capture leaves the weights and optimisers as they were: wait
            # for whatever the side stream still runs (if the device still answers), then
            # restore. When capture_end raises, torch.cuda.graph's exit never gives the
            # batch device's stream back (the fallback's eager updates would run on the side
            # stream); set_stream also makes that device current, so inside its device context.
            with contextlib.suppress(Exception), torch.cuda.device(device):
                torch.cuda.set_stream(stream)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(device)
            if rng is not None:
                with contextlib.suppress(Exception):
                    torch.cuda.set_rng_state(rng, device)
            try:
                if snapshot is not None:
                    snapshot.restore()
            finally:
                for revert in reversed(undo):  # last switched, first put back
                    revert()
            raise

    def __call__(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        if _signature(batch) != self._signature:
            raise ValueError(
                "a CUDA-graph update replays fixed shapes: got a batch with "
                f"{_signature(batch)}, captured with {self._signature}."
            )
        self.static.update_(batch, non_blocking=True)
        self.graph.replay()
        # The next replay overwrites these tensors in place; callers may keep what we return.
        return {k: v.clone() for k, v in self.out.items()}


def _signature(batch: TensorDictBase) -> tuple:
    """Keys, shapes and dtypes of every leaf, sorted (what a replay needs to be valid)."""
    return tuple(
        sorted(
            (str(k), tuple(v.shape), str(v.dtype))
            for k, v in batch.items(include_nested=True, leaves_only=True)
        )
    )


def graph_train_step(agent, example: TensorDictBase, warmup: int = 3) -> CudaGraphed:
    """``agent.train_step`` (a :class:`~agents.dreamer.DreamerAgent`) as a :class:`CudaGraphed`
    update: the agent's modules and its three optimisers."""
    return CudaGraphed(
        agent.train_step, example, [agent], list(agent.optimizers.values()), warmup=warmup
    )
