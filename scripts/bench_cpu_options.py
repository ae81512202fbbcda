"""What CPU options and alternative forms would buy an update, measured on the update's own shapes.

Eight measurements, each the current form against the alternative in the same run (``--only``
picks some):

1. matmul throughput (GFLOP/s) in float32 and bfloat16 at the shapes of the actor-critic half
   (800 imagination starts x 400) and of the heads over all imagined states (12800 x 400), and
   at result widths that are not a multiple of 8 next to the multiple ``aefrl.nn.Linear`` pads
   them to (the 255-bin two-hot outputs, the 230-d feature gradients; 12000 imagined states);
2. ChannelNorm + SiLU forward + backward (the conv trunks' memory-bound part) at the encoder's
   four feature-map sizes for a 16 x 50 batch, eager and ``torch.compile``-d;
3. the decoder's last layer (``ConvTranspose2d`` to 3 channels) against equivalent forms
   (sub-pixel convolutions, NCHW, padded outputs), each checked equal to it first;
4. the RSSM filtering scan (``RSSM.observe``, 50 steps of batch 16) forward + backward at the
   identical sizes of scripts/bench.py, eager and with its step (``filter_step``) compiled;
5. one whole update (``DreamerAgent.train_step``, aef) with ``agent.autocast`` none and bf16
   (:mod:`aefrl.precision`: trunks in bf16), the two agents alternating call by call, at the
   identical sizes of scripts/bench.py and at the ``exp=cpu`` sizes of the learning runs;
6. the world-model and the full update (aef) at identical sizes with the RSSM's MLPs as wide as
   the heads (``world_model.rssm_hidden`` = hidden, 400: the bench's mapping before 2026-12-06)
   and as the belief (= deter, 200: torchrl's, the bench's since), alternating call by call;
7. the actor-critic half (``train_actor_critic`` from one batch's posteriors) and the full
   update (aef) with ``agent.actor_loss.gradient`` backprop and reinforce (no backward through
   imagination), alternating call by call, at identical sizes and at the ``exp=cpu`` sizes;
8. the full update (aef) without DreamerV3's replay value loss, with it (``repval=0.3``) and
   with its gradient into the world model too (``repval_grad``: the world model's graph kept
   through imagination, its step taken with the critic's), alternating call by call, with the
   peak memory of each, at identical sizes and at the ``exp=cpu`` sizes.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_cpu_options.py
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_cpu_options.py --only actor_gradient --reps 9
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_cpu_options.py --only replay_value --reps 7

Writes docs/results/cpu_options.json and .md (``--out`` to change).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waits starve 2 cores

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aefrl import keys  # noqa: E402
from aefrl.allocator import tune_malloc  # noqa: E402
from aefrl.arguments import Parser  # noqa: E402
from aefrl.bench.subjects import Sizes, random_batch  # noqa: E402
from aefrl.bench.timing import time_interleaved  # noqa: E402
from aefrl.nn import ChannelNorm  # noqa: E402
from aefrl.provenance import command_line, machine_info, write_result  # noqa: E402


def seconds_per_call(fn, reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


MATMULS = (
    (800, 400, 400),
    (12800, 400, 400),
    (800, 600, 1200),
    (12000, 400, 255),
    (12000, 400, 256),
    (12000, 400, 230),
    (12000, 400, 232),
)
MAPS = ((32, 32), (64, 16), (128, 8), (256, 4))


def matmuls(reps: int, shapes=MATMULS) -> list[dict]:
    rows = []
    for m, k, n in shapes:
        row = {"shape": f"{m}x{k} @ {k}x{n}"}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            t = seconds_per_call(lambda a=a, b=b: a @ b, reps * 10)
            row[str(dtype).removeprefix("torch.")] = round(2 * m * k * n / t / 1e9, 1)
        rows.append(row)
    return rows


class NormAct(torch.nn.Module):
    """The trunks' ChannelNorm + SiLU pair (aefrl/nn.py)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelNorm(channels, eps=1e-3)

    def forward(self, x):
        return F.silu(self.norm(x))


def fwd_bwd(module, x, grad):
    def call():
        module(x).backward(grad)

    return call


def norm_act(reps: int, frames: int, maps=MAPS) -> list[dict]:
    rows = []
    for channels, side in maps:
        x = torch.randn(frames, channels, side, side).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad = torch.randn_like(x)
        eager = NormAct(channels)
        t_eager = seconds_per_call(fwd_bwd(eager, x, grad), reps)
        compiled = torch.compile(NormAct(channels))
        start = time.perf_counter()
        fwd_bwd(compiled, x, grad)()
        t_compile = time.perf_counter() - start
        t_comp = seconds_per_call(fwd_bwd(compiled, x, grad), reps)
        rows.append(
            {
                "map": f"{frames}x{channels}x{side}x{side}",
                "eager_ms": round(1e3 * t_eager, 1),
                "compiled_ms": round(1e3 * t_comp, 1),
                "compile_s": round(t_compile, 1),
            }
        )
    return rows


def subpixel_weight(w: torch.Tensor) -> torch.Tensor:
    """A ``ConvTranspose2d(k=4, s=2, p=1)`` weight ``[C_in, C_out, 4, 4]`` as the weight of the
    equivalent 3 x 3 convolution (padding 1) to ``4 C_out`` channels ``[4 C_out, C_in, 3, 3]``,
    whose pixel_shuffle(2) is the transposed convolution: output pixel ``2m + a`` takes input
    ``m + d`` through kernel tap ``2(-d) + a + 1`` (each phase uses 2 x 2 of the 9 taps)."""
    c_in, c_out = w.shape[:2]
    out = w.new_zeros(c_out, 2, 2, c_in, 3, 3)
    for a in range(2):
        for dy in (-1, 0, 1):
            k = a + 1 - 2 * dy
            for b in range(2):
                for dx in (-1, 0, 1):
                    j = b + 1 - 2 * dx
                    if 0 <= k < 4 and 0 <= j < 4:
                        out[:, a, b, :, dy + 1, dx + 1] = w[:, :, k, j].t()
    return out.reshape(4 * c_out, c_in, 3, 3)


def phase_weight(w: torch.Tensor) -> torch.Tensor:
    """A ``ConvTranspose2d(k=4, s=2, p=1)`` weight ``[C_in, C_out, 4, 4]`` as the weight of a
    2 x 2 convolution to ``4 C_out`` channels ``[4 C_out, C_in, 2, 2]`` over the input padded by
    one: window ``s`` (unpadded rows ``s - 1, s``) gives output rows ``2s - 1`` (taps 2, 0) and
    ``2s`` (taps 3, 1), so pixel_shuffle(2) of it, cropped by one pixel on every side, is the
    transposed convolution at 1.06x its multiply-adds ((side + 1)² windows, not 2.25x)."""
    c_in, c_out = w.shape[:2]
    taps = torch.tensor([[2, 0], [3, 1]])  # [output phase, window position] -> kernel tap
    w = w[:, :, taps][:, :, :, :, taps]  # [C_in, C_out, phase_y, pos_y, phase_x, pos_x]
    return w.permute(1, 2, 4, 0, 3, 5).reshape(4 * c_out, c_in, 2, 2)


def last_decoder_layer(reps: int, frames: int, c_in: int = 32, side: int = 32) -> list[dict]:
    """The decoder's last layer (``ConvTranspose2d(32, 3, 4, 2, 1)`` to 64 x 64 at depth 32):
    three output channels leave oneDNN's kernels idle (its forward runs at a fraction of the
    other layers' GFLOP/s). Equivalent forms, checked against it, then timed: the sub-pixel
    3 x 3 convolution (2.25x the multiply-adds), its 2 x 2 form over the padded input (1.06x),
    and the output channels padded to 8."""
    x = torch.randn(frames, c_in, side, side).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(c_in, 3, 4, 4, requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    forms = {
        "conv_transpose2d, channels-last (ours)": lambda: F.conv_transpose2d(
            x, w, bias, stride=2, padding=1
        ),
        "conv_transpose2d, NCHW": lambda: F.conv_transpose2d(
            x.contiguous(), w, bias, stride=2, padding=1
        ),
        "sub-pixel 3x3 conv + pixel_shuffle": lambda: F.pixel_shuffle(
            F.conv2d(x, subpixel_weight(w), bias.repeat_interleave(4), padding=1), 2
        ),
        "sub-pixel 2x2 conv on the padded input + pixel_shuffle, cropped": lambda: F.pixel_shuffle(
            F.conv2d(F.pad(x, (1, 1, 1, 1)), phase_weight(w), bias.repeat_interleave(4)), 2
        )[:, :, 1:-1, 1:-1],
        "output channels padded to 8": lambda: F.conv_transpose2d(
            x, torch.cat([w, w.new_zeros(c_in, 5, 4, 4)], 1), F.pad(bias, (0, 5)), 2, 1
        )[:, :3],
    }
    with torch.no_grad():
        want = forms["conv_transpose2d, channels-last (ours)"]()
        for name, form in forms.items():
            error = (form() - want).abs().max().item()
            if error > 1e-3:
                raise AssertionError(f"{name} differs from the transposed convolution by {error}")
    grad = torch.randn_like(want)
    flops = 2 * frames * side * side * c_in * 3 * 16  # of the transposed convolution, forward
    rows = []
    for name, form in forms.items():

        def forward(form=form):
            with torch.no_grad():
                form()

        def both(form=form):
            form().backward(grad)
            x.grad = w.grad = bias.grad = None

        t_fwd, t_both = seconds_per_call(forward, reps), seconds_per_call(both, reps)
        rows.append(
            {
                "form": name,
                "forward_ms": round(1e3 * t_fwd, 1),
                "fwd_bwd_ms": round(1e3 * t_both, 1),
                "forward_gflops_of_the_layer": round(flops / t_fwd / 1e9, 1),
            }
        )
    return rows


def rssm_scan(reps: int, sizes: Sizes) -> dict:
    import scripts.bench as bench

    wm = bench.build_ours("aef", sizes, torch.device("cpu")).agent.world_model
    batch = random_batch(sizes)
    with torch.no_grad():
        y, _ = wm.encode_pixels(batch[keys.PIXELS].flatten(0, 1))
        embed, coords = wm.obs_model.embed(y)
    lead = (sizes.batch, sizes.seq)
    embed = embed.unflatten(0, lead).requires_grad_(True)
    coords = None if coords is None else coords.unflatten(0, lead)

    def scan():
        obs = wm.rssm.observe(embed, coords, batch[keys.PREV_ACTION], batch[keys.IS_FIRST])
        (obs.state.feat.sum() + obs.mu_p.sum()).backward()

    out = {"steps": sizes.seq, "batch": sizes.batch, "eager_ms": 1e3 * seconds_per_call(scan, reps)}
    wm.rssm.filter_step = torch.compile(wm.rssm.filter_step, dynamic=False)
    start = time.perf_counter()
    scan()
    out["compile_s"] = time.perf_counter() - start
    out["compiled_ms"] = 1e3 * seconds_per_call(scan, reps)
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


def update_precision(reps: int, sizes: Sizes, label: str, batch: int, seq: int) -> dict:
    """Median seconds of ``train_step`` with ``agent.autocast`` none and bf16, interleaved."""
    import scripts.bench as bench

    agents = {}
    for mode in ("none", "bf16"):
        torch.manual_seed(0)
        agents[mode] = bench.build_ours("aef", sizes, torch.device("cpu"), autocast=mode).agent
    data = random_batch(sizes.with_batch(batch, seq))
    timed = time_interleaved(
        {m: (lambda a=a: a.train_step(data)) for m, a in agents.items()},
        torch.device("cpu"),
        reps,
        warmup=1,
        memory=False,
    )
    out = {"sizes": label, **{f"{m}_s": round(t["median_s"], 3) for m, t in timed.items()}}
    out["speedup"] = round(out["none_s"] / out["bf16_s"], 2)
    return out


def rssm_width(reps: int, sizes: Sizes) -> list[dict]:
    """Median seconds of the world-model and the full update (aef) with ``rssm_hidden`` =
    ``sizes.hidden`` and = ``sizes.deter``, the two agents alternating call by call."""
    import scripts.bench as bench
    from aefrl.bench.subjects import OursSubject, ours_agent_kwargs
    from agents.factory import build_agent

    subjects = {}
    for width in (sizes.hidden, sizes.deter):
        torch.manual_seed(0)
        agent, obs = ours_agent_kwargs(sizes, "aef", *bench.load_config("aef"))
        agent["world_model"]["rssm_hidden"] = width
        model = build_agent(agent, obs, (3, sizes.image, sizes.image), sizes.action_dim)
        subjects[width] = OursSubject("aef", model)
    batch = random_batch(sizes)
    prepared = {w: subject.prepare(batch) for w, subject in subjects.items()}
    out = []
    for update in ("wm_update", "full_update"):
        timed = time_interleaved(
            {w: (lambda w=w, u=update: getattr(subjects[w], u)(prepared[w])) for w in subjects},
            torch.device("cpu"),
            reps,
            warmup=1,
            memory=False,
        )
        wide, narrow = (timed[w]["median_s"] for w in (sizes.hidden, sizes.deter))
        out.append(
            {
                "update": update,
                "widths": [sizes.hidden, sizes.deter],
                "wide_s": round(wide, 3),
                "narrow_s": round(narrow, 3),
                "speedup": round(wide / narrow, 3),
            }
        )
    return out


def actor_gradient(reps: int, sizes: Sizes, label: str, batch: int, seq: int) -> dict:
    """Median seconds of the actor-critic half and of the full update (aef) with each
    ``agent.actor_loss.gradient``, the agents alternating call by call."""
    from tensordict import TensorDict

    import scripts.bench as bench
    from aefrl.bench.subjects import ours_agent_kwargs
    from aefrl.objectives.actor import GRADIENTS
    from agents.factory import build_agent

    agents, starts = {}, {}
    data = random_batch(sizes.with_batch(batch, seq))
    for gradient in GRADIENTS:
        torch.manual_seed(0)
        agent, obs = ours_agent_kwargs(sizes, "aef", *bench.load_config("aef"))
        agent["actor_loss"]["gradient"] = gradient
        agents[gradient] = build_agent(agent, obs, (3, sizes.image, sizes.image), sizes.action_dim)
        with torch.no_grad():  # the imagination starts train_step takes from its world model
            post = agents[gradient].wm_loss(data)
        starts[gradient] = TensorDict(
            {
                keys.BELIEF: post[keys.BELIEF].flatten(0, 1),
                keys.STATE: post[keys.STATE].flatten(0, 1),
                keys.TERMINATED: data[keys.TERMINATED].flatten(0, 1),
            },
            batch_size=[],
        )
    out = {"sizes": label}
    for part, call in (
        ("actor_critic", lambda g: agents[g].train_actor_critic(starts[g])),
        ("full", lambda g: agents[g].train_step(data)),
    ):
        timed = time_interleaved(
            {g: (lambda g=g, call=call: call(g)) for g in GRADIENTS},
            torch.device("cpu"),
            reps,
            warmup=1,
            memory=False,
        )
        for g in GRADIENTS:
            out[f"{part}_{g}_s"] = round(timed[g]["median_s"], 3)
        out[f"{part}_speedup"] = round(out[f"{part}_backprop_s"] / out[f"{part}_reinforce_s"], 2)
    return out


#: agent.value_loss settings of the replay_value measurement, by label
REPLAY_VALUE = {
    "none": {"repval": 0.0},
    "repval": {"repval": 0.3},
    "repval_grad": {"repval": 0.3, "repval_grad": True},
}


def replay_value(reps: int, sizes: Sizes, label: str, batch: int, seq: int) -> dict:
    """Median seconds and the RSS growth over one call (a single sample, each agent's second
    update) of the full update (aef) with each :data:`REPLAY_VALUE` setting, the agents
    alternating call by call."""
    import scripts.bench as bench
    from aefrl.bench.subjects import ours_agent_kwargs
    from agents.factory import build_agent

    agents = {}
    for name, value_loss in REPLAY_VALUE.items():
        torch.manual_seed(0)
        agent, obs = ours_agent_kwargs(sizes, "aef", *bench.load_config("aef"))
        agent["value_loss"].update(value_loss)
        agents[name] = build_agent(agent, obs, (3, sizes.image, sizes.image), sizes.action_dim)
    data = random_batch(sizes.with_batch(batch, seq))
    for agent in agents.values():  # Adam's moments exist before the memory is measured
        agent.train_step(data)
    timed = time_interleaved(
        {n: (lambda a=a: a.train_step(data)) for n, a in agents.items()},
        torch.device("cpu"),
        reps,
        warmup=1,
    )
    out = {"sizes": label}
    for name in REPLAY_VALUE:
        out[f"{name}_s"] = round(timed[name]["median_s"], 3)
        out[f"{name}_delta_mib"] = timed[name]["delta_mib"]
    for name in ("repval", "repval_grad"):
        out[f"{name}_cost"] = round(out[f"{name}_s"] / out["none_s"], 2)
    return out


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"Command: `{r['command']}`.  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; torch "
        f"{m['torch']}.",
        "",
    ]
    if "matmul" in r:
        lines += [
            "| matmul | float32 GFLOP/s | bfloat16 GFLOP/s |",
            "|---|---:|---:|",
            *[f"| {x['shape']} | {x['float32']} | {x['bfloat16']} |" for x in r["matmul"]],
            "",
        ]
    if "norm_act" in r:
        lines += [
            "| ChannelNorm + SiLU fwd + bwd | eager ms | compiled ms | compile s |",
            "|---|---:|---:|---:|",
            *[
                f"| {x['map']} | {x['eager_ms']} | {x['compiled_ms']} | {x['compile_s']} |"
                for x in r["norm_act"]
            ],
            "",
        ]
    if "last_decoder_layer" in r:
        lines += [
            f"| last decoder layer ({r['last_decoder_layer_shape']}) | forward ms | fwd + bwd ms "
            "| forward GFLOP/s (the layer's FLOPs) |",
            "|---|---:|---:|---:|",
            *[
                f"| {x['form']} | {x['forward_ms']} | {x['fwd_bwd_ms']} | "
                f"{x['forward_gflops_of_the_layer']} |"
                for x in r["last_decoder_layer"]
            ],
            "",
        ]
    if "rssm_scan" in r:
        s = r["rssm_scan"]
        lines += [
            f"RSSM filtering scan ({s['steps']} steps x batch {s['batch']}, fwd + bwd): eager "
            f"{s['eager_ms']} ms, filter_step compiled {s['compiled_ms']} ms "
            f"(compile {s['compile_s']} s).",
            "",
        ]
    if "update_precision" in r:
        lines += [
            "| one update (train_step, aef), alternating | autocast none s | bf16 s | speedup |",
            "|---|---:|---:|---:|",
            *[
                f"| {x['sizes']} | {x['none_s']} | {x['bf16_s']} | {x['speedup']}x |"
                for x in r["update_precision"]
            ],
            "",
        ]
    if "rssm_width" in r:
        wide, narrow = r["rssm_width"][0]["widths"]
        lines += [
            f"| identical sizes (aef), alternating | RSSM MLPs {wide} wide s | {narrow} wide s "
            "| speedup |",
            "|---|---:|---:|---:|",
            *[
                f"| {x['update'].replace('_', ' ')} | {x['wide_s']} | {x['narrow_s']} | "
                f"{x['speedup']}x |"
                for x in r["rssm_width"]
            ],
            "",
        ]
    if "actor_gradient" in r:
        lines += [
            "| agent.actor_loss.gradient (aef), alternating | actor-critic half: backprop s | "
            "reinforce s | speedup | full update: backprop s | reinforce s | speedup |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *[
                f"| {x['sizes']} | {x['actor_critic_backprop_s']} | "
                f"{x['actor_critic_reinforce_s']} | {x['actor_critic_speedup']}x | "
                f"{x['full_backprop_s']} | {x['full_reinforce_s']} | {x['full_speedup']}x |"
                for x in r["actor_gradient"]
            ],
            "",
        ]
    if "replay_value" in r:
        lines += [
            "| full update (aef), alternating | no repval s | repval=0.3 s | + repval_grad s "
            "| time over no repval: repval / + grad | RSS growth MiB (one call): none / repval / "
            "+ grad |",
            "|---|---:|---:|---:|---:|---:|",
            *[
                f"| {x['sizes']} | {x['none_s']} | {x['repval_s']} | {x['repval_grad_s']} | "
                f"{x['repval_cost']}x / {x['repval_grad_cost']}x | {x['none_delta_mib']} / "
                f"{x['repval_delta_mib']} / {x['repval_grad_delta_mib']} |"
                for x in r["replay_value"]
            ],
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


SECTIONS = (
    *("matmul", "norm_act", "last_decoder_layer", "rssm_scan", "update_precision"),
    *("rssm_width", "actor_gradient", "replay_value"),
)
#: exp=cpu (configs/exp/cpu.yaml): RSSM and MLPs 200 wide, depth 16, batches of 16 x 32
CPU_SIZES = Sizes(latent=32, deter=200, hidden=200, depth=16, reward_layers=2, ac_layers=2)


def at_both_sizes(measure, reps: int, toy_sizes: Sizes, toy: bool) -> list[dict]:
    """``measure(reps, sizes, label, batch, seq)`` at the identical sizes of scripts/bench.py
    and at the ``exp=cpu`` sizes of the learning runs; once at ``toy_sizes`` with ``toy``."""
    if toy:
        return [measure(1, toy_sizes, "toy", 2, 4)]
    return [
        measure(reps, Sizes(), "identical sizes, 16 x 50", 16, 50),
        measure(reps, CPU_SIZES, "exp=cpu, 16 x 32", 16, 32),
    ]


def main(argv=None) -> dict:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--frames", type=int, default=800, help="B x T frames of the trunk maps")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "cpu_options.json")
    p.add_argument("--toy", action="store_true", help="tiny shapes, one of each (the test)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=SECTIONS,
        help="the measurements to run (default: all)",
    )
    args = p.parse_args(argv)
    toy = Sizes(latent=3, deter=8, hidden=16, depth=4, batch=2, seq=4)
    side = 4 if args.toy else 32  # the last decoder layer's input maps
    tune_malloc()
    torch.manual_seed(0)
    sections = {
        "matmul": lambda: matmuls(args.reps, ((8, 16, 16),) if args.toy else MATMULS),
        "norm_act": lambda: norm_act(args.reps, args.frames, MAPS[-1:] if args.toy else MAPS),
        "last_decoder_layer": lambda: last_decoder_layer(args.reps, args.frames, side=side),
        "rssm_scan": lambda: rssm_scan(args.reps, toy if args.toy else Sizes()),
        "update_precision": lambda: at_both_sizes(update_precision, args.reps, toy, args.toy),
        "rssm_width": lambda: rssm_width(
            1 if args.toy else args.reps, toy if args.toy else Sizes()
        ),
        "actor_gradient": lambda: at_both_sizes(actor_gradient, args.reps, toy, args.toy),
        "replay_value": lambda: at_both_sizes(replay_value, args.reps, toy, args.toy),
    }
    result = {
        "command": command_line("scripts/bench_cpu_options.py", argv),
        "machine": machine_info(),
    }
    for name in SECTIONS:
        if name in args.only:
            result[name] = sections[name]()
    if "last_decoder_layer" in result:
        result["last_decoder_layer_shape"] = f"{args.frames}x32x{side}x{side} -> 3 channels"
    md = markdown(result)
    write_result(args.out, result, md)
    print(md)
    return result


if __name__ == "__main__":
    main()
