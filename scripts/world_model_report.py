"""World-model quality of a trained checkpoint on fresh held-out episodes (docs/learning.md).

    python scripts/world_model_report.py RUN_DIR [--episodes 2] [--num-samples 128]

Collects episodes with the agent's deterministic policy on a new environment seed (never seen in
training), or with uniform random actions (``--policy random``: the same frames for every run
of the task, so VAE and AEF runs are scored on identical data), cuts them into 50-step
sequences and reports: held-out bits/dim of each sequence
(exact for aef_partition, importance-sampled with K trajectories otherwise; SPEC §6), open-loop
prediction error (5 context frames, 45 predicted: MSE and SSIM per horizon), the sharpness
of imagined frames relative to real ones, and the reward head's error on the states imagined
under the recorded actions per horizon and on the filtered (posterior) ones, beside the best
constant's (the actor and critic learn from the rewards of imagined states, 15 steps deep by
default). Writes ``<run_dir>/world_model_report.json`` (with ``--policy random``:
``world_model_report_random.json``) and a GIF of the first sequences, real | imagined | error
(next to the JSON, ``.gif`` for ``.json``).

For the expansion AEF, the importance proposal's scale s is first tuned (SPEC §6) on one more
held-out episode, collected after the reported ones and not reported (``--proposal-scale S``
fixes it instead).
"""

from __future__ import annotations

import os

from aefrl.interrupts import imports_done, quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting(__name__)  # until the imports below are done

from aefrl.arguments import Parser, add_episode_options, gif_path, positive_float
from aefrl.gl_backend import exit_if_user_backend_broken

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
exit_if_user_backend_broken()  # before torchrl imports mujoco, which reads MUJOCO_GL

import argparse
import sys


def parse_proposal_scale(text: str) -> str | float:
    """``"tune"`` or a positive float (argparse turns a ValueError into one error line)."""
    if text == "tune":
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'tune' or a positive number, got {text!r}"
        ) from None


def make_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (or its checkpoint file)")
    p.add_argument(
        "--episodes",
        type=int,
        default=2,
        help="held-out episodes to report on, >= 1 (default: %(default)s)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=128,
        help="K, importance samples per sequence (default: %(default)s, SPEC §6's for reports)",
    )
    add_episode_options(p, seed=54321, what="held-out")
    p.add_argument(
        "--policy",
        choices=["agent", "random"],
        default="agent",
        help="who acts in the held-out episodes: the agent's deterministic policy (its own "
        "states), or uniform random actions drawn from --seed (the same frames for every run "
        "of the task: a comparison of world models on identical data) (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON path (default: <run_dir>/world_model_report.json, or "
        "world_model_report_random.json with --policy random)",
    )
    p.add_argument(
        "--video",
        type=gif_path,
        default=None,
        help="GIF of the first sequences, real | imagined | error, one row each (default: next "
        "to the JSON, its name ending in .gif; '' for none)",
    )
    p.add_argument(
        "--video-sequences",
        type=int,
        default=4,
        help="sequences (rows) in the GIF, >= 1 (default: %(default)s)",
    )
    p.add_argument(
        "--proposal-scale",
        type=parse_proposal_scale,
        default=None,
        help="aef only: s of the proposal N(Wy+b, s²I); 'tune' (default) picks it on one more "
        "held-out episode, not reported",
    )
    p.add_argument(
        "--tune-samples", type=int, default=32, help="K while tuning s (default: %(default)s)"
    )
    return p


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    for name in ("episodes", "num_samples", "tune_samples", "video_sequences"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


if __name__ == "__main__":
    parse_args()  # --help and a mistyped option answer at once, not after the imports below (~4 s)

import json
from pathlib import Path

import torch
from tqdm import tqdm

from aefrl import keys
from aefrl.checkpoint import (
    MODEL_KEYS,
    CheckpointError,
    check_contents,
    load_checkpoint,
    write_bytes_atomically,
    write_text_atomically,
)
from aefrl.cli import UserError, make_run_env, output_path, video_fps
from aefrl.collect import Collector
from aefrl.logging import encode_gif, open_loop_video, to_hwc_uint8
from aefrl.metrics import sharpness_ratio
from aefrl.provenance import machine_info
from aefrl.seeding import forked_torch_rng
from aefrl.world_model.evaluation import (
    filtered_reward_error,
    open_loop_prediction,
    sequence_bits_per_dim,
    tune_sequence_proposal_scale,
)
from agents.modules import agent_from_checkpoint

imports_done()  # Ctrl-C raises KeyboardInterrupt again (main handles it)

SEQ, CONTEXT = 50, 5


def collect_episodes(agent, env, episodes: int, action_dim: int, random_seed: int | None = None):
    """Rows ``[episodes, steps]`` of full episodes with the deterministic policy, or with
    uniform random actions from a generator seeded ``random_seed`` (the agent only filters)."""
    mode = "eval" if random_seed is None else "random"
    draws = None if random_seed is None else torch.Generator().manual_seed(random_seed)
    collector = Collector(env, agent, action_dim, generator=draws)
    rows, _, _ = collector.step(mode)
    done, episode, out = 0, [rows], []
    with tqdm(total=episodes, unit="episode") as bar:
        while done < episodes:
            rows, stats, _ = collector.step(mode)
            if stats.returns:
                episode.append(rows)
                out.append(torch.cat(episode, 0).exclude(keys.DONE))
                done += len(stats.returns)
                bar.update(len(stats.returns))
                rows, _, _ = collector.step(mode)  # the next episode's first row
                episode = [rows]
            else:
                episode.append(rows)
    return torch.stack(out[:episodes], 0)


def cut(episodes):
    """``[n, steps]`` episodes -> ``[n * chunks, SEQ]`` sequences (the remainder dropped)."""
    n, steps = episodes.shape
    seq = min(SEQ, steps)  # short episodes (e.g. exp=smoke) make one sequence each
    chunks = steps // seq
    return episodes[:, : chunks * seq].reshape(n * chunks, seq)


def reward_scale(rewards: torch.Tensor) -> dict[str, float]:
    """The scale the reward errors are read on, from the recorded rewards ``[B, steps, 1]`` of
    the rows the open loop predicts: their mean, and the absolute error of the best constant
    prediction, their median (a head worse than it predicts nothing; for sparse rewards the
    median is 0 and the error the mean, well below the deviation about the mean)."""
    r = rewards.double().flatten()
    return {
        "reward_mean": float(r.mean()),
        "constant_reward_abs_error": float((r - r.median()).abs().mean()),
    }


def report_from_seed(agent, episodes, num_samples: int, seed: int) -> tuple[dict, dict]:
    """:func:`report` with torch's generator seeded first: every model's report dequantises
    the same episodes with the same noise (acting, which a VAE samples in, drew before)."""
    torch.manual_seed(seed)
    return report(agent, episodes, num_samples)


@torch.no_grad()
def report(agent, episodes, num_samples: int) -> tuple[dict, dict]:
    """The report's numbers, and the open-loop prediction they came from (``real``, ``pred``
    uint8 ``[sequences, T, C, H, W]``: :func:`aefrl.world_model.open_loop_prediction`)."""
    wm = agent.world_model
    batch = cut(episodes)
    pred = open_loop_prediction(wm, batch, context=CONTEXT)
    bpd = torch.cat([sequence_bits_per_dim(wm, b, num_samples) for b in batch.split(2)])
    recon = pred["pred"][:, :CONTEXT].flatten(0, 1).float() / 255
    real_context = pred["real"][:, :CONTEXT].flatten(0, 1).float() / 255
    om = wm.obs_model
    if om.exact_likelihood:
        estimator = "exact"
    elif om.kind == "aef":
        estimator = (
            f"importance sampling over u, N(Wy+b, s²I) proposal with s={om.proposal_scale:g}, "
            f"K={num_samples} trajectories"
        )
    else:
        estimator = f"importance sampling, posterior proposal, K={num_samples} trajectories"
    # Last: its draws (dequantisation, a VAE's posterior) leave the numbers above as they were.
    filtered = filtered_reward_error(wm, batch)
    return {
        "sequences": len(batch),
        "bits_per_dim": float(bpd.mean()),
        # None (JSON null) for one sequence: a standard error needs two (NaN is not JSON).
        # Over sequences, it understates the error: those of one episode are correlated. The
        # episodes' own means show the spread between independent pieces of data.
        "bits_per_dim_sem": float(bpd.std() / len(bpd) ** 0.5) if len(bpd) > 1 else None,
        "bits_per_dim_by_episode": [float(x) for x in bpd.view(len(episodes), -1).mean(1)],
        "estimator": estimator,
        "open_loop_mse": [float(x) for x in pred["mse"]],
        "open_loop_ssim": [float(x) for x in pred["ssim"]],
        "sharpness_imagined": pred["sharpness"],
        "sharpness_reconstructed": sharpness_ratio(recon, real_context),
        "open_loop_reward_abs_error": [float(x) for x in pred["reward_abs_error"]],
        "open_loop_reward_bias": [float(x) for x in pred["reward_bias"]],
        "filtered_reward_abs_error": filtered["abs_error"],
        "filtered_reward_bias": filtered["bias"],
        **reward_scale(batch[keys.REWARD][:, CONTEXT:]),
    }, pred


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return write_report(args, argv)
    except (UserError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: the report stopped before it finished; nothing was written",
            file=sys.stderr,
        )
        return 130


def write_report(args, argv) -> int:
    state = load_checkpoint(args.run_dir)
    check_contents(state, args.run_dir, MODEL_KEYS)
    run_dir = Path(args.run_dir)
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    conf = state["run_config"]
    kind = conf["obs_model"]["kind"]
    if args.proposal_scale is not None and kind != "aef":  # it used to be ignored without a word
        raise UserError(
            f"--proposal-scale applies to aef models only (their importance proposal), but this "
            f"run's obs_model is {kind}: leave it out"
        )
    stem = "world_model_report" + ("_random" if args.policy == "random" else "")
    out = output_path(args.out, folder / f"{stem}.json", run_dir)
    if args.video == "":
        video = None
    else:  # --out x.gif put the GIF at the JSON's path: refused, not overwritten by the JSON
        video = output_path(args.video, out.with_suffix(".gif"), run_dir, (out,))
    render = args.render or conf["env"].get("render", "faithful")
    env = make_run_env(conf["env"], args.seed, num_envs=1, render=render)
    action_dim = int(env.action_spec.shape[-1])
    try:
        agent = agent_from_checkpoint(state, action_dim)
    except CheckpointError:
        env.close()
        raise
    torch.manual_seed(args.seed)
    tune = agent.world_model.obs_model.kind == "aef" and args.proposal_scale in (None, "tune")
    random_seed = args.seed if args.policy == "random" else None
    episodes = collect_episodes(agent, env, args.episodes + int(tune), action_dim, random_seed)
    env.close()
    if episodes.shape[1] <= CONTEXT:  # open-loop prediction needs a frame after the context
        raise UserError(
            f"the run's episodes hold {episodes.shape[1]} frames (env.time_limit="
            f"{conf['env'].get('time_limit')}): a report needs more than {CONTEXT}, its "
            "context frames, to predict any"
        )
    proposal = {}
    if agent.world_model.obs_model.kind == "aef":
        if tune:
            # The last episode: the reported ones are then the first episodes of --seed for
            # every model, vae and aef_partition (which tune nothing) included.
            held_out, episodes = episodes[-1:], episodes[:-1]
            batches = list(cut(held_out).split(2))
            with forked_torch_rng(args.seed + 2):  # the report's draws stay as without it
                search = tune_sequence_proposal_scale(agent.world_model, batches, args.tune_samples)
            proposal["proposal_scale_search"] = {f"{s:g}": v for s, v in search.items()}
        else:
            agent.world_model.obs_model.proposal_scale = args.proposal_scale
        proposal["proposal_scale"] = agent.world_model.obs_model.proposal_scale
        proposal["proposal_scale_tuned_on"] = "1 held-out episode, not reported" if tune else None
    numbers, pred = report_from_seed(agent, episodes, args.num_samples, args.seed + 1)
    gif = None
    if video is not None:
        n = args.video_sequences
        frames = open_loop_video(pred["real"][:n], pred["pred"][:n], CONTEXT)  # [T, C, n·H', 3W]
        gif = encode_gif([to_hwc_uint8(f) for f in frames], fps=video_fps(conf))
    result = {
        "run_dir": str(args.run_dir),
        "frames": state["counters"]["frames"],
        "task": conf["env"]["task"],
        "obs_model": conf["obs_model"]["kind"],
        "render": render,
        "policy": args.policy,
        **numbers,
        **proposal,
        "video": None if video is None else str(video),
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine_info(),
    }
    # Every byte first, then the files, each atomically and the JSON last: a Ctrl-C before this
    # point leaves nothing written, as the interrupt message says.
    if gif is not None:
        write_bytes_atomically(video, gif)
    write_text_atomically(out, json.dumps(result, indent=2))
    mse, r = result["open_loop_mse"], result
    reward = r["open_loop_reward_abs_error"]
    h = min(15, len(reward))  # the default imagination horizon
    print(
        f"{r['task']} {r['obs_model']} @ {r['frames']} frames: {r['bits_per_dim']:.3f} bits/dim "
        f"({r['estimator']}), open-loop MSE h1 {mse[0]:.4f} h{len(mse)} {mse[-1]:.4f}, "
        f"sharpness {r['sharpness_imagined']:.2f}, reward |error| filtered "
        f"{r['filtered_reward_abs_error']:.4g} open-loop h{h} {reward[h - 1]:.4g} (the best "
        f"constant's {r['constant_reward_abs_error']:.4g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
