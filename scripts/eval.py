"""Evaluate a trained agent from its checkpoint: mean return over N episodes and a video.

    python scripts/eval.py runs/cartpole-swingup/dreamer-aef/s0-...            # 10 episodes
    python scripts/eval.py RUN_DIR --episodes 5 --video eval.gif --seed 7
    python scripts/eval.py RUN_DIR --agent planner --episodes 3     # plan with its world model
    python scripts/eval.py RUN_DIR --agent planner --planner mppi --candidates 300 --iterations 5

Uses the run's saved configuration (task, image size, action repeat, renderer unless
``--render`` says otherwise) and the deterministic policy. Writes ``<run_dir>/eval.json`` (or
``--out``) and a GIF of the first episode: the agent's view next to the world model's
reconstruction of it.
For a Dreamer agent the JSON's ``critic`` entry compares the critic's value of the visited
states with the discounted return the policy then collected (first quarter of each episode):
a critic far below it is behind the policy.

``--agent planner`` acts with the PlaNet-style planner (agents/planner.py) on the checkpoint's
world model, whichever agent trained it: torchrl's CEMPlanner (or MPPIPlanner) over the
imagination env, without exploration noise. Its planning settings are the run's (planner runs)
or configs/agent/planner.yaml's defaults, overridden by the options below; it writes
``eval_planner.json`` / ``eval_planner.gif`` so that the actor's results stay next to it.
"""

from __future__ import annotations

import argparse
import os
import sys

from aefrl.interrupts import imports_done, quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting(__name__)  # until the imports below are done

from aefrl.arguments import Parser, add_episode_options, gif_path
from aefrl.gl_backend import exit_if_user_backend_broken

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
exit_if_user_backend_broken()  # before torchrl imports mujoco, which reads MUJOCO_GL

# agents.planner.PLANNERS, spelled out so that the command line is parsed without importing torchrl
# (tests/test_script_help.py checks that the two agree).
PLANNERS = ("cem", "mppi")
# --planner-option name -> PlanningConfig field
PLANNER_OPTIONS = {
    "planner": "method",
    "horizon": "horizon",
    "candidates": "candidates",
    "top_k": "top_k",
    "iterations": "iterations",
    "temperature": "temperature",
}


def make_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (or its checkpoint file)")
    p.add_argument(
        "--episodes", type=int, default=10, help="episodes to evaluate, >= 1 (default: %(default)s)"
    )
    p.add_argument(
        "--video",
        type=gif_path,  # a GIF, whatever the name says: x.mp4 got GIF data
        default=None,
        help="GIF of the first episode, agent view | reconstruction (default: <run_dir>/eval.gif, "
        "eval_planner.gif for --agent planner on another agent's run; '' for none)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON of the results (default: <run_dir>/eval.json, eval_planner.json for --agent "
        "planner on another agent's run)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if available), cpu, cuda or cuda:N (default: %(default)s)",
    )
    add_episode_options(p, seed=12345, what="evaluation")
    p.add_argument(
        "--agent",
        default=None,
        choices=["dreamer", "planner"],
        help="act with this agent (default: the checkpoint's own); planner: plan with the "
        "checkpoint's world model",
    )
    g = p.add_argument_group(
        "planner options (with --agent planner; default: the run's or PlaNet's)"
    )
    g.add_argument("--planner", default=None, choices=PLANNERS, help="torchrl planner (cem)")
    g.add_argument("--horizon", type=int, default=None, help="planning horizon (12)")
    g.add_argument("--candidates", type=int, default=None, help="sequences per iteration (1000)")
    g.add_argument("--top-k", type=int, default=None, help="elites per iteration (100)")
    g.add_argument("--iterations", type=int, default=None, help="iterations per step (10)")
    g.add_argument("--temperature", type=float, default=None, help="mppi inverse temperature (1)")
    return p


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error(f"--episodes must be >= 1, got {args.episodes}")
    return args


if __name__ == "__main__":
    parse_args()  # --help and a mistyped option answer at once, not after the imports below (~4 s)

import json
import re
import time
from pathlib import Path

import numpy as np
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
from aefrl.cli import UserError, make_run_env, output_path, resolve_device, video_fps
from aefrl.evaluation import critic_calibration, run_episodes
from aefrl.logging import encode_gif, to_hwc_uint8
from aefrl.provenance import machine_info
from aefrl.world_model.modules import stored_action_dim, world_model_from_checkpoint
from agents.modules import agent_from_checkpoint
from agents.planner import PlannerAgent, PlanningConfig

imports_done()  # Ctrl-C raises KeyboardInterrupt again (main handles it)


def evaluate(agent, env, episodes: int, action_dim: int, device, record: bool):
    """:func:`aefrl.evaluation.run_episodes` with a progress bar and, when ``record``, the first
    episode's frames: the agent's view of o_t next to the decoded posterior of o_t."""
    frames = []
    step = 0  # the step within the episode under way, on the bar: a planner at PlaNet's budget
    # takes seconds per step, minutes per episode

    def on_step(observed, collector, episode):
        nonlocal step
        if record and episode == 0:
            recon = agent.world_model.decode_pixels(collector.carry.state).cpu()[:1]
            frames.append(torch.cat([observed["pixels"][:1], recon], -1)[0])
        step = episode_step(step, observed)
        bar.update(episode - bar.n)
        bar.set_postfix(step=step)

    # A context, so that a Ctrl-C closes the bar and main's message gets a line of its own.
    with tqdm(total=episodes, unit="episode") as bar:
        result = run_episodes(env, agent, action_dim, device, episodes, on_step=on_step)
        bar.update(episodes - bar.n)
    return result, frames


def episode_step(step: int, observed) -> int:
    """The step within the episode under way after a :func:`run_episodes` call that filtered the
    rows ``observed``, ``step`` before it. The call after an episode's last step filters its
    terminal row (``done``) and only resets the env: the next episode's step 0, not 1 (the bar
    used to show L + 1 for an episode of L steps)."""
    return 0 if bool(observed[keys.DONE].any()) else step + 1


def build_planner_agent(state: dict, args, action_dim: int) -> PlannerAgent:
    """A planner on the checkpoint's world model; its settings: the run's (if a planner run),
    overridden by the command line."""
    conf = state["run_config"]
    world_model = world_model_from_checkpoint(state)  # its weights first: agent_from_checkpoint
    stored_action_dim(state, action_dim)  # one sentence if the task's actions differ
    run_planner = conf["agent"].get("planner", {}) if conf["agent"]["name"] == "planner" else {}
    options = dict(run_planner)
    for option, field in PLANNER_OPTIONS.items():
        if getattr(args, option) is not None:
            options[field] = getattr(args, option)
    method = options.get("method", PlanningConfig.method)
    if args.temperature is not None and method != "mppi":  # before its range: it is not used
        raise UserError(
            f"--temperature is MPPI's inverse temperature, and the planner here is "
            f"{method}: add --planner mppi, or leave --temperature out"
        )
    try:
        agent = PlannerAgent(
            world_model.obs_shape, action_dim, world_model=world_model, planner=options
        )
    except ValueError as exc:  # "top_k (99) must not exceed ...": name the options instead
        message = planner_flags(str(exc))
        # The run's (or the default) value of an option not on the command line: say so, or
        # "--top-k (100) must not exceed --candidates (5)" reads as if --top-k had been given.
        unset = [option_flag(o) for o in PLANNER_OPTIONS if getattr(args, o) is None]
        unset = [flag for flag in unset if re.search(rf"(?<![\w-]){flag}\b", message)]
        if unset:
            message += f" ({', '.join(unset)}: the run's or the default value; set it too)"
        raise UserError(message) from None
    return agent


def option_flag(option: str) -> str:
    return f"--{option.replace('_', '-')}"


def planner_flags(message: str) -> str:
    """A PlanningConfig message with its field names as this script's options (``top_k`` ->
    ``--top-k``), each once."""
    for option, field in PLANNER_OPTIONS.items():
        message = re.sub(rf"(?<![\w-]){field}\b", option_flag(option), message, count=1)
    return message


def given_planner_options(args) -> list[str]:
    """The planner options on the command line, as typed (``--candidates``)."""
    return [option_flag(o) for o in PLANNER_OPTIONS if getattr(args, o) is not None]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return evaluate_checkpoint(args)
    except (UserError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the evaluation stopped before it finished", file=sys.stderr)
        return 130


def evaluate_checkpoint(args) -> int:
    # The env's seed fixes the episodes; torch's fixes the rest (the planner's candidates, prior
    # samples, the VAE posterior), so the same --seed gives the same returns.
    torch.manual_seed(args.seed)
    device = resolve_device(args.device, "--device ")
    state = load_checkpoint(args.run_dir)
    check_contents(state, args.run_dir, MODEL_KEYS)
    conf = state["run_config"]
    run_dir = Path(args.run_dir)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    trained_by = conf["agent"]["name"]
    acting = args.agent or trained_by
    if acting != trained_by and acting != "planner":
        raise UserError(
            f"--agent {args.agent} needs a {args.agent} checkpoint, this one was trained "
            f"by {trained_by} (--agent planner works with any checkpoint)"
        )
    planner_options = given_planner_options(args)
    if planner_options and acting != "planner":  # they used to be ignored without a word
        one = len(planner_options) == 1
        what, them = ("is a planner option", "it") if one else ("are planner options", "them")
        raise UserError(
            f"{', '.join(planner_options)} {what}, but the checkpoint's {acting} agent acts "
            f"here: add --agent planner to plan with its world model, or leave {them} out"
        )
    suffix = "_planner" if args.agent == "planner" and trained_by != "planner" else ""
    out = output_path(args.out, run_dir / f"eval{suffix}.json", args.run_dir)
    record = args.video != ""
    video = (
        output_path(args.video, run_dir / f"eval{suffix}.gif", args.run_dir, (out,))
        if record
        else None
    )
    render = args.render or conf["env"].get("render", "faithful")
    env = make_run_env(conf["env"], args.seed, num_envs=1, render=render)
    action_dim = int(env.action_spec.shape[-1])
    try:
        if args.agent == "planner" or planner_options:  # a planner run's own agent takes them too
            agent = build_planner_agent(state, args, action_dim)
        else:
            agent = agent_from_checkpoint(state, action_dim)
    except (CheckpointError, UserError, ValueError) as exc:
        env.close()
        raise UserError(str(exc)) from None
    agent.to(device).eval()
    del state

    start = time.time()
    episodes, frames = evaluate(agent, env, args.episodes, action_dim, device, record)
    returns, lengths = episodes.returns, episodes.lengths
    env.close()
    r = np.asarray(returns)
    result = {
        "run_dir": str(run_dir),
        "task": conf["env"]["task"],
        "obs_model": conf["obs_model"]["kind"],
        "agent": args.agent or trained_by,
        "episodes": args.episodes,
        "seed": args.seed,
        "render": render,
        "return_mean": float(r.mean()),
        # The sample standard deviation (n - 1), as the training run's eval/episode_return_std.
        "return_std": float(r.std(ddof=1)) if len(r) > 1 else 0.0,
        "returns": [float(x) for x in r],
        "lengths": lengths,
        "seconds": time.time() - start,
        "machine": machine_info(),
    }
    if episodes.values:
        gamma = agent.actor_loss.gamma
        result["critic"] = critic_calibration(episodes.values, episodes.rewards, gamma)
    if isinstance(agent, PlannerAgent):
        result["trained_by"] = trained_by
        # How it planned; evaluation adds no exploration noise, so the option is left out.
        options = agent.planning_options()
        result["planner"] = {k: v for k, v in options.items() if k != "explore_noise"}
        result["seconds_per_step"] = result["seconds"] / max(sum(lengths), 1)
    # Every byte first, then the files, each atomically and the JSON last: a Ctrl-C while the
    # GIF encodes (seconds) leaves the results of an earlier evaluation as they were.
    gif = encode_gif([to_hwc_uint8(f) for f in frames], fps=video_fps(conf)) if record else None
    if record:
        write_bytes_atomically(video, gif)
    write_text_atomically(out, json.dumps(result, indent=2))
    print(f"{summary_line(result)}  ->  {out}")
    if "critic" in result:
        c = result["critic"]
        print(
            f"critic over the first quarter of each episode: value {c['value_mean']:.1f}, "
            f"discounted return collected {c['return_to_go_mean']:.1f} (gamma {c['gamma']})"
        )
    if record:
        print(f"video (agent view | reconstruction): {video}")
    return 0


def summary_line(result: dict) -> str:
    """``walker-walk aef planner: return 2.0 ± 0.0 over 1 episode``: the agent named, as a
    planner on a Dreamer run's world model acts differently from the run's actor."""
    n = result["episodes"]
    what = f"{result['task']} {result['obs_model']} {result['agent']}"
    spread = f"{result['return_mean']:.1f} ± {result['return_std']:.1f}"
    return f"{what}: return {spread} over {n} episode{'s' if n != 1 else ''}"


if __name__ == "__main__":
    sys.exit(main())
