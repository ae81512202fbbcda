"""Likelihood study: VAE vs AEF observation models on DMC frames (issue: obs models).

Collects 64x64 frames from several DMC tasks with random actions, splits them by episode,
trains vae, aef and aef_partition with identical trunks at several latent sizes, and reports
held-out bits/dim (estimator named), reconstruction error and sharpness, with one PNG grid of
real / reconstructed / sampled frames per model.

    python scripts/likelihood_study.py                       # the documented run
    python scripts/likelihood_study.py --steps 200 --quick   # a few-minute smoke version

Results go to --out (default docs/results/likelihood_study/; with --quick
runs/likelihood_study_quick/): results.json, table.md, grids; TensorBoard curves and the models
to --logdir. Finished models are kept in results.json, and a rerun with the same arguments skips
them, so an interrupted study loses at most the model in progress; one with other settings is
refused (another --out keeps both).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from aefrl.arguments import Parser, positive_float, positive_int
from aefrl.logging import RunLogger, image_grid
from aefrl.metrics import mse, psnr, sharpness_ratio, ssim
from aefrl.obs_models import make_obs_model
from aefrl.preprocess import Preprocess
from aefrl.provenance import machine_info
from aefrl.seeding import forked_torch_rng

ESTIMATORS = {
    "vae": "importance sampling, posterior proposal, K={k}",
    "aef": "importance sampling over u, N(Wy+b, s²I) proposal (s tuned on held-out), K={k}",
    "aef_partition": "exact",
}


#: What --quick sets, where the command line does not set it itself.
QUICK = {
    "episodes": 3,
    "heldout": 2,
    "episode_steps": 60,
    "num_samples": 16,
    "eval_frames": 40,
    # not over the documented study's results and models
    "out": "runs/likelihood_study_quick",
    "logdir": "runs/likelihood_study_quick/tb",
}
#: Options that choose what an invocation (re)computes, and where it keeps files; every other
#: one is a setting the stored numbers depend on.
PER_RUN = ("out", "evaluate_only", "models", "retrain", "logdir", "data_dir")
#: The settings a saved model's weights depend on (its frames and its training), stored with
#: them: --evaluate-only may change the others (the estimator's samples, the frames scored).
TRAINED_WITH = ("tasks", "episodes", "heldout", "episode_steps", "steps", "batch", "lr", "depth",
                "seed", "render")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    # No abbreviations: --quick must see which options were given (--num-samp 4 was overridden).
    p = Parser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--tasks", nargs="+", default=["walker-walk", "cartpole-swingup", "cheetah-run"])
    p.add_argument(
        "--episodes", type=positive_int, default=6, help="episodes per task (train + held-out)"
    )
    p.add_argument(
        "--heldout",
        type=positive_int,
        default=2,
        help="held-out episodes per task (>= 2: "
        "the first tunes the AEF proposal, the rest are evaluated)",
    )
    p.add_argument(
        "--episode-steps", type=positive_int, default=500, help="agent steps per episode"
    )
    p.add_argument(
        "--kinds", nargs="+", default=["vae", "aef", "aef_partition"], choices=ESTIMATORS
    )
    p.add_argument("--latents", nargs="+", type=positive_int, default=[2, 8, 32])
    p.add_argument("--steps", type=positive_int, default=4000, help="training steps per model")
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=5e-4)
    p.add_argument(
        "--depth", type=positive_int, default=32, help="conv trunk depth (same for all models)"
    )
    p.add_argument(
        "--num-samples", type=positive_int, default=128, help="K for importance sampling"
    )
    p.add_argument(
        "--eval-frames", type=positive_int, default=300, help="held-out frames evaluated"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", default="faithful", choices=["faithful", "fast"])
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny data and K for a smoke run (options given on the command line keep their "
        "values)",
    )
    p.add_argument(
        "--out",
        default="docs/results/likelihood_study",
        help="results folder (default: %(default)s; with --quick, runs/likelihood_study_quick)",
    )
    p.add_argument(
        "--logdir",
        default="runs/likelihood_study",
        help="TensorBoard curves and models (default: %(default)s; with --quick, "
        "runs/likelihood_study_quick/tb)",
    )
    p.add_argument("--data-dir", default="data")
    p.add_argument(
        "--models",
        nargs="+",
        help="only these models of the grid (names like aef_d2); default: all",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the selected models again even when results.json has them",
    )
    p.add_argument(
        "--evaluate-only",
        action="store_true",
        help="re-evaluate the models saved by an earlier run (<logdir>/<model>/model.pt)",
    )
    args = p.parse_args(argv)
    if args.quick:  # it overrode options given with it, which then looked like stored results
        flags = [a for a in (argv or sys.argv[1:]) if a.startswith("--")]
        given = {a.split("=", 1)[0][2:].replace("-", "_") for a in flags}
        for name, value in QUICK.items():
            if name not in given:
                setattr(args, name, value)
    if args.heldout < 2 or args.episodes <= args.heldout:
        p.error("need --heldout >= 2 and --episodes > --heldout")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out takes a folder, and {args.out} is a file")
    grid = [name for name, _, _ in model_grid(args)]
    unknown = sorted(set(args.models or []) - set(grid))
    if unknown:
        p.error(f"unknown --models {', '.join(unknown)}: the grid has {', '.join(grid)}")
    from aefrl.envs.dmc import task_action_dim  # dm_control's import: after --help

    for task in args.tasks:
        try:
            task_action_dim(task)  # loads its physics only
        except ValueError as exc:
            p.error(f"--tasks: {exc}")
    results = Path(args.out) / "results.json"
    if results.exists():  # a rerun with other settings would drop (or mix in) their rows
        stored = json.loads(results.read_text())
        changed = sorted(k for k, v in settings(args).items() if stored.get("args", {}).get(k) != v)
        if stored.get("models") and changed:
            p.error(
                f"--out {args.out} holds results of other settings ({', '.join(changed)}): "
                "use the same settings, or another --out"
            )
    return args


def model_grid(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(name, kind, latent size) of every model of the grid, in the order they are trained."""
    return [(f"{kind}_d{d}", kind, d) for d in args.latents for kind in args.kinds]


def settings(args: argparse.Namespace) -> dict:
    """The options a model's numbers depend on (all but :data:`PER_RUN`)."""
    return {k: v for k, v in vars(args).items() if k not in PER_RUN}


# --- data -----------------------------------------------------------------------------------------
def collect_frames(args) -> dict[str, np.ndarray]:
    """``{task: uint8 [episodes, steps, 3, 64, 64]}`` from random actions, cached on disk."""
    from aefrl.envs import make_dmc_env

    tag = (
        f"{'_'.join(args.tasks)}_e{args.episodes}_t{args.episode_steps}_s{args.seed}_{args.render}"
    )
    path = Path(args.data_dir) / f"study_frames_{tag}.npz"
    if path.exists():
        with np.load(path) as data:
            return {task: data[task] for task in args.tasks}
    frames = {}
    for task in args.tasks:
        episodes = []
        for ep in tqdm(range(args.episodes), desc=f"collect {task}", leave=False):
            env = make_dmc_env(task, seed=args.seed * 1000 + ep, render=args.render)
            td = env.rollout(args.episode_steps, break_when_any_done=False)
            episodes.append(td["pixels"].numpy())
            env.close()
        frames[task] = np.stack(episodes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **frames)
    tmp.replace(path)
    return frames


def split(frames: dict[str, np.ndarray], args):
    """Train frames, proposal-tuning frames, evaluation frames (uint8 tensors), split by episode."""
    train = np.concatenate([f[: -args.heldout].reshape(-1, *f.shape[2:]) for f in frames.values()])
    tune = np.concatenate([f[-args.heldout] for f in frames.values()])
    evals = np.concatenate(
        [f[-args.heldout + 1 :].reshape(-1, *f.shape[2:]) for f in frames.values()]
    )
    pick = np.linspace(0, len(evals) - 1, min(args.eval_frames, len(evals))).round().astype(int)
    pick_tune = np.linspace(0, len(tune) - 1, min(128, len(tune))).round().astype(int)
    return torch.from_numpy(train), torch.from_numpy(tune[pick_tune]), torch.from_numpy(evals[pick])


# --- training ------------------------------------------------------------------------------------
def train(model, pre, train_frames, args, logger, name):
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    dims = pre.num_dims
    bar = tqdm(range(args.steps), desc=f"train {name}", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(train_frames), (args.batch,), generator=gen)
        y, logdet = pre.encode(train_frames[idx])
        objective = model.objective(y) + logdet
        loss = -objective.mean() / dims
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            with torch.no_grad():
                e, _ = model.embed(y)
                _, sigma_q = model.posterior(e)
                sigma_x = model.decoder_params(torch.zeros(1, model.latent_dim))[1]
            obj_bpd = float(
                pre.bits_per_dim(objective.detach().mean() - logdet.mean(), logdet.mean())
            )
            logger.log_scalars(
                {
                    "objective_bpd": obj_bpd,
                    "grad_norm": grad_norm,
                    "sigma_q_mean": sigma_q.mean(),
                    "sigma_q_min": sigma_q.min(),
                    "sigma_q_max": sigma_q.max(),
                    "sigma_x_mean": sigma_x.mean(),
                },
                step,
                prefix="train",
            )
            bar.set_postfix(objective_bpd=f"{obj_bpd:.3f}")


def trained_with(args: argparse.Namespace) -> dict:
    """The :data:`TRAINED_WITH` settings of this invocation."""
    return {k: v for k, v in settings(args).items() if k in TRAINED_WITH}


def save_model(path: Path, model: torch.nn.Module, args: argparse.Namespace) -> None:
    """The weights with the settings that trained them (:func:`check_saved_models`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"weights": model.state_dict(), "trained_with": trained_with(args)}, tmp)
    tmp.replace(path)


def saved_weights(path: Path) -> tuple[dict, dict | None]:
    """A saved model's weights and the settings that trained them (None for a file from before
    they were stored: its weights alone)."""
    stored = torch.load(path, weights_only=True)
    if set(stored) == {"weights", "trained_with"}:
        return stored["weights"], stored["trained_with"]
    return stored, None


def _flag_value(value) -> str:
    """A setting as the command line gives it (``--tasks a b``, not ``['a', 'b']``)."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def check_saved_models(args: argparse.Namespace, names: list[str]) -> str | None:
    """For --evaluate-only: the reason not to score the saved models ``names`` under these
    settings (one trained with others, e.g. another study's under the same --logdir), or None."""
    for name in names:
        path = Path(args.logdir) / name / "model.pt"
        stored = saved_weights(path)[1] if path.exists() else None
        if stored is None:
            continue
        ours = trained_with(args)
        changed = sorted(k for k in ours if stored.get(k) != ours[k])
        if changed:
            flags = ", ".join(
                f"--{k.replace('_', '-')} {_flag_value(stored.get(k))}" for k in changed
            )
            return (
                f"{path} was trained with other settings than these ({flags}): evaluate it "
                "with those, or pass the --logdir of the models these settings trained"
            )
    return None


# --- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, pre, tune_frames, eval_frames, args, logger, name):
    gen_state = torch.random.get_rng_state()
    out: dict = {}
    if model.kind == "aef":
        with forked_torch_rng(args.seed + 2):  # leaves the generator the scoring draws from alone
            y_tune, _ = pre.encode(tune_frames)
            out["proposal_scale_search"] = model.tune_proposal_scale(
                y_tune, num_samples=min(args.num_samples, 32)
            )
        out["proposal_scale"] = model.proposal_scale
    # Every model scores the same dequantisation noise (and the same proposal draws where the
    # estimators match): drawn right after this seed. Results stored before 2026-12-06 drew the
    # aef's after its tuning, so its noise differed from the others' (~1e-4 bits/dim per frame).
    torch.manual_seed(args.seed + 1)
    y, logdet = pre.encode(eval_frames)
    log_p = torch.cat(
        [
            model.log_likelihood(yc, num_samples=args.num_samples, chunk_size=2048)
            for yc in tqdm(y.split(32), desc=f"log p {name}", leave=False)
        ]
    )
    bpd = pre.bits_per_dim(log_p, logdet)
    out["bpd"] = float(bpd.mean())
    out["bpd_sem"] = block_sem(bpd.numpy(), len(args.tasks))
    out["bpd_per_frame"] = [round(float(b), 5) for b in bpd]  # for paired comparisons
    out["estimator"] = ESTIMATORS[model.kind].format(k=args.num_samples)

    real = eval_frames.float() / 255
    noise = torch.zeros(len(y), model.latent_dim)  # VAE reconstructs from the posterior mean
    z = torch.cat([model.encode(yc, noise=nc) for yc, nc in zip(y.split(64), noise.split(64))])
    recon = torch.cat([pre.inverse(model.decode(zc)) for zc in z.split(64)])
    samples = pre.inverse(model.sample(64, pixel_noise=False))
    out["recon_mse"] = float(mse(recon, real).mean())
    out["recon_psnr"] = float(psnr(recon, real).mean())
    out["recon_ssim"] = float(ssim(recon, real).mean())
    out["sharpness_recon"] = sharpness_ratio(recon, real)
    out["sharpness_samples"] = sharpness_ratio(samples, real)
    show = np.linspace(0, len(real) - 1, 8).round().astype(int)
    grid = image_grid([real[show], recon[show], samples[:8]])
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
        Path(args.out) / f"grid_{name}.png"
    )
    logger.log_image("eval/real_recon_samples", grid, args.steps)
    logger.log_scalars({k: v for k, v in out.items() if isinstance(v, float)}, args.steps, "eval")
    torch.random.set_rng_state(gen_state)
    return out


# --- report --------------------------------------------------------------------------------------
def write_table(results: dict, args, command: str) -> None:
    lines = [
        "| model | d | held-out bits/dim | minus vae (paired) | minus vae per task | estimator | "
        "recon MSE | recon PSNR (dB) | recon SSIM | sharpness recon | sharpness samples | "
        "train s |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    tasks = len(results["data"]["tasks"])
    for d in args.latents:
        base = results["models"].get(f"vae_d{d}", {}).get("bpd_per_frame")
        for kind in args.kinds:
            r = results["models"].get(f"{kind}_d{d}")
            if r is None:
                continue
            paired, per_task = "–", "–"
            frames = r.get("bpd_per_frame")
            sem = r["bpd_sem"] if frames is None else block_sem(frames, tasks)
            if kind != "vae" and base is not None and frames is not None:
                diff = np.asarray(frames) - np.asarray(base)
                paired = f"{diff.mean():+.4f} ± {block_sem(diff, tasks):.4f}"
                if len(diff) % tasks == 0:
                    per_task = " / ".join(f"{m:+.3f}" for m in diff.reshape(tasks, -1).mean(1))
            lines.append(
                f"| {kind} | {d} | {r['bpd']:.3f} ± {sem:.3f}{'' if frames else '*'} | {paired} | "
                f"{per_task} | "
                f"{r['estimator']} | {r['recon_mse']:.5f} | {r['recon_psnr']:.2f} | "
                f"{r['recon_ssim']:.3f} | {r['sharpness_recon']:.3f} | "
                f"{r['sharpness_samples']:.3f} | {r['train_seconds']:.0f} |"
            )
    m = results["machine"]
    header = (
        f"Command: `{command}`\n\nMachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"(git {m['git']}). Held-out: {results['data']['eval_frames']} frames from unseen "
        f"episodes of {', '.join(args.tasks)} (one episode each, frames in time order); ± is "
        f"the standard error from blocks of {BLOCK} consecutive frames, stratified by episode "
        "(neighbouring frames are correlated: a standard error over single frames would "
        "understate it). 'minus "
        "vae' is the paired difference to the VAE with the same d on the same frames (negative: "
        "better than the VAE), overall and per task in the order above. Sharpness is the mean "
        "image-gradient magnitude relative to real held-out frames (1 = as sharp). *: a row "
        "whose per-frame values were not stored; its ± is over single frames.\n\n"
    )
    (Path(args.out) / "table.md").write_text(header + "\n".join(lines) + "\n")


BLOCK = 10  # held-out frames per block of the standard error (50 agent steps apart at most)


def block_sem(values, tasks: int, block: int = BLOCK) -> float:
    """Standard error of the mean of per-frame ``values`` (``tasks`` episodes of equal length one
    after another, each in time order), stratified by episode: within each, the means of
    non-overlapping blocks of ``block`` consecutive frames (batch means: frames a few steps apart
    are correlated, so the spread of single frames over √n understates the error); across
    them, ``sqrt(Σ_t var_t / m_t) / T``. The tasks are fixed, not sampled, so the differences
    between their levels are no part of the error."""
    x = np.asarray(values, dtype=np.float64)
    # Frames picked evenly over the concatenated episodes split evenly only when they divide;
    # otherwise (or with under two per episode) blocks may straddle episodes (short runs).
    x = x.reshape(tasks if len(x) % tasks == 0 and len(x) >= 2 * tasks else 1, -1)
    block = min(block, max(1, x.shape[1] // 2))  # at least two blocks per episode
    usable = x.shape[1] // block * block
    means = x[:, :usable].reshape(x.shape[0], -1, block).mean(2)  # [episodes, blocks]
    variance_of_mean = (means.var(axis=1, ddof=1) / means.shape[1]).sum() / x.shape[0] ** 2
    return float(math.sqrt(variance_of_mean))


def save_model_result(path: Path, results: dict, name: str, result: dict) -> dict:
    """Write one model's result into ``path`` atomically and return the merged results.

    Models finished meanwhile by another invocation with the same settings (e.g. ``--models
    vae_d8`` and ``--models aef_d8`` run side by side) are kept: the file is re-read first.
    """
    merged = dict(results)
    if path.exists():
        on_disk = json.loads(path.read_text())
        if on_disk.get("args") == results.get("args"):
            # the file wins for every other model: this process wrote its own earlier ones there
            merged["models"] = {**results["models"], **on_disk.get("models", {})}
    merged["models"] = {**merged["models"], name: result}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=2))
    tmp.replace(path)
    return merged


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    selected = [(n, k, d) for n, k, d in model_grid(args) if not args.models or n in args.models]
    problem = check_saved_models(args, [n for n, _, _ in selected]) if args.evaluate_only else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not results.get("models"):  # parse_args refused stored models of other settings
        results = {"models": {}}
    results["args"] = settings(args)
    results["command"] = command
    results["machine"] = machine_info()

    frames = collect_frames(args)
    train_frames, tune_frames, eval_frames = split(frames, args)
    results["data"] = {
        "train_frames": len(train_frames),
        "tune_frames": len(tune_frames),
        "eval_frames": len(eval_frames),
        "tasks": args.tasks,
    }
    pre = Preprocess((3, 64, 64), alpha=0.05)
    for name, kind, d in selected:
        done = results["models"].get(name)
        if done is not None and not (args.evaluate_only or args.retrain):
            print(f"{name}: done already, skipping")
            continue
        torch.manual_seed(args.seed)
        model = make_obs_model(kind, (3, 64, 64), d, depth=args.depth)
        logger = RunLogger(name, log_dir=args.logdir)
        saved = Path(args.logdir) / name / "model.pt"
        if args.evaluate_only:
            if not saved.exists():
                print(f"{name}: no saved model at {saved}, skipping")
                continue
            model.load_state_dict(saved_weights(saved)[0])
            seconds = done["train_seconds"] if done else float("nan")
        else:
            logger.log_config({"model": name, **results["args"]})
            start = time.time()
            train(model, pre, train_frames, args, logger, name)
            seconds = time.time() - start
            save_model(saved, model, args)
        model.eval()
        result = evaluate(model, pre, tune_frames, eval_frames, args, logger, name)
        result["train_seconds"] = seconds
        logger.close()
        results = save_model_result(results_path, results, name, result)
        write_table(results, args, command)
        print(f"{name}: {result['bpd']:.3f} bits/dim ({result['estimator']})")
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: finished models are saved in results.json; rerun to continue")
        sys.exit(130)
