"""CUDA-graph updates (aefrl/cuda_graph.py).

Capture itself needs a GPU; on the CPU we check what makes it valid: the update never
synchronises with the host (run on the meta device, where every ``.item()`` / ``bool(tensor)``
raises) and never builds a device tensor from host data (``torch.tensor(1.0, device=...)`` is a
blocking host-to-device copy on a GPU, but takes a shortcut on the meta device, so the test
refuses it itself), the warm-up snapshot restores modules and optimisers in place, the
optimiser switch, and (with a stand-in for ``torch.cuda``) that warm-up and capture run on the
batch's device. The GPU test compares the graphed update with the eager one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import pytest
import torch
import torchrl.modules.distributions.continuous as tanh_normal_module
from tensordict import TensorDict

from aefrl import keys, precision
from aefrl.bench.subjects import Sizes, ours_agent_kwargs, random_batch
from aefrl.cuda_graph import CudaGraphed, _Snapshot, graph_train_step, make_capturable
from agents.factory import build_agent
from scripts.bench import load_config

SIZES = Sizes(latent=3, deter=8, hidden=16, depth=4, batch=2, seq=4, horizon=3)


def small_agent(
    kind: str,
    device="cpu",
    actnorm: bool = False,
    actor_dist="tanh_normal",
    autocast: str = "none",
    compile: bool = False,
    gradient: str = "backprop",
    value_loss: dict | None = None,
):
    agent, obs = ours_agent_kwargs(SIZES, kind, *load_config(kind))
    agent["value_loss"].update(value_loss or {})
    agent["world_model"]["actnorm"] = actnorm
    agent["actor"]["dist"] = actor_dist
    agent["actor_loss"]["gradient"] = gradient
    agent["autocast"], agent["compile"] = autocast, compile
    # Built on the CPU, then moved (the optimisers keep the same Parameter objects).
    return build_agent(agent, obs, (3, 64, 64), SIZES.action_dim).to(device)


def test_the_meta_device_catches_host_synchronisation():
    """The premise of the next test: reading a meta tensor's value raises."""
    x = torch.ones(2, device="meta")
    with pytest.raises(RuntimeError):
        bool(x.sum() > 0)
    with pytest.raises(RuntimeError):
        x.sum().item()


def _refuse_host_data(monkeypatch) -> None:
    """Make ``torch.tensor`` / ``torch.as_tensor`` raise when they would copy host data (a
    number, a list, a CPU tensor) to the meta device, as the same call on a GPU would copy it
    with a stream synchronisation that breaks a capture."""

    def refusing(name, factory):
        @functools.wraps(factory)
        def create(data, *args, **kwargs):
            positional = args[1] if name == "as_tensor" and len(args) > 1 else None
            device = kwargs.get("device", positional)
            on_host = not torch.is_tensor(data) or data.device.type == "cpu"
            if device is not None and torch.device(device).type == "meta" and on_host:
                raise RuntimeError(f"torch.{name} copies host data to the device: {data!r}")
            return factory(data, *args, **kwargs)

        return create

    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, refusing(name, getattr(torch, name)))
    # torch.device(...) contexts recognise factories by a cached set of the functions: one
    # filled in while the wrappers stand in would leave the real torch.tensor out of it after
    # the test (later tests' torch.tensor(...) under torch.device("meta") stayed on the CPU).
    # A fresh cache for the test; the original comes back with the rest.
    device_module = torch.utils._device
    constructors = device_module._device_constructors
    monkeypatch.setattr(
        device_module, "_device_constructors", functools.cache(constructors.__wrapped__)
    )


def test_the_host_data_check_catches_copies_to_the_device(monkeypatch):
    """The premise of the next test's second check."""
    _refuse_host_data(monkeypatch)
    with pytest.raises(RuntimeError, match="host data"):
        torch.as_tensor(1.0, device="meta")
    with pytest.raises(RuntimeError, match="host data"):
        torch.tensor([1, 2], device=torch.device("meta"))
    meta = torch.ones(2, device="meta")
    assert torch.as_tensor(meta, device="meta") is meta  # already there: no copy
    assert torch.tensor(1.0).device.type == "cpu"  # host tensors stay allowed


@pytest.mark.parametrize(
    ("kind", "actnorm", "actor_dist", "gradient"),
    [
        ("aef", False, "tanh_normal", "backprop"),
        ("vae", False, "tanh_normal", "backprop"),
        ("aef_partition", False, "tanh_normal", "backprop"),
        ("aef", True, "tanh_normal", "backprop"),
        ("aef", False, "bounded_normal", "backprop"),
        ("aef", False, "tanh_normal", "reinforce"),
        ("aef", False, "bounded_normal", "reinforce"),
    ],
)
def test_train_step_never_synchronises_with_the_host(
    kind, actnorm, actor_dist, gradient, monkeypatch
):
    # torchrl's TanhNormal skips its argument checks (which read values) while a stream is
    # capturing; tell it so, as a real capture would.
    monkeypatch.setattr(tanh_normal_module, "safe_is_current_stream_capturing", lambda: True)
    _refuse_host_data(monkeypatch)
    torch.manual_seed(0)
    agent = small_agent(
        kind, device="meta", actnorm=actnorm, actor_dist=actor_dist, gradient=gradient
    )
    batch = random_batch(SIZES).to("meta")
    for _ in range(2):  # the second call takes the initialised branches (return scale, Adam)
        metrics = agent.train_step(batch)
    assert metrics["loss_actor"].device.type == "meta"


@pytest.mark.parametrize("repval_grad", [False, True])
def test_the_replay_value_paths_never_synchronise_with_the_host(repval_grad, monkeypatch):
    """agent.value_loss.repval (the critic's loss on the replayed window) and repval_grad (its
    gradient into the world model, which then steps with the critic)."""
    monkeypatch.setattr(tanh_normal_module, "safe_is_current_stream_capturing", lambda: True)
    _refuse_host_data(monkeypatch)
    torch.manual_seed(0)
    value_loss = {"repval": 0.3, "repval_grad": repval_grad}
    agent = small_agent("aef", device="meta", value_loss=value_loss)
    batch = random_batch(SIZES).to("meta")
    for _ in range(2):
        metrics = agent.train_step(batch)
    assert metrics["loss_repval"].device.type == "meta"
    assert metrics["grad_norm_model"].device.type == "meta"


def test_the_replay_context_path_never_synchronises_with_the_host(monkeypatch):
    """agent.replay_context: the stored start, the returned contexts and the batch's int64
    row ids stay on the device too."""
    monkeypatch.setattr(tanh_normal_module, "safe_is_current_stream_capturing", lambda: True)
    _refuse_host_data(monkeypatch)
    torch.manual_seed(0)
    agent = small_agent("vae", device="meta")
    agent.replay_context = True
    batch = random_batch(SIZES)
    b, t = batch.shape
    batch[keys.CONTEXT_BELIEF] = torch.randn(b, t, agent.world_model.rssm.deter)
    batch[keys.CONTEXT_STATE] = torch.randn(b, t, agent.world_model.rssm.latent_dim)
    batch[keys.REPLAY_ID] = torch.arange(b * t).view(b, t)
    batch = batch.to("meta")
    for _ in range(2):
        out = agent.train_step(batch)
    assert out[keys.CONTEXT_BELIEF].shape == (b, t - 1, agent.world_model.rssm.deter)
    assert out[keys.CONTEXT_STATE].device.type == "meta"


def _agent_tensors(agent):
    return [t.detach().clone() for t in (*agent.parameters(), *agent.buffers())]


def _adam_tensors(agent):
    return {
        name: [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
        for name, opt in agent.optimizers.items()
    }


def test_snapshot_restores_modules_and_optimisers_in_place():
    torch.manual_seed(0)
    agent = small_agent("aef")
    batch = random_batch(SIZES)
    agent.train_step(batch)  # Adam state exists before the snapshot
    params, adam = _agent_tensors(agent), _adam_tensors(agent)
    pointers = [t.data_ptr() for t in (*agent.parameters(), *agent.buffers())]
    snap = _Snapshot([agent], agent.optimizers.values())
    for _ in range(2):
        agent.train_step(batch)
    changed = _agent_tensors(agent)
    assert any(not torch.equal(a, b) for a, b in zip(params, changed))
    snap.restore()
    for before, now in zip(params, _agent_tensors(agent)):
        torch.testing.assert_close(now, before, rtol=0, atol=0)
    assert pointers == [t.data_ptr() for t in (*agent.parameters(), *agent.buffers())]
    for name, states in _adam_tensors(agent).items():
        for before, now in zip(adam[name], states):
            for k in before:
                torch.testing.assert_close(now[k], before[k], rtol=0, atol=0)


def test_snapshot_zeroes_optimiser_state_created_after_it():
    torch.manual_seed(0)
    agent = small_agent("vae")
    snap = _Snapshot([agent], agent.optimizers.values())  # fresh: no Adam state yet
    agent.train_step(random_batch(SIZES))
    snap.restore()
    state = next(iter(agent.optimizers["model"].state.values()))
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(state)
    for v in state.values():
        assert not v.any()  # Adam's fresh state: step 0, zero moments


def test_make_capturable_switches_adam_and_refuses_others():
    p = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    adam.step()
    adam.state[p]["step"] = torch.tensor(1.0, dtype=torch.float64)  # visible when cast
    q = torch.nn.Parameter(torch.ones(2))  # no state yet: the warm-up will make it
    adam.add_param_group({"params": [q]})
    before = dict(adam.param_groups[0])
    undo = make_capturable(adam)
    group = adam.param_groups[0]
    assert group["capturable"] and group["fused"] and not group["foreach"]
    assert adam.state[p]["step"].dtype == torch.float32
    # The warm-up's state: a capturable step, on the GPU (here a float64 stands for "not
    # where eager Adam keeps it", which is a CPU float32)
    adam.state[q]["step"] = torch.tensor(1.0, dtype=torch.float64)
    late = torch.nn.Parameter(torch.ones(4))  # a group added after the switch: left as it is
    adam.add_param_group({"params": [late]})
    late_flags = {k: adam.param_groups[2][k] for k in ("capturable", "fused", "foreach")}
    undo()  # what a failed capture does before the eager fallback (and its checkpoints)
    assert adam.param_groups[0] == before
    assert {k: adam.param_groups[2][k] for k in late_flags} == late_flags
    assert adam.state[p]["step"].dtype == torch.float64 and adam.state[p]["step"] == 1
    step = adam.state[q]["step"]
    assert step.device.type == "cpu" and step.dtype == torch.float32 and step == 1
    with pytest.raises(TypeError, match="cannot be captured"):
        make_capturable(torch.optim.SGD([p], lr=0.1))


def test_graphs_need_a_cuda_batch():
    agent = small_agent("aef")
    with pytest.raises(ValueError, match="CUDA device"):
        graph_train_step(agent, random_batch(SIZES))


def _index(device) -> int:
    return torch.device(device).index


class _FakeCuda:
    """Just enough of ``torch.cuda`` to run :class:`CudaGraphed` on the CPU: tracks the current
    device and stream as torch does (entering a stream's context also makes its device current;
    ``torch.cuda.graph`` without ``stream`` captures on a stream of the current device) and
    counts replays."""

    def __init__(self, monkeypatch, current: int) -> None:
        self.current, self.stream, self.capturing, self.replays = current, None, False, 0
        self.rng = {}  # device index -> draws so far (the generator's offset)
        fake = self

        class Stream:
            def __init__(self, device=None, priority=0):
                index = fake.current if device is None else torch.device(device).index
                self.device = torch.device("cuda", index)

            def wait_stream(self, other) -> None:
                pass

        @contextlib.contextmanager
        def device(dev):
            before, fake.current = fake.current, torch.device(dev).index
            try:
                yield
            finally:
                fake.current = before

        @contextlib.contextmanager
        def stream(s):
            before = fake.current, fake.stream
            fake.current, fake.stream = s.device.index, s
            try:
                yield
            finally:
                fake.current, fake.stream = before

        class CUDAGraph:
            def replay(self) -> None:
                fake.replays += 1

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None, **kwargs):
            # As torch.cuda.graph's __exit__: capture_end runs first, and when the capture was
            # spoiled it raises before the caller's stream is made current again.
            before = fake.current, fake.stream
            s = stream or Stream()
            fake.current, fake.stream, fake.capturing = s.device.index, s, True
            try:
                yield
            except BaseException:
                fake.capturing = False
                raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904 (chained implicitly, as torch's is)
            fake.capturing = False
            fake.current, fake.stream = before

        def set_stream(s) -> None:
            fake.current = s.device.index
            fake.stream = None if getattr(s, "default", False) else s

        def current_stream(device=None):
            if fake.stream is not None:
                return fake.stream
            default = Stream(device)
            default.default = True  # the device's default stream (where() shows it as None)
            return default

        fakes = {
            "Stream": Stream,
            "device": device,
            "stream": stream,
            "current_stream": current_stream,
            "set_stream": set_stream,
            "synchronize": lambda device=None: None,
            "CUDAGraph": CUDAGraph,
            "graph": graph,
            "get_rng_state": lambda device: torch.tensor([fake.rng.get(_index(device), 0)]),
            "set_rng_state": lambda state, device: fake.rng.__setitem__(_index(device), int(state)),
        }
        for name, value in fakes.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def draw(self) -> None:
        """One random draw on the current device."""
        self.rng[self.current] = self.rng.get(self.current, 0) + 1

    def where(self) -> tuple:
        """(current device, device of the current stream, capturing?)"""
        return self.current, self.stream and self.stream.device.index, self.capturing


def test_warm_up_and_capture_run_on_the_batch_device(monkeypatch):
    """A batch on cuda:1 while cuda:0 is current: warm-up and capture both run on a stream of
    cuda:1 (a capture on a cuda:0 stream would record none of the update's kernels), the
    capture starts from the restored weights, and calls replay and return copies."""
    fake = _FakeCuda(monkeypatch, current=0)
    module = torch.nn.Linear(1, 1)
    seen = []

    def update(batch):
        fake.draw()
        seen.append((fake.where(), module.bias.item()))
        with torch.no_grad():
            module.bias.add_(1.0)
        return {"bias": module.bias.detach()}

    start = module.bias.item()
    example = TensorDict({}, batch_size=[2], device="cuda:1")
    step = CudaGraphed(update, example, [module], [], warmup=2)
    assert [w for w, _ in seen] == [(1, 1, False)] * 2 + [(1, 1, True)]
    assert [b for _, b in seen] == [start, start + 1, start]  # the capture starts restored
    assert fake.where() == (0, None, False)  # the caller's device is current again
    assert fake.rng[1] == 0  # the draws of warm-up and capture are given back to the generator
    out = step(example)
    assert fake.replays == 1 and out["bias"] is not step.out["bias"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize(
    ("kind", "autocast", "compile", "repval_grad"),
    # bf16 trunks and compiled steps: nothing has checked their captures for host syncs (the
    # meta-device test cannot autocast), so the first GPU session runs them here; repval_grad
    # keeps the world model's graph across the actor's captured optimiser step.
    [
        ("aef", "none", False, False),
        ("vae", "none", False, False),
        ("aef", "bf16", False, False),
        ("aef", "none", True, False),
        ("aef", "none", False, True),
    ],
)
def test_graphed_update_matches_the_eager_update(kind, autocast, compile, repval_grad, monkeypatch):
    """Same start, same batches: the warm-up leaves the weights as they were, and graph replays
    train like eager calls (losses agree up to sampling noise; parameters move alike)."""
    torch.manual_seed(0)
    # This batch gives every trunk fewer rows than MIN_ROWS, which would keep them all float32.
    monkeypatch.setattr(precision, "MIN_ROWS", 1)
    value_loss = {"repval": 0.3, "repval_grad": True} if repval_grad else None
    options = dict(autocast=autocast, compile=compile, value_loss=value_loss)
    eager = small_agent(kind, **options).cuda()
    graphed = small_agent(kind, **options).cuda()
    graphed.load_state_dict(eager.state_dict())
    dtypes = set()  # what the world model's first product ran in, while captured
    first_linear = next(m for m in graphed.modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    batches = [random_batch(SIZES, seed=i, device="cuda") for i in range(20)]
    before = _agent_tensors(graphed)
    step = CudaGraphed(
        graphed.train_step, batches[0], [graphed], graphed.optimizers.values(), warmup=3
    )
    for a, b in zip(before, _agent_tensors(graphed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fixed shapes"):
        step(random_batch(dataclasses.replace(SIZES, batch=3), device="cuda"))
    losses = {"eager": [], "graph": []}
    for batch in batches:
        losses["eager"].append(eager.train_step(batch)["loss_obs"])
        out = step(batch)
        assert all(torch.isfinite(v).all() for v in out.values())
        losses["graph"].append(out["loss_obs"])
    e, g = torch.stack(losses["eager"]), torch.stack(losses["graph"])
    torch.testing.assert_close(g, e, rtol=0.05, atol=0.05)
    # The graph's parameters moved from the start, as far as the eager ones did.
    drift = [
        ((pg - p0).norm() / (pe - p0).norm().clamp_min(1e-12)).item()
        for p0, pg, pe in zip(before, graphed.parameters(), eager.parameters())
        if (pe - p0).norm() > 1e-6
    ]
    assert 0.5 < sum(drift) / len(drift) < 2.0
    assert dtypes == ({torch.bfloat16} if autocast == "bf16" else {torch.float32})


def test_a_failed_capture_puts_back_stream_weights_and_optimiser_settings(monkeypatch):
    """A host sync inside the capture spoils it; torch then raises at the capture's end without
    making the caller's stream current again, and make_capturable had switched the optimiser
    to fused capturable steps. The eager fallback must find neither."""
    for batch_device in (0, 1):  # the current device's batch, and another device's
        fake = _FakeCuda(monkeypatch, current=0)
        module = torch.nn.Linear(1, 1)
        adam = torch.optim.Adam(module.parameters(), lr=0.1)
        groups = [dict(g) for g in adam.param_groups]
        start = module.bias.detach().clone()

        def update(batch, fake=fake, module=module):
            with torch.no_grad():
                module.bias.add_(1.0)
            if fake.capturing:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            return {}

        example = TensorDict({}, batch_size=[2], device=f"cuda:{batch_device}")
        with pytest.raises(RuntimeError, match="previous error during capture"):
            CudaGraphed(update, example, [module], [adam], warmup=1)
        assert fake.where() == (0, None, False)  # the caller's device and (default) stream
        assert torch.equal(module.bias.detach(), start)
        assert [dict(g) for g in adam.param_groups] == groups


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_real_spoiled_capture_leaves_an_eager_update_that_works():
    """A host sync (``.item()``) inside the captured update: torch raises at the capture's end;
    the weights, the optimiser's settings and the current stream are the caller's again, and an
    eager step then runs (the loop's fallback)."""
    module = torch.nn.Linear(4, 1).cuda()
    adam = torch.optim.Adam(module.parameters(), lr=0.1)
    groups = [dict(g) for g in adam.param_groups]
    start = [p.detach().clone() for p in module.parameters()]

    def update(batch):
        loss = module(batch["x"]).square().mean()
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()
        return {"loss": loss.detach(), "host": torch.tensor(loss.item())}  # the sync

    example = TensorDict({"x": torch.randn(8, 4, device="cuda")}, batch_size=[8], device="cuda")
    with pytest.raises(RuntimeError):
        CudaGraphed(update, example, [module], [adam], warmup=2)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    for p, p0 in zip(module.parameters(), start):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0)
    assert [dict(g) for g in adam.param_groups] == groups
    update(example)  # eager, on the default stream
    torch.cuda.synchronize()
    assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(module.parameters(), start))
