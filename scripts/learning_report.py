"""Learning curves from TensorBoard event files: a JSON, a markdown table and a PNG plot.

    python scripts/learning_report.py runs/learning/cartpole-swingup --out docs/results/learning
    python scripts/learning_report.py "γ 0.99=runs/gamma/cartpole-swingup" \
        "lr 3e-4=runs/critic_lr/cartpole-swingup" --name cartpole-swingup_critic

Reads ``eval/episode_return`` (deterministic policy, separate env) and, where present,
``heldout/bits_per_dim`` of every run under the given folders (a run = a folder holding
``tb/``), groups runs by their parent folder name (e.g. ``aef``, ``vae``) and reports the mean
and spread over seeds at each evaluation point. A folder given as ``LABEL=FOLDER`` prefixes its
groups with the label (``γ 0.99 aef``), so that variants of one agent stay apart. A table of
the runs gives each one's frames, its training speed and the machines and commands its
``provenance.jsonl`` records (written by ``scripts/train.py`` at every start; runs from before
it have none).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from aefrl.arguments import Parser, positive_int  # noqa: E402
from aefrl.provenance import command_line, read_run_records  # noqa: E402

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
TAGS = (
    "eval/episode_return",
    "heldout/bits_per_dim",
    "heldout/open_loop_mse_h45",
    "env/episode_return",
    "eval/critic_value",
    "eval/critic_return_to_go",
    "train/imag_value",
    "perf/fps",
)
# value / return-to-go per evaluation, derived per run: how far the critic is behind the policy
CRITIC_RATIO = "eval/critic_value_over_return"
# Training speed: frames over wall-clock time between consecutive logs (the event files' wall
# times of perf/fps, which itself averages since the process started and so folds the random
# prefill, evaluations and any pause into every later point), from FPS_FROM frames on.
FPS_FROM = 10000
WALL = "perf/wall_time"


def read_run(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags()["scalars"])
    run = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in TAGS if tag in have}
    if "perf/fps" in have:
        run[WALL] = [(e.step, e.wall_time) for e in acc.Scalars("perf/fps")]
    togo = dict(run.get("eval/critic_return_to_go", []))
    ratio = [(f, v / togo[f]) for f, v in run.get("eval/critic_value", []) if togo.get(f)]
    if ratio:
        run[CRITIC_RATIO] = ratio
    return run


def parse_root(text: str) -> tuple[str, Path]:
    """``"LABEL=FOLDER"`` -> ``(LABEL, FOLDER)``; a plain folder (or one whose name holds
    ``=``) -> ``("", folder)``."""
    label, sep, folder = text.partition("=")
    if sep and label and folder and not Path(text).exists():
        return label, Path(folder)
    return "", Path(text)


def collect(roots: list[tuple[str, Path]]) -> dict[str, dict[str, dict]]:
    """``{group: {run: {tag: [(frames, value)]}}}`` from ``(label, folder)`` pairs; a run's
    group is its parent folder's name, after the label if there is one."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for label, root in roots:
        for tb in sorted(root.glob("**/tb")):
            run = tb.parent
            group = f"{label} {run.parent.name}" if label else run.parent.name
            groups[group][str(run)] = read_run(tb)
    return groups


def run_info(run: Path, scalars: dict[str, list[tuple[int, float]]]) -> dict:
    """Frames reached, the median frames/s between consecutive logs from ``FPS_FROM`` frames on
    (a median, so the few periods holding an evaluation, a pause or a restart do not count),
    and what the run's ``provenance.jsonl`` says: the CPUs (and GPUs) it ran on and the
    command of every start."""
    records = read_run_records(run)
    wall = scalars.get(WALL, [])
    fps = [
        (f1 - f0) / (t1 - t0)
        for (f0, t0), (f1, t1) in pairwise(wall)
        if f0 >= FPS_FROM and f1 > f0 and t1 > t0
    ]
    machines = sorted({r["cpu"] + (f" + {r['gpu']}" if r.get("gpu") else "") for r in records})
    return {
        "frames": max((f for series in scalars.values() for f, _ in series), default=0),
        "fps_median": round(float(np.median(fps)), 1) if fps else None,
        "machines": machines,
        "commands": [r["command"] for r in records],
    }


def runs_table(info: dict[str, dict]) -> list[str]:
    lines = [
        f"| run | last logged frame | frames/s (median between logs, from {FPS_FROM}) | machine"
        " | starts |",
        "|---|---:|---:|---|---:|",
    ]
    for run, i in info.items():
        machine = ", ".join(i["machines"]) or "not recorded"
        fps = "" if i["fps_median"] is None else f"{i['fps_median']:.1f}"
        lines.append(f"| {run} | {i['frames']} | {fps} | {machine} | {len(i['commands'])} |")
    return lines


def summarise(runs: dict[str, dict], tag: str) -> list[dict]:
    """Mean / min / max over the runs that reached each step (``seeds`` says how many: seeds
    run for different lengths, and a longer one's late points are kept)."""
    series = [dict(r[tag]) for r in runs.values() if tag in r]
    if not series:
        return []
    steps = sorted(set.union(*(set(s) for s in series)))
    rows = []
    for step in steps:
        vals = np.array([s[step] for s in series if step in s])
        rows.append(
            {
                "frames": int(step),
                "mean": float(vals.mean()),
                "min": float(vals.min()),
                "max": float(vals.max()),
                "seeds": len(vals),
            }
        )
    return rows


def plot(curves: dict[str, list[dict]], path: Path, title: str, ylabel: str) -> None:
    """A plain line plot with a min-max band per group, drawn with Pillow."""
    w, h, left, right, top, bottom = 720, 420, 70, 20, 40, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pts = [(r["frames"], v) for rows in curves.values() for r in rows for v in (r["min"], r["max"])]
    if not pts:
        return
    x0, x1 = 0, max(p[0] for p in pts) or 1
    y0, y1 = min(0.0, min(p[1] for p in pts)), max(p[1] for p in pts) or 1.0

    def xy(x, y):
        px = left + (x - x0) / (x1 - x0) * (w - left - right)
        return px, h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        d.text((5, xy(0, yv)[1] - 6), f"{yv:.0f}", fill="black")
        xv = x0 + (x1 - x0) * i / 4
        d.text((xy(xv, y0)[0] - 15, h - bottom + 8), f"{xv / 1000:.0f}k", fill="black")
    d.text((w // 2 - 60, h - 20), "environment frames", fill="black")
    d.text((left, 10), f"{title}: {ylabel}", fill="black")
    for i, (name, rows) in enumerate(sorted((k, v) for k, v in curves.items() if v)):
        color = COLORS[i % len(COLORS)]
        if len(rows) > 1:
            band = [xy(r["frames"], r["max"]) for r in rows]
            band += [xy(r["frames"], r["min"]) for r in reversed(rows)]
            light = tuple(int(c + (255 - c) * 0.75) for c in color)
            d.polygon(band, fill=light)
            d.line([xy(r["frames"], r["mean"]) for r in rows], fill=color, width=3)
        seeds = max(r["seeds"] for r in rows)
        d.text((left + 10, top + 8 + 16 * i), f"{name} (n={seeds})", fill=color)
    img.save(path)


def windowed(runs: dict[str, dict], window: int, tag: str = "env/episode_return") -> list[dict]:
    """Per run, the mean of ``tag`` in ``window``-frame bins labelled by the bin's end (one
    value per training episode; since 2026-12-06 one per iteration that ended episodes, their
    mean where parallel envs ended several); then mean / min / max over the runs that have
    episodes in a bin."""
    per_bin: dict[int, list[float]] = defaultdict(list)
    for run in runs.values():
        bins: dict[int, list[float]] = defaultdict(list)
        for frames, value in run.get(tag, []):
            bins[-(-frames // window) * window].append(value)
        for end, values in bins.items():
            per_bin[end].append(float(np.mean(values)))
    return [
        {"frames": f, "mean": float(np.mean(v)), "min": min(v), "max": max(v), "seeds": len(v)}
        for f, v in sorted(per_bin.items())
    ]


def table(series: dict[str, list[dict]], fmt: str, runs: dict[str, int]) -> list[str]:
    """A markdown table, one row per frame count, one column per group: mean [min, max] over
    seeds, and "(k of n)" where only k of the group's n runs reached that point."""
    names = sorted(series)
    lines = [f"| frames | {' | '.join(names)} |", "|---:|" + "---:|" * len(names)]
    for step in sorted({r["frames"] for g in names for r in series[g]}):
        cells = []
        for g in names:
            row = next((r for r in series[g] if r["frames"] == step), None)
            if row is None:
                cells.append("")
                continue
            cell = fmt.format(row["mean"])
            if row["seeds"] > 1:
                cell += f" [{fmt.format(row['min'])}, {fmt.format(row['max'])}]"
            if row["seeds"] < runs[g]:
                cell += f" ({row['seeds']} of {runs[g]})"
            cells.append(cell)
        lines.append(f"| {step} | {' | '.join(cells)} |")
    return lines


def main(argv=None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("roots", nargs="+", help="folders holding runs, each FOLDER or LABEL=FOLDER")
    p.add_argument(
        "--out", type=Path, default=Path("docs/results/learning"), help="folder of the results"
    )
    p.add_argument("--name", default=None, help="file stem (default: the first folder's name)")
    p.add_argument("--window", type=positive_int, default=10000, help="frames per train-return bin")
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out takes a folder, and {args.out} is a file")
    roots = [parse_root(r) for r in args.roots]
    groups = collect(roots)
    folders = ", ".join(str(folder) for _, folder in roots)
    if not groups:
        print(f"error: no runs (folders with tb/) under {folders}", file=sys.stderr)
        return 2
    if not any(run for runs in groups.values() for run in runs.values()):
        print(
            f"error: the runs under {folders} logged none of the scalars reported", file=sys.stderr
        )
        return 2
    name = args.name or roots[0][1].resolve().name or "learning"  # "." names the folder
    args.out.mkdir(parents=True, exist_ok=True)
    curves = [tag for tag in (*TAGS, CRITIC_RATIO) if tag != "perf/fps"]  # speed: runs table
    result = {g: {tag: summarise(runs, tag) for tag in curves} for g, runs in groups.items()}
    for g in groups:  # a train/* point every log_every frames: keep the window's multiples
        rows = result[g]["train/imag_value"]
        result[g]["train/imag_value"] = [r for r in rows if r["frames"] % args.window == 0]
    result["_runs"] = {g: sorted(runs) for g, runs in groups.items()}
    info = {r: run_info(Path(r), groups[g][r]) for g in sorted(groups) for r in sorted(groups[g])}
    result["_run_info"] = info
    result["_command"] = command_line("scripts/learning_report.py", argv)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    returns = {g: result[g]["eval/episode_return"] for g in groups}
    plot(returns, args.out / f"{name}_return.png", name, "eval return (deterministic policy)")
    train = {g: windowed(runs, args.window) for g, runs in groups.items()}
    plot(train, args.out / f"{name}_train_return.png", name, "train return (window mean)")
    sections = [
        ("Eval return (deterministic policy, separate env)", "eval/episode_return", "{:.0f}"),
        (f"Train return (mean of the episodes in each {args.window}-frame window)", None, "{:.0f}"),
        ("Held-out bits/dim (latest evaluation episode)", "heldout/bits_per_dim", "{:.3f}"),
        ("Open-loop prediction MSE at horizon 45", "heldout/open_loop_mse_h45", "{:.5f}"),
        ("Critic's value of the visited states (eval episodes)", "eval/critic_value", "{:.1f}"),
        ("Discounted return the policy then collected", "eval/critic_return_to_go", "{:.1f}"),
        ("Critic value / discounted return (per run, then over seeds)", CRITIC_RATIO, "{:.2f}"),
        ("Critic's mean value of imagined states (train/imag_value)", "train/imag_value", "{:.1f}"),
    ]
    counts = {g: len(runs) for g, runs in groups.items()}
    lines: list[str] = []
    for title, tag, fmt in sections:
        series = train if tag is None else {g: result[g][tag] for g in groups}
        if any(series.values()):  # runs from before a tag existed have no table for it
            lines += [f"### {title}", "", *table(series, fmt, counts), ""]
    lines += ["### Runs", "", *runs_table(info), ""]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
