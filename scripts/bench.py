"""Speed of our Dreamer update against torchrl's own Dreamer blocks, in one run (issue 5).

Measured on ``--device`` (cpu | cuda), ours (aef, vae; ``--partition`` adds aef_partition) and
torchrl's DreamerV1 (``aefrl/bench/torchrl_peer.py``) on the same uint8 batch:

1. world-model update (forward + backward + clip + Adam step), and the speedup theirs / ours;
2. full update (world model, then actor, then critic): ours ``DreamerAgent.train_step``;
3. imagination rollout alone (horizon 15 from the B·T posterior states);
4. the convolution bound: our encoder + decoder trunks forward + backward alone on the same B·T
   frames, ``wm_update_over_conv_bound`` = our world-model update / that time (full runs add the
   convolution layers alone, as the model lays them out and in channels-last, and torchrl's
   update over its own trunks), a torch.profiler breakdown of our update (where the non-conv
   time goes), and conv FLOPs per image of both architectures;
5. peak memory of each update (CPU: process RSS sampled during one untimed call after a
   ``malloc_trim``; CUDA: max allocated);
6. world-model update time against batch size and sequence length (ours aef and torchrl);
7. end-to-end agent steps/s at train ratio 512: the real loop (``aefrl.loop.Trainer``) on a real
   DMC task, rendered "faithful", after a short prefill;
8. the same updates at our default sizes (configs/agent/dreamer.yaml, batch 16 x 64), torchrl's
   blocks mapped to them.

"Identical sizes" are torchrl's DreamerV1 network defaults (state 30, RSSM 200, hidden 400, conv
depth 32) on the issue's batch of 16 x 50 (torchrl's own config samples 200 x 50). Timed calls run
round-robin, each round starting one implementation later than the last, so load drifts on a
shared machine hit all alike; medians are reported. Collection speed is the job of
scripts/bench_collect.py: its latest results (docs/results/collect_cpu.json) are summarised here,
``--collect`` reruns it.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench.py --quick            # < 5 min on 2 CPU cores
    OMP_WAIT_POLICY=PASSIVE python scripts/bench.py                    # more reps and points
    python scripts/bench.py --device cuda --compile --autocast bf16    # GPU (untested here)

Writes ``docs/results/bench_<device>[_quick].json`` and ``.md`` (``--out`` to change), and with
``--update-docs`` the table block of docs/benchmarks.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waits starve 2 cores

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # agents/ when run from elsewhere

from aefrl.allocator import malloc_tuned, tune_malloc  # noqa: E402
from aefrl.arguments import Parser, positive_int  # noqa: E402
from aefrl.bench.subjects import (  # noqa: E402
    GRAPH,
    OursSubject,
    Sizes,
    base_kind,
    ours_agent_kwargs,
    random_batch,
)
from aefrl.bench.timing import (  # noqa: E402
    call_flops,
    conv_flops_per_image,
    load_average,
    profile_summary,
    settle_allocator,
    time_interleaved,
)
from aefrl.bench.torchrl_peer import TorchrlDreamer  # noqa: E402
from aefrl.cli import UserError, resolve_device  # noqa: E402
from aefrl.compiled import RecompileLimitWatch, compile_stats  # noqa: E402
from aefrl.envs.dmc import task_action_dim  # noqa: E402
from aefrl.provenance import command_line, machine_info, write_result  # noqa: E402
from agents.factory import build_agent  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
COLLECT_JSON = ROOT / "docs" / "results" / "collect_cpu.json"

ARCHITECTURE_NOTES = [
    "Encoders: torchrl's ObsEncoder is 4 valid-padding k4 s2 convs with ReLU "
    "(64->31->14->6->2, 1024-d embedding); ours 4 same-padding k4 s2 convs with channel "
    "LayerNorm + SiLU (64->32->16->8->4, 4096-d embedding). Same channels (32, 64, 128, 256).",
    "Decoders: torchrl's ObsDecoder maps [z, h] to a 1024-d 1x1 map, then transposed convs "
    "k5, k5, k6, k6 (1->5->13->30->64) with ReLU; ours a Linear to 256x4x4, then 4 transposed "
    "k4 s2 convs with channel LayerNorm + SiLU (4->8->16->32->64). FLOPs per image in the table.",
    "RSSM: both a GRUCell with a 200-d belief and a 30-d Gaussian state, and MLPs 200 wide "
    "(make_dreamer passes rssm_hidden_dim as their width; ours world_model.rssm_hidden): "
    "torchrl's ELU, ours LayerNorm + SiLU. Our posterior is the observation model's encoder layer "
    "(aef: z = mu + sigma * (W y + b), with a 12288 -> 30 projection W). In runs before git "
    "c691f83 our RSSM MLPs were 400 wide here (one width for every MLP).",
    "Heads: torchrl has an ELU reward MLP with a unit-variance Normal (MSE); ours a two-hot "
    "(255 bins) reward head and a Bernoulli continue head (LayerNorm + SiLU, 2 hidden layers).",
    "World-model loss: torchrl's DreamerModelLoss is KL (free nats 3) + summed MSE "
    "reconstruction + MSE reward; ours is the decoder's Gaussian NLL of logit-space pixels with "
    "a learned per-pixel sigma_x (after de-quantisation and logit), plus KL balancing (vae) or "
    "the AEF density terms (aef), two-hot reward and Bernoulli continue NLLs.",
    "Actor-critic: both backpropagate returns through the frozen world model (dynamics "
    "backprop), horizon 15, TD(lambda) with lambda 0.95. torchrl: DreamerActor (ELU, 3x400, "
    "TanhNormal), a Normal value MLP (ELU, 3x400) trained by MSE, gamma 0.99, no slow critic; "
    "its actor reads the imagined states with their gradient (the full pathwise derivative). "
    "Ours: actor and two-hot critic (LayerNorm + SiLU, 3x400), a slow critic, continue-weighted "
    "returns, return normalisation by percentiles and an entropy bonus; the actor reads the "
    "imagined states with their gradient stopped, as DreamerV1-V3 do (less backward work).",
    "Imagination rollout: torchrl's DreamerEnv predicts the reward inside each step; ours "
    "predicts the rewards of all imagined states after the loop. Both timings include them.",
    "Pixels: both updates take the same uint8 batch and convert it inside the timed region "
    "(torchrl: float()/255 as its ToTensorImage; ours: de-quantisation + logit with its "
    "log-determinant).",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--quick", action="store_true", help="fewer reps and points (< 5 min on CPU)")
    p.add_argument("--reps", type=positive_int, help="timed repetitions per measurement (median)")
    p.add_argument("--partition", action="store_true", help="also time ours with aef_partition")
    p.add_argument(
        "--compile",
        action="store_true",
        help="ours: agent.compile (RSSM steps and heads, aefrl/compiled.py); torchrl: its actor "
        "and value losses, the two its Dreamer script compiles",
    )
    p.add_argument(
        "--cudagraphs",
        action="store_true",
        help="with --compile: torchrl's compiled losses in mode reduce-overhead (its script "
        "turns CUDA graphs off)",
    )
    p.add_argument("--autocast", choices=["none", "bf16"], default="none")
    p.add_argument(
        "--graph",
        action="store_true",
        help="CUDA only: also time ours with every update replayed as one captured CUDA graph "
        "(subjects aef+graph, vae+graph; aefrl/cuda_graph.py), and use it end to end",
    )
    p.add_argument(
        "--num-envs", type=positive_int, default=1, help="environments of the end-to-end run"
    )
    p.add_argument(
        "--e2e-steps", type=positive_int, help="timed agent steps end to end (default: plan's)"
    )
    p.add_argument(
        "--replay-storage",
        choices=["memory", "device"],
        default="memory",
        help="end to end: replay rows in host RAM, or on --device (batches gathered there)",
    )
    p.add_argument("--task", default="walker-walk", help="DMC task of the end-to-end run")
    p.add_argument("--skip-e2e", action="store_true", help="no end-to-end run (no GL needed)")
    p.add_argument(
        "--skip-e2e-torchrl",
        action="store_true",
        help="end to end: ours only, not torchrl's Dreamer loop "
        "(aefrl/bench/torchrl_end_to_end.py)",
    )
    p.add_argument(
        "--only-e2e",
        action="store_true",
        help="only the end-to-end runs (ours, aef, and torchrl's, identical sizes); JSON "
        "only, default --out docs/results/e2e_<device>.json",
    )
    p.add_argument("--collect", action="store_true", help="rerun scripts/bench_collect.py")
    p.add_argument("--out", type=Path, help="JSON path (the .md goes next to it)")
    p.add_argument("--update-docs", action="store_true", help="rewrite docs/benchmarks.md tables")
    p.add_argument(
        "--conv-detail",
        action="store_true",
        help="quick runs too: conv layers alone (NCHW, channels-last), torchrl's conv bound",
    )
    p.add_argument(
        "--threads", type=positive_int, help="torch CPU threads (default: torch's, all cores)"
    )
    p.add_argument(
        "--allocator",
        choices=["tuned", "glibc"],
        default="tuned",
        help="tuned: aefrl.allocator.tune_malloc() as in training (both implementations share "
        "the process); glibc: its defaults",
    )
    p.add_argument("--toy", action="store_true", help="tiny networks and batches (the smoke test)")
    args = p.parse_args(argv)
    try:
        args.device = resolve_device(args.device, "--device ")
    except UserError as exc:
        p.error(str(exc))
    try:  # the end-to-end run's task, before minutes of other measurements
        task_action_dim(args.task)  # loads its physics only
    except ValueError as exc:
        p.error(f"--{exc}")
    if args.out is not None and args.out.is_dir():
        p.error(f"--out takes a JSON file path, and {args.out} is a directory")
    if args.cudagraphs and not args.compile:
        p.error("--cudagraphs needs --compile")
    if args.graph and args.device.type != "cuda":
        p.error("--graph needs --device cuda (CUDA graphs)")
    if args.only_e2e and args.skip_e2e:
        p.error("--only-e2e and --skip-e2e exclude each other")
    kind = "e2e_" if args.only_e2e else "bench_"
    tag = kind + args.device.type + ("_quick" if args.quick else "")
    args.tag = tag
    args.out = args.out or ROOT / "docs" / "results" / f"{tag}.json"
    args.plan = toy_plan() if args.toy else plan(args.quick)
    if args.conv_detail:
        args.plan = replace(args.plan, conv_detail=True)
    args.reps = args.reps or args.plan.reps
    args.warmup = args.plan.warmup
    return args


@dataclass(frozen=True)
class Plan:
    """How much one run measures: ``plan(quick)`` for real runs, ``toy_plan()`` for the test."""

    identical: Sizes  # torchrl's DreamerV1 sizes, the headline
    default: Sizes  # ours (configs/)
    reps: int  # timed calls per headline measurement (their median is reported)
    warmup: int  # untimed rounds before them
    vae_full_update: bool  # also time ours (vae) in the full-update group
    conv_detail: bool  # also conv layers alone (NCHW, channels-last), torchrl's bound and profile
    scaling: tuple[tuple[int, int], ...]  # (B, T) points besides the headline's
    image_sizes: tuple[int, ...]  # image sides besides the headline's 64 (ours only)
    scaling_reps: int
    scaling_warmup: int
    default_reps: int
    default_warmup: int
    e2e_steps: int  # timed agent steps of the end-to-end loop
    e2e_train_ratio: float = 512.0  # the issue's; the toy plan's loops train at 16


def plan(quick: bool) -> Plan:
    base = Sizes()
    if quick:
        # Under 5 minutes on 2 cores: one warm-up round and 3 reps (without the warm-up, first
        # calls fault their heap in and quick medians read 0.84x where full runs read 1.10x),
        # one point per scaling direction, single calls after a warm-up at our defaults.
        return Plan(
            base, default_sizes(), reps=3, warmup=1, vae_full_update=False, conv_detail=False,
            scaling=((8, base.seq), (base.batch, 25)), image_sizes=(32,), scaling_reps=1,
            scaling_warmup=1, default_reps=1, default_warmup=1, e2e_steps=4,
        )  # fmt: skip
    return Plan(
        base, default_sizes(), reps=5, warmup=1, vae_full_update=True, conv_detail=True,
        scaling=((8, base.seq), (32, base.seq), (base.batch, 25), (base.batch, 100)),
        image_sizes=(32, 128), scaling_reps=3, scaling_warmup=1, default_reps=3, default_warmup=1,
        e2e_steps=16,
    )  # fmt: skip


def toy_plan() -> Plan:
    toy = Sizes(latent=3, deter=8, hidden=16, depth=4, batch=2, seq=4, horizon=3)
    return Plan(
        toy, toy.with_batch(2, 5), reps=1, warmup=0, vae_full_update=True, conv_detail=True,
        scaling=((3, 4),), image_sizes=(32,), scaling_reps=1, scaling_warmup=0, default_reps=1,
        default_warmup=0, e2e_steps=2, e2e_train_ratio=16.0,
    )  # fmt: skip


# --- building ------------------------------------------------------------------------------------
def load_config(kind: str) -> tuple[dict, dict]:
    """Our default ``agent`` and ``obs_model`` configuration dicts."""
    agent = yaml.safe_load((ROOT / "configs/agent/dreamer.yaml").read_text())
    obs = yaml.safe_load((ROOT / f"configs/obs_model/{kind}.yaml").read_text())
    return agent, obs


def default_sizes() -> Sizes:
    """Sizes of configs/agent/dreamer.yaml, configs/obs_model/aef.yaml, configs/config.yaml."""
    agent, obs = load_config("aef")
    replay = yaml.safe_load((ROOT / "configs/config.yaml").read_text())["replay"]
    wm = agent["world_model"]
    widths = {wm["hidden"], agent["actor"]["hidden"], agent["critic"]["hidden"]}
    if len(widths) != 1:  # Sizes (and torchrl's mapping) has one MLP width for all three
        raise ValueError(
            "default sizes need one MLP width: world_model.hidden, actor.hidden and "
            f"critic.hidden are {sorted(widths)} in configs/agent/dreamer.yaml"
        )
    rssm_width = wm["hidden"] if wm.get("rssm_hidden") is None else wm["rssm_hidden"]
    if rssm_width != wm["deter"]:  # torchrl sizes its RSSM MLPs with the belief
        raise ValueError(
            "default sizes need the RSSM's MLPs as wide as its belief (torchrl's mapping): "
            f"world_model.rssm_hidden (or hidden) is {rssm_width}, deter {wm['deter']}"
        )
    return Sizes(
        latent=obs["latent_dim"],
        deter=wm["deter"],
        hidden=wm["hidden"],
        depth=wm["depth"],
        reward_layers=wm["layers"],
        ac_layers=agent["actor"]["layers"],
        batch=replay["batch_size"],
        seq=replay["seq_len"],
        horizon=agent["actor_loss"]["horizon"],
    )


def build_ours(
    kind: str, sizes: Sizes, device: torch.device, compile: bool = False, autocast: str = "none"
) -> OursSubject:
    agent, obs = ours_agent_kwargs(sizes, kind, *load_config(base_kind(kind)))
    agent["compile"] = compile
    agent["autocast"] = autocast  # ours trains that way (aefrl/precision.py)
    model = build_agent(agent, obs, (3, sizes.image, sizes.image), sizes.action_dim)
    return OursSubject(kind, model.to(device))


def build_subjects(kinds, sizes: Sizes, args) -> dict:
    torch.manual_seed(0)
    subjects = {k: build_ours(k, sizes, args.device, args.compile, args.autocast) for k in kinds}
    subjects["torchrl"] = theirs = TorchrlDreamer(sizes, args.device)
    if args.compile:
        mode = "reduce-overhead" if args.cudagraphs else None
        # Its Dreamer script compiles these two (config compile.losses: [actor, value]); the
        # world-model loss stays eager there, so it does here.
        for loss in (theirs.actor_loss, theirs.value_loss):
            loss.compile(mode=mode)
    return subjects


def _autocast(args, subject=None):
    """torchrl's updates under the chosen autocast, as its script runs them; ours bring their own
    (agent.autocast: trunks in bf16, the rest float32)."""
    if args.autocast == "bf16" and not isinstance(subject, OursSubject):
        # No weight cache: a CUDA graph capture must not keep autocast's cached casts.
        return torch.autocast(args.device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def capture_graphs(subjects: dict, prepared: dict, args) -> None:
    """Capture the updates of the ``+graph`` subjects on their prepared batch."""
    for name, s in subjects.items():
        if getattr(s, "graphed", False):
            log(f"capturing CUDA graphs: {name}")
            s.capture(prepared[name], lambda s=s: _autocast(args, s))


def calls(subjects: dict, method: str, inputs: dict, args) -> dict:
    """``{name: () -> subject.method(inputs[name])}`` under the chosen autocast."""

    def bind(subject, x):
        fn = getattr(subject, method)

        def call():
            with _autocast(args, subject):
                fn(x)

        return call

    return {name: bind(s, inputs[name]) for name, s in subjects.items()}


def ratio(theirs: float, ours: float) -> float:
    return round(theirs / ours, 3)


# --- the measurements ----------------------------------------------------------------------------
def measure_identical(args, kinds) -> dict:
    """Sections 1-5 at torchrl's sizes."""
    sizes, dev = args.plan.identical, args.device
    subjects = build_subjects(kinds, sizes, args)
    batch = random_batch(sizes, seed=0, device=dev)
    prepared = {name: s.prepare(batch) for name, s in subjects.items()}
    capture_graphs(subjects, prepared, args)
    out: dict = {"sizes": sizes.record(), "parameters": {}}
    for name, s in subjects.items():
        out["parameters"][name] = s.parameter_count()

    log("world-model update (+ conv bound), interleaved")
    # Every observation model has the same trunks, so one bound serves all of ours.
    ours, theirs = subjects["aef"], subjects["torchrl"]
    conv = {"ours_trunks": (ours, ours.conv_inputs(batch))}
    if "aef_v1" in subjects:  # its trunks are torchrl's geometry: a bound of its own
        v1 = subjects["aef_v1"]
        conv["aef_v1_trunks"] = (v1, v1.conv_inputs(batch))
    if args.plan.conv_detail:
        conv["ours_conv_layers"] = (ours, ours.conv_inputs(batch, layers_only=True))
        conv["ours_conv_layers_channels_last"] = (
            ours,
            ours.conv_inputs(batch, layers_only=True, channels_last=True),
        )
        conv["torchrl_trunks"] = (theirs, theirs.conv_inputs(batch))
    wm_calls = calls(subjects, "wm_update", prepared, args)
    for name, (subject, inputs) in conv.items():
        wm_calls[f"conv:{name}"] = calls({name: subject}, "conv_pass", {name: inputs}, args)[name]
    wm = time_interleaved(wm_calls, dev, reps=args.reps, warmup=args.warmup)
    out["wm_update"] = {k: v for k, v in wm.items() if not k.startswith("conv:")}
    out["conv_bound"] = {k[5:]: v for k, v in wm.items() if k.startswith("conv:")}
    del conv

    log("full update, interleaved")
    full_subjects = {n: s for n, s in subjects.items() if n != "vae" or args.plan.vae_full_update}
    out["full_update"] = time_interleaved(
        calls(full_subjects, "full_update", prepared, args), dev, args.reps, args.warmup
    )

    log("imagination rollout, interleaved")
    eager = {n: s for n, s in subjects.items() if not n.endswith(GRAPH)}  # same rollout
    starts = {name: s.imagination_start(prepared[name]) for name, s in eager.items()}
    out["imagination"] = time_interleaved(
        calls(eager, "imagine", starts, args), dev, reps=max(args.reps, 3), warmup=1
    )
    out["imagination_start_states"] = sizes.batch * sizes.seq

    log("profiles")
    profiled = [("wm_update", "aef"), ("full_update", "aef")]
    if args.plan.conv_detail:
        profiled.append(("wm_update", "torchrl"))
    out["profile"] = {
        f"{method}_{name}": profile_summary(calls(subjects, method, prepared, args)[name], dev)
        for method, name in profiled
    }

    log("conv FLOPs per image")
    out["conv_flops_per_image"] = {
        name: conv_flops_per_image(
            *subjects[name].conv_modules(), sizes.image, two_inputs=name == "torchrl"
        )
        for name in ("aef", "torchrl")
    }
    log("FLOPs per update")
    out["update_flops"] = update_flops(subjects, prepared, out, args)
    out["_subjects"] = subjects  # kept for the scaling runs, dropped before writing
    return out


def update_flops(subjects: dict, prepared: dict, timed: dict, args) -> dict:
    """Counted GFLOP of one world-model and one full update per eager subject, and the rate
    that the median times above make of them (how close each runs to the machine's matmul and
    convolution speed; graph subjects do the same arithmetic as their eager twins)."""
    out = {}
    for name, s in subjects.items():
        if name.endswith(GRAPH):
            continue
        rec = {}
        for method in ("wm_update", "full_update"):
            if name not in timed[method]:
                continue
            fn, x = getattr(s, method), prepared[name]
            with _autocast(args, s):
                flops = call_flops(functools.partial(fn, x))
            seconds = timed[method][name]["median_s"]
            rec[method] = {**flops, "gflop_per_s": round(flops["gflop"] / seconds, 1)}
        out[name] = rec
    return out


# result key -> the subject method it times
SCALED = {"wm_update": "wm_update", "full_update": "full_update", "imagination": "imagine"}


def measure_scaling(args, subjects: dict, ident: dict) -> list[dict]:
    """World-model update, full update and imagination (from every posterior state of the batch)
    against batch size and sequence length, ours (aef) and torchrl, each interleaved per point.
    One row per subject and point: ``{subject, batch, seq, wm_update, full_update, imagination}``
    with the timing records of :func:`time_interleaved`."""
    base = args.plan.identical
    pair = {"aef": subjects["aef"], "torchrl": subjects["torchrl"]}
    rows = [
        {"subject": n, "batch": base.batch, "seq": base.seq, **{m: ident[m][n] for m in SCALED}}
        for n in pair
    ]
    for b, t in args.plan.scaling:
        log(f"scaling {b}x{t}")
        batch = random_batch(base.with_batch(b, t), seed=1, device=args.device)
        prepared = {name: s.prepare(batch) for name, s in pair.items()}
        starts = {name: s.imagination_start(prepared[name]) for name, s in pair.items()}
        inputs = {"wm_update": prepared, "full_update": prepared, "imagination": starts}
        timed = {
            key: time_interleaved(
                calls(pair, method, inputs[key], args),
                args.device,
                reps=args.plan.scaling_reps,
                warmup=args.plan.scaling_warmup,
            )
            for key, method in SCALED.items()
        }
        rows += [
            {"subject": n, "batch": b, "seq": t, **{m: timed[m][n] for m in SCALED}} for n in pair
        ]
    rows.sort(key=lambda r: (r["subject"], r["batch"], r["seq"]))
    return rows


def measure_image_scaling(args, ident: dict) -> list[dict]:
    """Ours (aef) against the image side at the headline's sizes: world-model update, full
    update, imagination and the conv bound (encoder + decoder trunks alone), interleaved per
    side, on a model built for that side (the trunks gain or lose a stride-2 stage per doubling).
    torchrl's ``ObsDecoder`` only decodes 64 x 64, so it has the headline's row alone. One row
    per subject and side: ``{subject, image, wm_update, full_update, imagination, conv_bound}``
    (``conv_bound`` None for torchrl, whose bound is timed only with the conv detail)."""
    base = args.plan.identical
    conv = ident["conv_bound"]
    bounds = {"aef": conv["ours_trunks"], "torchrl": conv.get("torchrl_trunks")}
    rows = [
        {"subject": n, "image": base.image, **{m: ident[m][n] for m in SCALED}, "conv_bound": b}
        for n, b in bounds.items()
    ]
    for side in args.plan.image_sizes:
        log(f"image scaling {side}x{side}")
        sizes = replace(base, image=side)
        torch.manual_seed(0)
        ours = build_ours("aef", sizes, args.device, args.compile, args.autocast)
        batch = random_batch(sizes, seed=1, device=args.device)
        prepared = ours.prepare(batch)
        inputs = {
            "wm_update": prepared,
            "full_update": prepared,
            "imagination": ours.imagination_start(prepared),
        }
        todo = {
            key: calls({"aef": ours}, method, {"aef": inputs[key]}, args)["aef"]
            for key, method in SCALED.items()
        }
        conv_inputs = {"aef": ours.conv_inputs(batch)}
        todo["conv_bound"] = calls({"aef": ours}, "conv_pass", conv_inputs, args)["aef"]
        timed = time_interleaved(
            todo, args.device, reps=args.plan.scaling_reps, warmup=args.plan.scaling_warmup
        )
        rows.append({"subject": "aef", "image": side, **timed})
        del ours, prepared, inputs, todo, conv_inputs  # before the next side's model
    rows.sort(key=lambda r: (r["subject"], r["image"]))
    return rows


def measure_default_sizes(args) -> dict:
    """Ours (aef) and torchrl's blocks mapped to our default sizes."""
    sizes = args.plan.default
    subjects = build_subjects(["aef"] + (["aef" + GRAPH] if args.graph else []), sizes, args)
    batch = random_batch(sizes, seed=2, device=args.device)
    prepared = {name: s.prepare(batch) for name, s in subjects.items()}
    capture_graphs(subjects, prepared, args)
    reps, warmup = args.plan.default_reps, args.plan.default_warmup
    log("default sizes: world-model update")
    wm = time_interleaved(calls(subjects, "wm_update", prepared, args), args.device, reps, warmup)
    log("default sizes: full update")
    full = time_interleaved(
        calls(subjects, "full_update", prepared, args), args.device, reps, warmup
    )
    out = {
        "sizes": sizes.record(),
        "parameters": {name: s.parameter_count() for name, s in subjects.items()},
        "wm_update": wm,
        "full_update": full,
    }
    for name in subjects:
        if name == "torchrl":
            continue
        suffix = "" if name == "aef" else "_graph"
        out[f"wm_update_speedup_vs_torchrl{suffix}"] = ratio(
            wm["torchrl"]["median_s"], wm[name]["median_s"]
        )
        out[f"full_update_speedup_vs_torchrl{suffix}"] = ratio(
            full["torchrl"]["median_s"], full[name]["median_s"]
        )
    return out


def measure_end_to_end(args) -> dict:
    """Ours (aef) at identical sizes, a fresh agent with the task's action size, in the loop."""
    from aefrl.bench.end_to_end import agent_steps_per_second
    from aefrl.envs import task_action_dim

    s = args.plan.identical
    torch.manual_seed(0)
    sizes = replace(s, action_dim=task_action_dim(args.task))
    ours = build_ours("aef", sizes, args.device, args.compile, args.autocast)
    return agent_steps_per_second(
        ours.agent,
        task=args.task,
        batch=s.batch,
        seq=s.seq,
        prefill=(s.seq + 4) * args.num_envs,
        steps=args.e2e_steps or args.plan.e2e_steps,
        train_ratio=args.plan.e2e_train_ratio,
        device=args.device,
        num_envs=args.num_envs,
        cuda_graph=args.graph,
        replay_storage=args.replay_storage,
    )


def measure_end_to_end_torchrl(args) -> dict | None:
    """torchrl's Dreamer (its env pipeline, collector, replay buffer and policy around the
    peer's update) at identical sizes, as :func:`measure_end_to_end` runs ours; None with
    ``--skip-e2e-torchrl``."""
    if args.skip_e2e_torchrl:
        return None
    from aefrl.bench.torchrl_end_to_end import torchrl_agent_steps_per_second

    log("end-to-end loop: torchrl")
    torch.manual_seed(0)
    s = args.plan.identical
    return torchrl_agent_steps_per_second(
        s,
        task=args.task,
        prefill=s.seq + 4,
        steps=args.e2e_steps or args.plan.e2e_steps,
        train_ratio=args.plan.e2e_train_ratio,
        device=args.device,
    )


def e2e_speedup(ours: dict | None, theirs: dict | None, args) -> float | None:
    """Our end-to-end agent steps/s over torchrl's; None where either did not run, or where
    they differ: torchrl's loop runs one env in float32, eagerly, ours with ``--num-envs``,
    ``--autocast`` and ``--compile`` as given."""
    if not ours or not theirs or args.num_envs != 1 or args.autocast != "none" or args.compile:
        return None
    return round(ours["agent_steps_per_s"] / theirs["agent_steps_per_s"], 3)


def collection_summary(args) -> dict | None:
    """scripts/bench_collect.py's results (rerun with --collect), summarised."""
    if args.collect:
        log("collection benchmark (scripts/bench_collect.py)")
        cmd = [sys.executable, str(ROOT / "scripts/bench_collect.py")] + (
            ["--quick"] if args.quick else []
        )
        subprocess.run(cmd, check=True)
    if not COLLECT_JSON.exists():
        return None
    data = json.loads(COLLECT_JSON.read_text())
    keep = ("impl", "task", "render", "num_envs", "agent_steps_per_s", "frames_per_s")
    return {
        "source": str(COLLECT_JSON.relative_to(ROOT)),
        "command": data.get("command"),
        "results": [{k: r[k] for k in keep} for r in data["results"]],
    }


# --- output --------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')} load {load_average()[0]}] {msg}", flush=True)


def headline(result: dict, kinds) -> None:
    ident = result["identical_sizes"]
    wm, full, conv = ident["wm_update"], ident["full_update"], ident["conv_bound"]
    by_wm = {k: ratio(wm["torchrl"]["median_s"], wm[k]["median_s"]) for k in kinds}
    by_full = {
        k: ratio(full["torchrl"]["median_s"], full[k]["median_s"]) for k in kinds if k in full
    }
    by_conv = {
        k: round(wm[k]["median_s"] / conv.get(f"{k}_trunks", conv["ours_trunks"])["median_s"], 3)
        for k in kinds
    }
    result["wm_update_speedup_vs_torchrl"] = by_wm["aef"]
    result["full_update_speedup_vs_torchrl"] = by_full["aef"]
    result["wm_update_over_conv_bound"] = by_conv["aef"]
    result["wm_update_speedup_vs_torchrl_by_model"] = by_wm
    result["full_update_speedup_vs_torchrl_by_model"] = by_full
    result["wm_update_over_conv_bound_by_model"] = by_conv
    # Ours replayed as one CUDA graph per update (--graph, GPU only).
    result["wm_update_speedup_vs_torchrl_graph"] = by_wm.get("aef" + GRAPH)
    result["full_update_speedup_vs_torchrl_graph"] = by_full.get("aef" + GRAPH)
    # Ours with torchrl's trunk geometry and no channel norms: the same convolutions on both
    # sides, so these ratios measure everything around them (RSSM, heads, losses, actor-critic).
    result["wm_update_speedup_vs_torchrl_same_trunks"] = by_wm.get("aef_v1")
    result["full_update_speedup_vs_torchrl_same_trunks"] = by_full.get("aef_v1")
    # The same from each callable's fastest call: interference on a shared machine only ever
    # adds time, so on a busy machine these are the steadier (if optimistic) ratios.
    result["ratios_from_min"] = {
        "wm_update_speedup_vs_torchrl": ratio(wm["torchrl"]["min_s"], wm["aef"]["min_s"]),
        "full_update_speedup_vs_torchrl": ratio(full["torchrl"]["min_s"], full["aef"]["min_s"]),
        "wm_update_over_conv_bound": round(wm["aef"]["min_s"] / conv["ours_trunks"]["min_s"], 3),
    }
    # Only in full runs (Plan.conv_detail); None in quick ones. The layers in channels-last,
    # the layout the update runs them in (runs before 2026-12-06 divided by the NCHW copies).
    layers, theirs = conv.get("ours_conv_layers_channels_last"), conv.get("torchrl_trunks")
    result["wm_update_over_conv_layers_bound"] = (
        round(wm["aef"]["median_s"] / layers["median_s"], 3) if layers else None
    )
    result["torchrl_wm_update_over_its_conv_bound"] = (
        round(wm["torchrl"]["median_s"] / theirs["median_s"], 3) if theirs else None
    )


def finish(result: dict, args, t0: float) -> None:
    """The closing fields of every result: load, wall time and, compiled, what dynamo did."""
    result["load_average"]["end"] = load_average()
    result["wall_s"] = round(time.time() - t0, 1)
    if args.compile:
        result["compile_stats"] = compile_stats()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allocator == "tuned":
        tune_malloc()  # as scripts/train.py does, for both implementations (same process)
    settle_allocator()  # first-call memory = warm-process memory (see its docstring)
    if args.compile:
        RecompileLimitWatch.install()  # a function past dynamo's limit runs eagerly: count them
    t0 = time.time()
    result: dict = {
        "command": command_line("scripts/bench.py", argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(args.device),
        "quick": args.quick,
        "reps": args.reps,
        "warmup": args.warmup,
        # aefrl.bench.timing since 2026-12-06: memory in an untimed round of its own, and each
        # round starts one implementation later (the report's text says which protocol ran)
        "memory_round": True,
        "plan": asdict(args.plan),
        "options": {
            "compile": args.compile,
            "cudagraphs": args.cudagraphs,
            "autocast": args.autocast,
            "graph": args.graph,
            "num_envs": args.num_envs,
            "replay_storage": args.replay_storage,
        },
        "machine": {
            **machine_info(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            # glibc malloc tunables change the page-fault cost of an update a lot on the CPU.
            "allocator": "tuned (aefrl.allocator.tune_malloc)" if malloc_tuned() else "glibc",
            "allocator_env": {
                k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"
            },
        },
        "load_average": {"start": load_average()},
    }
    log(f"start: {result['command']}")
    if args.only_e2e:
        result["end_to_end"] = measure_end_to_end(args)
        result["end_to_end_torchrl"] = measure_end_to_end_torchrl(args)
        result["e2e_speedup_vs_torchrl"] = e2e_speedup(
            result["end_to_end"], result["end_to_end_torchrl"], args
        )
        finish(result, args, t0)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        e = result["end_to_end"]
        log(
            f"done: {e['agent_steps_per_s']} agent steps/s ({e['timed_agent_steps']} steps, "
            f"{e['updates_in_timed_steps']} updates, {e['seconds']} s); ours / torchrl "
            f"{result['e2e_speedup_vs_torchrl']} -> {args.out}"
        )
        return result
    kinds = ["aef", "vae", "aef_v1"] + (["aef_partition"] if args.partition else [])
    if args.graph:
        kinds += ["aef" + GRAPH, "vae" + GRAPH]

    ident = measure_identical(args, kinds)
    if args.compile:  # the headline's own count; the whole run's is the result's
        ident["compile_stats"] = compile_stats()
    subjects = ident.pop("_subjects")
    result["identical_sizes"] = ident
    headline(result, kinds)
    result["scaling"] = measure_scaling(args, subjects, ident)
    del subjects  # the end-to-end run and the image sides build their own
    result["image_scaling"] = measure_image_scaling(args, ident)
    if args.skip_e2e:
        result["end_to_end"] = result["end_to_end_torchrl"] = None
    else:
        log("end-to-end loop")
        result["end_to_end"] = measure_end_to_end(args)
        result["end_to_end_torchrl"] = measure_end_to_end_torchrl(args)
    result["e2e_speedup_vs_torchrl"] = e2e_speedup(
        result["end_to_end"], result["end_to_end_torchrl"], args
    )
    result["default_sizes"] = measure_default_sizes(args)
    result["collection"] = collection_summary(args)
    result["architecture_notes"] = ARCHITECTURE_NOTES
    finish(result, args, t0)

    from aefrl.bench.report import markdown, update_docs

    md = markdown(result)
    write_result(args.out, result, md)
    if args.update_docs and not update_docs(DOCS, args.tag, md):
        log(f"no <!-- {args.tag}:begin/end --> block in {DOCS}: docs left as they were")
    log(
        f"done in {result['wall_s']:.0f} s: wm speedup {result['wm_update_speedup_vs_torchrl']}, "
        f"full speedup {result['full_update_speedup_vs_torchrl']}, "
        f"wm / conv bound {result['wm_update_over_conv_bound']} -> {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
