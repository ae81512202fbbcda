"""The update's hand-written passes against the plain forms they replace.

Whole-update timings on the project's VM scatter by more than these pieces save (single calls of
the same update vary up to 1.7x, docs/benchmarks.md), so each piece is timed alone here, the two
forms alternating call by call in one process on the update's own shapes (identical sizes of
scripts/bench.py: 16 x 50 frames of 3 x 64 x 64, RSSM 200, hidden 400):

1. decoder likelihood ``Σ ((y − μ)/σ)²`` forward + backward: autograd of the composite against
   :func:`aefrl.obs_models.gaussian_quad.gaussian_quad` (hand-written backward);
2. pre-processing of the uint8 batch: its formulas one out-of-place op each (NCHW) against the
   fused, in-place, channels-last ``Preprocess.encode``;
3. RSSM filtering scan forward + backward: a plain loop of ``obs_step`` over ``x[:, t]`` slices
   against ``RSSM.observe`` (embeddings projected once per sequence, inputs split by unbind);
4. the actor + critic half of ``DreamerAgent.train_step`` (actor loss on the B·T posterior
   states, 15 imagined steps, critic loss, both optimiser steps) with ``torch.nn.Linear`` layers
   against the agent's own :class:`aefrl.nn.Linear` (odd feature counts padded to a multiple of
   8: the 255-bin two-hot outputs, the 230-d feature gradients).

Each pair is checked to compute the same values before it is timed.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_passes.py     # ~2 min on 2 cores

Writes docs/results/passes_cpu.json and .md (``--out`` to change).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waits starve 2 cores

import copy
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tensordict import TensorDict  # noqa: E402
from torch import nn  # noqa: E402

from aefrl import keys  # noqa: E402
from aefrl.allocator import tune_malloc  # noqa: E402
from aefrl.arguments import Parser  # noqa: E402
from aefrl.bench.subjects import Sizes, random_batch  # noqa: E402
from aefrl.bench.timing import time_interleaved  # noqa: E402
from aefrl.nn import Linear  # noqa: E402
from aefrl.obs_models.gaussian_quad import gaussian_quad  # noqa: E402
from aefrl.provenance import command_line, machine_info, write_result  # noqa: E402


def alternate(plain, ours, reps: int) -> dict:
    """``plain()`` and ``ours()`` timed call by call in turn (``time_interleaved``); median and
    min in ms."""
    timed = time_interleaved(
        {"plain": plain, "ours": ours}, torch.device("cpu"), reps, warmup=2, memory=False
    )
    out = {}
    for name, rec in timed.items():
        out[f"{name}_ms"] = round(1e3 * rec["median_s"], 1)
        out[f"{name}_min_ms"] = round(1e3 * rec["min_s"], 1)
    out["speedup"] = round(out["plain_ms"] / out["ours_ms"], 2)
    return out


def _build(sizes: Sizes):
    """Our agent (aef) at ``sizes``."""
    import scripts.bench as bench

    torch.manual_seed(0)
    return bench.build_ours("aef", sizes, torch.device("cpu")).agent


def plain_linears(agent):
    """A copy of the Dreamer ``agent`` whose :class:`aefrl.nn.Linear` layers are
    ``torch.nn.Linear`` ones (same parameter values; no padding), with its optimisers rebuilt
    over the copy's own parameters (the copied ones held the replaced layers')."""
    agent = copy.deepcopy(agent)
    for sub in agent.modules():
        for name, child in list(sub.named_children()):
            if type(child) is Linear:
                plain = nn.Linear(child.in_features, child.out_features, child.bias is not None)
                plain.load_state_dict(child.state_dict())
                setattr(sub, name, plain)
    for name, opt in agent.optimizers.items():
        group = opt.param_groups[0]
        params = list(agent._groups[name].parameters())
        agent.optimizers[name] = torch.optim.Adam(params, lr=group["lr"], eps=group["eps"])
    return agent


def likelihood(reps: int, sizes: Sizes, wm) -> dict:
    om = wm.obs_model
    g = torch.Generator().manual_seed(0)
    lead = (sizes.batch, sizes.seq)
    shape = (sizes.batch * sizes.seq, 3, sizes.image, sizes.image)

    def batch_like():  # channels-last, as the update's pixels and decoder means are
        x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        return x.unflatten(0, lead)

    y, mu = batch_like(), batch_like().requires_grad_(True)
    raw = om.sigma_x_raw

    def sigma():
        return om.sigma_x_min + torch.nn.functional.softplus(raw)

    def plain_quad():
        return ((y - mu) / sigma()).square().sum((-3, -2, -1))

    def ours_quad():
        return gaussian_quad(y, mu, sigma(), 3)

    torch.testing.assert_close(ours_quad(), plain_quad(), rtol=1e-4, atol=1e-2)

    def run(quad):
        def call():
            quad().sum().backward()
            mu.grad = raw.grad = None

        return call

    return {
        "what": "decoder likelihood fwd + bwd",
        **alternate(run(plain_quad), run(ours_quad), reps),
    }


def preprocessing(reps: int, sizes: Sizes, wm) -> dict:
    pre = wm.preprocess
    a, bins = pre.alpha, pre.num_bins
    pixels = random_batch(sizes)[keys.PIXELS].flatten(0, 1)

    def plain(noise=None):  # the formulas of aefrl/preprocess.py, one out-of-place op each
        x = pixels.float()
        x = (x + (torch.rand_like(x) if noise is None else noise)) / bins
        s = a + (1 - 2 * a) * x
        log_s, log_1ms = torch.log(s), torch.log1p(-s)
        logdet = pre.num_dims * math.log(1 - 2 * a) - (log_s + log_1ms).flatten(1).sum(1)
        return log_s - log_1ms, logdet

    noise = torch.rand(pixels.shape)
    for ours, ref in zip(pre.encode(pixels, noise), plain(noise)):
        torch.testing.assert_close(ours, ref)
    return {
        "what": "pre-processing (dequantise + logit)",
        **alternate(plain, lambda: pre.encode(pixels), reps),
    }


def filtering_scan(reps: int, sizes: Sizes, wm) -> dict:
    rssm = wm.rssm
    batch = random_batch(sizes)
    with torch.no_grad():
        y, _ = wm.encode_pixels(batch[keys.PIXELS].flatten(0, 1))
        embed, coords = wm.obs_model.embed(y)
    lead = (sizes.batch, sizes.seq)
    embed = embed.unflatten(0, lead).requires_grad_(True)
    coords = coords.unflatten(0, lead).requires_grad_(True)
    action, first = batch[keys.PREV_ACTION], batch[keys.IS_FIRST]

    def plain_scan():
        state, hs, zs = rssm.initial(sizes.batch), [], []
        for t in range(sizes.seq):
            state, _, _ = rssm.obs_step(state, action[:, t], embed[:, t], coords[:, t], first[:, t])
            hs.append(state.h)
            zs.append(state.z)
        return torch.stack(hs, 1), torch.stack(zs, 1)

    def ours_scan():
        obs = rssm.observe(embed, coords, action, first)
        return obs.state.h, obs.state.z

    for a, b in zip(ours_scan(), plain_scan()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    def run(scan):
        def call():
            h, z = scan()
            (h.sum() + z.square().sum()).backward()
            embed.grad = coords.grad = None
            wm.zero_grad(set_to_none=True)

        return call

    return {
        "what": f"filtering scan fwd + bwd ({sizes.seq} steps x batch {sizes.batch})",
        **alternate(run(plain_scan), run(ours_scan), reps),
    }


def actor_critic(reps: int, sizes: Sizes, agent) -> dict:
    batch = random_batch(sizes)
    with torch.no_grad():
        observed = agent.world_model.filter(batch).observed.state.flatten()
    start = TensorDict(
        {
            keys.BELIEF: observed.h,
            keys.STATE: observed.z,
            keys.TERMINATED: batch[keys.TERMINATED].flatten(0, 1),
        },
        batch_size=[],
    )
    plain = plain_linears(agent)
    assert not any(type(m) is Linear for m in plain.modules())
    for name, opt in plain.optimizers.items():  # every parameter of the copy is stepped
        stepped = {id(p) for g in opt.param_groups for p in g["params"]}
        assert stepped == {id(p) for p in plain._groups[name].parameters()}, name
    # Same start, same draws: the same loss either way (up to summation order).
    losses = []
    for subject in (agent, plain):
        torch.manual_seed(0)
        losses.append(subject.actor_loss(start)["loss_actor"].detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)

    rows = sizes.batch * sizes.seq * sizes.horizon
    return {
        "what": f"actor + critic update ({rows} imagined states)",
        **alternate(
            lambda: plain.train_actor_critic(start), lambda: agent.train_actor_critic(start), reps
        ),
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"Command: `{r['command']}`.  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; torch "
        f"{m['torch']}. The two forms alternate call by call; {r['reps']} calls each.",
        "",
        "| piece | plain form ms (median / min) | ours ms (median / min) | speedup |",
        "|---|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['what']} | {row['plain_ms']} / {row['plain_min_ms']} | "
            f"{row['ours_ms']} / {row['ours_min_ms']} | {row['speedup']}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "passes_cpu.json")
    p.add_argument("--toy", action="store_true", help="tiny sizes (the test)")
    args = p.parse_args(argv)
    sizes = (
        Sizes(latent=3, deter=8, hidden=16, depth=4, batch=2, seq=4, image=16)
        if args.toy
        else Sizes()
    )
    tune_malloc()
    agent = _build(sizes)
    wm = agent.world_model
    result = {
        "command": command_line("scripts/bench_passes.py", argv),
        "machine": machine_info(),
        "reps": args.reps,
        "sizes": {"batch": sizes.batch, "seq": sizes.seq, "image": sizes.image},
        "rows": [
            likelihood(args.reps, sizes, wm),
            preprocessing(args.reps, sizes, wm),
            filtering_scan(args.reps, sizes, wm),
            actor_critic(args.reps, sizes, agent),
        ],
    }
    md = markdown(result)
    write_result(args.out, result, md)
    print(md)
    return result


if __name__ == "__main__":
    main()
