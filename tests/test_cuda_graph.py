"""CUDA-graph updates (aefrl/cuda_graph.py).

Capture itself needs a GPU; on the CPU we check what makes it valid: the update never
synchronises with the host (run on the meta device, where every ``.item()`` / ``bool(tensor)``
raises), the warm-up snapshot restores modules and optimisers in place, and the optimiser
switch. The GPU test compares the graphed update with the eager one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchrl.modules.distributions.continuous as tanh_normal_module

from aefrl.bench.subjects import Sizes, ours_agent_kwargs, random_batch
from aefrl.cuda_graph import CudaGraphed, _Snapshot, graph_train_step, make_capturable
from agents.factory import build_agent
from scripts.bench import load_config

SIZES = Sizes(latent=3, deter=8, hidden=16, depth=4, batch=2, seq=4, horizon=3)


def small_agent(kind: str, device="cpu", actnorm: bool = False):
    agent, obs = ours_agent_kwargs(SIZES, kind, *load_config(kind))
    agent["world_model"]["actnorm"] = actnorm
    # Built on the CPU, then moved (the optimisers keep the same Parameter objects).
    return build_agent(agent, obs, (3, 64, 64), SIZES.action_dim).to(device)


def test_the_meta_device_catches_host_synchronisation():
    """The premise of the next test: reading a meta tensor's value raises."""
    x = torch.ones(2, device="meta")
    with pytest.raises(RuntimeError):
        bool(x.sum() > 0)
    with pytest.raises(RuntimeError):
        x.sum().item()


@pytest.mark.parametrize(
    ("kind", "actnorm"), [("aef", False), ("vae", False), ("aef_partition", False), ("aef", True)]
)
def test_train_step_never_synchronises_with_the_host(kind, actnorm, monkeypatch):
    # torchrl's TanhNormal skips its argument checks (which read values) while a stream is
    # capturing; tell it so, as a real capture would.
    monkeypatch.setattr(tanh_normal_module, "safe_is_current_stream_capturing", lambda: True)
    torch.manual_seed(0)
    agent = small_agent(kind, device="meta", actnorm=actnorm)
    batch = random_batch(SIZES).to("meta")
    for _ in range(2):  # the second call takes the initialised branches (return scale, Adam)
        metrics = agent.train_step(batch)
    assert metrics["loss_actor"].device.type == "meta"


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
    make_capturable(adam)
    group = adam.param_groups[0]
    assert group["capturable"] and group["fused"] and not group["foreach"]
    assert adam.state[p]["step"].dtype == torch.float32
    with pytest.raises(TypeError, match="cannot be captured"):
        make_capturable(torch.optim.SGD([p], lr=0.1))


def test_graphs_need_a_cuda_batch():
    agent = small_agent("aef")
    with pytest.raises(ValueError, match="CUDA device"):
        graph_train_step(agent, random_batch(SIZES))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("kind", ["aef", "vae"])
def test_graphed_update_matches_the_eager_update(kind):
    """Same start, same batches: the warm-up leaves the weights as they were, and graph replays
    train like eager calls (losses agree up to sampling noise; parameters move alike)."""
    torch.manual_seed(0)
    eager = small_agent(kind).cuda()
    graphed = small_agent(kind).cuda()
    graphed.load_state_dict(eager.state_dict())
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
