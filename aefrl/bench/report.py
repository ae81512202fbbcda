"""Markdown tables for ``scripts/bench.py``'s JSON result, and the docs/benchmarks.md block."""

from __future__ import annotations

from pathlib import Path


def _name(subject: str) -> str:
    if subject == "aef_v1":
        return "ours (aef, torchrl's trunks)"
    if subject.endswith("+graph"):
        return f"ours ({subject.removesuffix('+graph')}, CUDA graph)"
    return subject if subject == "torchrl" else f"ours ({subject})"


def _rssm_mlps(sizes: dict) -> str:
    """`` (its MLPs 200 wide)`` where the results record the RSSM's MLP width (since git
    c691f83; before, ours were ``hidden`` wide)."""
    return f" (its MLPs {sizes['rssm_hidden']} wide)" if "rssm_hidden" in sizes else ""


def _seconds(t: float) -> str:
    """Three decimals for CPU-scale times, four significant digits below 0.1 s (GPU)."""
    return f"{t:.3f}" if t >= 0.1 else f"{t:.4g}"


def _s(rec: dict | None) -> str:
    return "–" if rec is None else _seconds(rec["median_s"])


def _x(value) -> str:
    return "–" if value is None else str(value)


def _bold(value) -> str:
    return "–" if value is None else f"**{value}**"


def _sys(rec: dict | None) -> str:
    return "–" if rec is None else f"{rec['sys_s']:.2f} / {rec['minor_faults'] / 1e3:.0f}k"


def _mem(rec: dict | None) -> str:
    return "–" if rec is None else f"{rec['peak_mib']:.0f} (+{rec['delta_mib']:.0f})"


def _params(p: dict) -> str:
    return " / ".join(f"{p[k] / 1e6:.2f}M" for k in ("world_model", "actor", "critic"))


def _header(r: dict) -> list[str]:
    m = r["machine"]
    la = r["load_average"]
    return [
        f"Command: `{r['command']}` ({r['wall_s']:.0f} s in all, started {r['started']}).  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"GPU {m['gpu'] or 'none'}; torch {m['torch']}, torchrl {m['torchrl']}, tensordict "
        f"{m['tensordict']}, python {m['python']}; git {m['git']}; OMP_WAIT_POLICY="
        f"{m.get('OMP_WAIT_POLICY')}.  ",
        f"Load average (1, 5, 15 min) {la['start']} at start, {la['end']} at end: the machine is "
        "shared, so absolute times are inflated; compare within a run. "
        f"Headline times are medians of {r['reps']} timed calls"
        + (" after one warm-up round" if r.get("warmup", 1) else " (no warm-up round)")
        + ", interleaved round-robin across implementations (every call is in the JSON"
        + (
            "; each round starts one implementation later); memory is measured in an untimed "
            "call of each before them"
            if r.get("memory_round")
            else "); memory is measured on the first call of each"
        )
        + " (CPU: peak process RSS, in brackets its growth over the RSS before the call; GPU: "
        "max allocated). "
        f"Device {r['device']}, options {r['options']}; allocator "
        f"{m.get('allocator', 'glibc')}"
        + (f", environment {m['allocator_env']}" if m.get("allocator_env") else "")
        + ".",
    ]


def _headline(r: dict) -> list[str]:
    ident = r["identical_sizes"]
    s = ident["sizes"]
    kinds = list(r["wm_update_speedup_vs_torchrl_by_model"])
    cols = ["torchrl", *kinds]
    wm, full, img, conv = (
        ident[k] for k in ("wm_update", "full_update", "imagination", "conv_bound")
    )

    def row(label, cells):
        return f"| {label} | " + " | ".join(cells) + " |"

    def ac(k):
        return _seconds(full[k]["median_s"] - wm[k]["median_s"]) if k in full else "–"

    lines = [
        f"Identical sizes: state {s['latent']}, RSSM {s['deter']}{_rssm_mlps(s)}, hidden "
        f"{s['hidden']}, conv "
        f"depth {s['depth']}, batch {s['batch']} x {s['seq']} x 3 x {s['image']} x {s['image']} "
        f"uint8, {s['action_dim']}-d actions, horizon {s['horizon']}.",
        "",
        row("seconds (median)", [_name(c) for c in cols]),
        "|---|" + "---:|" * len(cols),
        row("world-model update", [_s(wm[k]) for k in cols]),
        row("full update (world model + actor + critic)", [_s(full.get(k)) for k in cols]),
        row("  of which actor + critic (full - wm medians)", [ac(k) for k in cols]),
        row(
            f"imagination rollout ({ident['imagination_start_states']} starts x {s['horizon']})",
            [_s(img.get(k)) for k in cols],
        ),
        row(
            "conv bound: encoder + decoder trunks fwd + bwd alone",
            [_s(conv.get("torchrl_trunks"))]
            + [_s(conv.get(f"{k}_trunks", conv["ours_trunks"])) for k in kinds],
        ),
        row(
            "conv bound: convolution layers alone (no norms, activations)",
            ["–"]
            + [_s(conv.get("ours_conv_layers")) if k in ("aef", "vae") else "–" for k in kinds],
        ),
        row(
            "conv bound: convolution layers alone, channels-last",
            ["–"]
            + [
                _s(conv.get("ours_conv_layers_channels_last")) if k in ("aef", "vae") else "–"
                for k in kinds
            ],
        ),
        row(
            "  kernel (sys) seconds / minor page faults per world-model update",
            [_sys(wm[k]) for k in cols],
        ),
        row("peak RSS MiB, world-model update", [_mem(wm[k]) for k in cols]),
        row("peak RSS MiB, full update", [_mem(full.get(k)) for k in cols]),
        row(
            "parameters: world model / actor / critic",
            [_params(ident["parameters"][k]) for k in cols],
        ),
        row(
            "**world-model update speedup (torchrl / ours)**",
            ["1"] + [f"**{r['wm_update_speedup_vs_torchrl_by_model'][k]}**" for k in kinds],
        ),
        row(
            "**full update speedup (torchrl / ours)**",
            ["1"] + [_bold(r["full_update_speedup_vs_torchrl_by_model"].get(k)) for k in kinds],
        ),
        row(
            "**world-model update / conv bound (trunks)**",
            [_x(r["torchrl_wm_update_over_its_conv_bound"])]
            + [f"**{r['wm_update_over_conv_bound_by_model'][k]}**" for k in kinds],
        ),
        row(
            "world-model update / convolution layers alone, channels-last",
            ["–", _x(r["wm_update_over_conv_layers_bound"])] + ["–"] * (len(kinds) - 1),
        ),
    ]
    graph = r.get("wm_update_speedup_vs_torchrl_graph")
    if graph is not None:
        lines += [
            "",
            "Ours with each update replayed as one captured CUDA graph (`--graph`): world-model "
            f"update speedup **{graph}**, full update speedup "
            f"**{_x(r.get('full_update_speedup_vs_torchrl_graph'))}** (against torchrl "
            f"{'compiled' if r['options'].get('compile') else 'eager'}, autocast "
            f"{r['options'].get('autocast', 'none')}; its Dreamer script ships with compiled "
            "losses and bf16 autocast: `--compile --autocast bf16`).",
        ]
    stats = r.get("compile_stats") if r["options"].get("compile") else None
    if stats is not None:
        lines += ["", _compile_line(r["identical_sizes"].get("compile_stats"), stats)]
    same = r.get("wm_update_speedup_vs_torchrl_same_trunks")
    if same is not None:
        lines += [
            "",
            "With torchrl's trunk geometry and no channel norms (`conv_style=v1 conv_norm=false`, "
            "the same convolutions on both sides): world-model update speedup "
            f"**{same}**, full update speedup "
            f"**{_x(r.get('full_update_speedup_vs_torchrl_same_trunks'))}**.",
        ]
    m = r.get("ratios_from_min")
    if m:
        lines += [
            "",
            "The same ratios from each implementation's fastest call (load only ever adds time): "
            f"world-model update speedup {m['wm_update_speedup_vs_torchrl']}, full update "
            f"speedup {m['full_update_speedup_vs_torchrl']}, world-model update / conv bound "
            f"{m['wm_update_over_conv_bound']}.",
        ]
    return lines


def _flops(r: dict) -> list[str]:
    ident = r["identical_sizes"]
    f = ident["conv_flops_per_image"]
    frames = ident["sizes"]["batch"] * ident["sizes"]["seq"]
    bounds = ident["conv_bound"]
    theirs_gflop = f["torchrl"]["conv_gflop_forward_backward"]

    def rate(name: str, gflop: float, what: str) -> str:
        if name not in bounds:
            return f"{what}: not measured (full runs only)"
        t = bounds[name]["median_s"]
        return f"{what} {gflop * frames / t:.0f} ({t:.2f} s)"

    ours = f["aef"]["conv_gflop_forward_backward"]
    return [
        "Convolution FLOPs of encoder + decoder per 64 x 64 image (torch.utils.flop_counter, "
        "2 per multiply-add; backward = input and weight gradients, as in the update):",
        "",
        "| | ours | torchrl |",
        "|---|---:|---:|",
        f"| conv GFLOP, forward | {f['aef']['conv_gflop_forward']} | "
        f"{f['torchrl']['conv_gflop_forward']} |",
        f"| conv GFLOP, forward + backward | {ours} | "
        f"{f['torchrl']['conv_gflop_forward_backward']} |",
        f"| all GFLOP (conv + linear), forward + backward | "
        f"{f['aef']['all_gflop_forward_backward']} | "
        f"{f['torchrl']['all_gflop_forward_backward']} |",
        "",
        f"Convolution GFLOP/s on the {frames} frames of the batch: "
        + "; ".join(
            [
                rate("ours_trunks", ours, "ours, whole trunks"),
                rate("ours_conv_layers", ours, "ours, convolution layers alone"),
                rate("ours_conv_layers_channels_last", ours, "the same in channels-last"),
                rate("torchrl_trunks", theirs_gflop, "torchrl, whole trunks"),
            ]
        )
        + ".",
    ]


def _work(r: dict) -> list[str]:
    w = r["identical_sizes"].get("update_flops")
    if not w:
        return ["Not measured in this run (older JSON)."]
    names = list(w)

    def cell(name, method, key):
        x = w[name].get(method)
        return "–" if x is None else str(x[key])

    lines = [
        "Matmul and convolution FLOPs of one update, counted by torch.utils.flop_counter "
        "(pointwise work, norms and activations are not counted), and the rate the median "
        "times above make of them:",
        "",
        "| | " + " | ".join(_name(n) for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for method, label in (("wm_update", "world-model update"), ("full_update", "full update")):
        lines += [
            f"| {label}: GFLOP (of which conv) | "
            + " | ".join(
                f"{cell(n, method, 'gflop')} ({cell(n, method, 'conv_gflop')})" for n in names
            )
            + " |",
            f"| {label}: GFLOP/s | "
            + " | ".join(cell(n, method, "gflop_per_s") for n in names)
            + " |",
        ]
    return lines


def _profile(r: dict) -> list[str]:
    prof = r["identical_sizes"]["profile"]
    names = [n for n in ("wm_update_aef", "full_update_aef", "wm_update_torchrl") if n in prof]
    lines = [
        "Self time per operator family (torch.profiler, one call each; the profiler adds "
        "overhead, so shares matter, not totals):",
        "",
        "| family | " + " | ".join(n.replace("_", " ") for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    groups = []
    for n in names:
        groups += [g for g in prof[n]["groups"] if g not in groups]
    for g in groups:
        cells = []
        for n in names:
            x = prof[n]["groups"].get(g)
            cells.append("–" if x is None else f"{x['self_ms']:.0f} ms ({100 * x['share']:.0f}%)")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    totals = " | ".join(f"{prof[n]['total_self_ms']:.0f} ms" for n in names)
    lines += [f"| **total** | {totals} |"]
    for phase in prof[names[0]]["phases"]:
        cells = []
        for n in names:
            x = prof[n]["phases"][phase]
            cells.append(f"{x['self_ms']:.0f} ms ({100 * x['share']:.0f}%)")
        lines.append(f"| phase: {phase} | " + " | ".join(cells) + " |")
    lines.append("")
    p = prof["wm_update_aef"]
    lines += [
        "Top operators of our (aef) world-model update by self time:",
        "",
        "| operator | phase | family | self ms | share | calls |",
        "|---|---|---|---:|---:|---:|",
    ]
    for op in p["top_ops"]:
        lines.append(
            f"| `{op['op']}` | {op['phase']} | {op['group']} | {op['self_ms']:.0f} | "
            f"{100 * op['share']:.1f}% | {op['calls']} |"
        )
    return lines


def _scaling(r: dict) -> list[str]:
    horizon = r["identical_sizes"]["sizes"]["horizon"]
    lines = [
        f"Each update and the imagination ({horizon} steps from every one of the B·T posterior "
        "states) against batch size B and sequence length T, interleaved per point; ms per frame "
        "of the full update; peak RSS of the process during each update (growth in brackets):",
        "",
        "| implementation | B x T | frames | world-model update s | full update s | "
        "imagination s | ms per frame (full) | peak RSS MiB, wm / full |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in r["scaling"]:
        frames = row["batch"] * row["seq"]
        wm, full, imag = row["wm_update"], row["full_update"], row["imagination"]
        lines.append(
            f"| {_name(row['subject'])} | {row['batch']} x {row['seq']} | {frames} | "
            f"{_s(wm)} | {_s(full)} | {_s(imag)} | {1000 * full['median_s'] / frames:.3g} | "
            f"{_mem(wm)} / {_mem(full)} |"
        )
    return lines


def _image_scaling(r: dict) -> list[str]:
    rows = r.get("image_scaling")
    if not rows:  # results written before the image sides were measured
        return ["Not measured in this run."]
    s = r["identical_sizes"]["sizes"]
    lines = [
        f"Ours (aef) at the headline's sizes (batch {s['batch']} x {s['seq']}) on images of each "
        "side, a model built per side (one stride-2 conv stage more per doubling); the conv bound "
        "is its encoder + decoder trunks alone, timed in the same interleaved rounds. torchrl's "
        "`ObsDecoder` decodes 64 x 64 only, so it has the headline's row alone. Peak RSS as "
        "above (growth in brackets):",
        "",
        "| implementation | image | world-model update s | full update s | imagination s | "
        "conv bound s | wm / conv bound | µs per pixel (full) | peak RSS MiB, wm / full | "
        "kernel s / minor faults per call, wm / conv bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        side, wm, bound = row["image"], row["wm_update"], row["conv_bound"]
        pixels = s["batch"] * s["seq"] * side * side
        over = "–" if bound is None else f"{wm['median_s'] / bound['median_s']:.3f}"
        lines.append(
            f"| {_name(row['subject'])} | {side} x {side} | {_s(wm)} | {_s(row['full_update'])} | "
            f"{_s(row['imagination'])} | {_s(bound)} | {over} | "
            f"{1e6 * row['full_update']['median_s'] / pixels:.3g} | "
            f"{_mem(wm)} / {_mem(row['full_update'])} | {_sys(wm)} / {_sys(bound)} |"
        )
    return lines


def _defaults(r: dict) -> list[str]:
    d = r["default_sizes"]
    s = d["sizes"]
    lines = [
        f"Our defaults (configs/agent/dreamer.yaml): state {s['latent']}, deter {s['deter']}, "
        f"hidden {s['hidden']}, depth {s['depth']}, actor/critic {s['ac_layers']} x "
        f"{s['hidden']}, batch {s['batch']} x {s['seq']}; torchrl's blocks mapped to the same "
        "numbers (state_dim, rssm_hidden_dim, hidden_dim, channels, MLP depths).",
        "",
        "| seconds (median) | torchrl | ours aef | speedup |",
        "|---|---:|---:|---:|",
        f"| world-model update | {_s(d['wm_update']['torchrl'])} | {_s(d['wm_update']['aef'])} "
        f"| {d['wm_update_speedup_vs_torchrl']} |",
        f"| full update | {_s(d['full_update']['torchrl'])} | {_s(d['full_update']['aef'])} | "
        f"{d['full_update_speedup_vs_torchrl']} |",
        f"| peak RSS MiB, full update | {_mem(d['full_update']['torchrl'])} | "
        f"{_mem(d['full_update']['aef'])} | |",
        f"| parameters | {_params(d['parameters']['torchrl'])} | "
        f"{_params(d['parameters']['aef'])} | |",
    ]
    if "aef+graph" in d["wm_update"]:
        lines += [
            f"| world-model update, ours as a CUDA graph | | {_s(d['wm_update']['aef+graph'])} "
            f"| {d['wm_update_speedup_vs_torchrl_graph']} |",
            f"| full update, ours as a CUDA graph | | {_s(d['full_update']['aef+graph'])} "
            f"| {d['full_update_speedup_vs_torchrl_graph']} |",
        ]
    return lines


def _e2e(r: dict) -> list[str]:
    e = r["end_to_end"]
    if e is None:
        return ["Not run (`--skip-e2e`)."]
    return [
        f"Ours (aef, identical sizes) in `aefrl.loop.Trainer` on {e['task']} (render "
        f"{e['render']}, {e.get('num_envs', 1)} env(s)"
        + (", updates as CUDA graphs" if e.get("cuda_graph") else "")
        + (
            ", CUDA graphs asked for but the capture failed: eager updates"
            if e.get("cuda_graph_requested") and not e.get("cuda_graph")
            else ""
        )
        + (", replay on the device" if e.get("replay_storage") == "device" else "")
        + f"), train ratio {e['train_ratio']:g} at batch {e['batch']}, after "
        f"{e['prefill_steps']} prefill steps: **{e['agent_steps_per_s']} agent steps/s** "
        f"({e['env_frames_per_s']} env frames/s; {e['timed_agent_steps']} agent steps with "
        f"{e['updates_in_timed_steps']} full updates in {e['seconds']} s).",
        *_e2e_torchrl(r),
    ]


def _e2e_torchrl(r: dict) -> list[str]:
    t = r.get("end_to_end_torchrl")
    if not t:  # --skip-e2e-torchrl, or results from before it was measured
        return ["", "torchrl's Dreamer loop: not run."]
    return [
        "",
        f"torchrl's Dreamer (its env pipeline, collector, replay buffer and acting policy around "
        f"the same update as the headline's; `aefrl/bench/torchrl_end_to_end.py`) on "
        f"{t['task']} ({t['render']}), train ratio {t['train_ratio']:g} at batch {t['batch']}, "
        f"after {t['prefill_steps']} prefill steps, collecting {t['frames_per_batch']} agent "
        f"steps between trainings: **{t['agent_steps_per_s']} agent steps/s** "
        f"({t['timed_agent_steps']} agent steps with {t['updates_in_timed_steps']} full updates "
        f"in {t['seconds']} s). "
        + (
            f"**End-to-end speedup (ours / torchrl): {r['e2e_speedup_vs_torchrl']}** (the two "
            "loops ran one after the other, not interleaved)."
            if r.get("e2e_speedup_vs_torchrl") is not None
            else "No speedup: ours ran with other envs, precision or compilation than "
            "torchrl's eager float32 loop with one env."
        ),
    ]


def _collection(r: dict) -> list[str]:
    c = r.get("collection")
    if not c:
        return ["No collection results (run scripts/bench_collect.py)."]
    lines = [
        f"From `{c['source']}` (`{c['command']}`; rerun with `--collect`):",
        "",
        "| env | task | render | envs | agent steps/s | frames/s |",
        "|---|---|---|---:|---:|---:|",
    ]
    for x in c["results"]:
        lines.append(
            f"| {x['impl']} | {x['task']} | {x['render']} | {x['num_envs']} | "
            f"{x['agent_steps_per_s']} | {x['frames_per_s']} |"
        )
    return lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _compile_line(headline: dict | None, run: dict) -> str:
    """What dynamo did by the end of the identical-sizes measurements (``headline``; None in
    results from before that count was taken) and of the whole run (ours and torchrl's compiled
    functions together)."""

    def past(stats: dict) -> str:
        n, names = stats["recompile_limit_hits"], stats["functions_past_limit"]
        if not n:
            return "no function hit its recompile limit"
        return (
            f"**{_plural(n, 'function')} hit its recompile limit and ran eagerly from then on**"
            + (f" ({', '.join(names)})" if names else "")
        )

    text = "Compiled (`--compile`, ours and torchrl's losses): "
    if headline is not None:
        text += (
            f"in the identical-sizes measurements dynamo made "
            f"{_plural(headline['unique_graphs'], 'graph')} and {past(headline)}"
        )
        if headline["recompile_limit_hits"]:
            text += ": the compiled times above are partly eager"
        if run == headline:
            return text + "."
        text += "; by the end of the run, "
    else:
        text += "in the whole run, "
    text += f"dynamo made {_plural(run['unique_graphs'], 'graph')} and {past(run)}"
    if run["recompile_limit_hits"] > (headline or {}).get("recompile_limit_hits", 0):
        where = "the later sections'" if headline is not None else "some"
        text += f": {where} compiled times are partly eager"
    return text + "."


def markdown(r: dict) -> str:
    """The whole result as markdown (header, then one section per measurement)."""
    sections = [
        ("Headline: identical sizes", _headline(r)),
        ("Work per update", _work(r)),
        ("Convolution FLOPs", _flops(r)),
        ("Where the time goes", _profile(r)),
        ("Scaling", _scaling(r)),
        ("Image size", _image_scaling(r)),
        ("Our default sizes", _defaults(r)),
        ("End to end", _e2e(r)),
        ("Collection", _collection(r)),
        (
            "Architecture differences (why identical sizes are not identical networks)",
            [f"* {n}" for n in r["architecture_notes"]],
        ),
    ]
    lines = _header(r)
    for title, body in sections:
        lines += ["", f"### {title}", "", *body]
    text = "\n".join(lines) + "\n"
    if str(r["device"]).startswith("cuda"):  # there the memory is torch's max allocated
        for rss, allocated in _GPU_MEMORY_WORDS:
            text = text.replace(rss, allocated)
    return text


# What the tables call the memory of a CPU run, and of a GPU run (the header says both).
_GPU_MEMORY_WORDS = (
    ("peak RSS MiB", "max allocated MiB"),
    ("peak RSS of the process", "max allocated GPU memory"),
    ("Peak RSS as above", "Max allocated GPU memory as above"),
)


def update_docs(path: Path, tag: str, md: str) -> bool:
    """Replace the block between ``<!-- <tag>:begin -->`` and ``<!-- <tag>:end -->`` in
    ``path`` with ``md``; False (and nothing written) when the markers are missing."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    text = path.read_text() if path.exists() else ""
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{begin}\n{md}{end}{tail}")
    return True
