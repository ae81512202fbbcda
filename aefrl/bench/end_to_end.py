"""End-to-end agent steps/s: the real training loop on a real DMC env, timed after the prefill.

:class:`aefrl.loop.Trainer` runs as ``scripts/train.py`` runs it (collector, replay, train-ratio
scheduling), with evaluation, reports, logging and periodic checkpoints switched off. The clock
starts after the first iteration that trains (the random prefill and the one-off CUDA-graph
capture stay out) and stops ``steps`` agent steps later; steps/s = steps / seconds, so it covers
acting, rendering, replay sampling and ``train_ratio / (B·T)`` updates per agent step.
"""

from __future__ import annotations

import tempfile
import time

import torch

from aefrl.bench.timing import sync
from aefrl.loop import LoopConfig, Trainer
from aefrl.replay import SequenceReplay


def agent_steps_per_second(
    agent,
    *,
    task: str = "walker-walk",
    batch: int = 16,
    seq: int = 50,
    train_ratio: float = 512.0,
    prefill: int = 64,
    steps: int = 8,
    render: str = "faithful",
    action_repeat: int = 2,
    device="cpu",
    seed: int = 0,
    num_envs: int = 1,
    cuda_graph: bool = False,
    replay_storage: str = "memory",
) -> dict:
    """Run the loop for ``prefill + steps`` agent steps; time the last ``steps`` (agent steps
    summed over ``num_envs`` parallel environments). ``cuda_graph``: updates replay one
    captured CUDA graph (the default of ``scripts/train.py`` on CUDA); the result's
    ``cuda_graph`` says whether they did (the loop falls back to eager updates if the capture
    fails), ``cuda_graph_requested`` what was asked. ``replay_storage``:
    ``"memory"`` (host RAM) or ``"device"`` (rows kept and batches gathered on ``device``)."""
    from aefrl.envs import make_dmc_env
    from aefrl.logging import RunLogger

    if prefill < seq * num_envs:
        raise ValueError(
            f"prefill ({prefill}) must be at least seq x num_envs ({seq * num_envs}) to fill one "
            "window per environment"
        )
    device = torch.device(device)
    env = make_dmc_env(
        task, render=render, action_repeat=action_repeat, seed=seed, num_envs=num_envs
    )
    action_dim = int(env.action_spec.shape[-1])
    replay = SequenceReplay(
        max(4 * (prefill + steps), seq * num_envs),
        num_envs,
        seq,
        batch,
        storage=replay_storage,
        device=device,
        seed=seed,
    )
    config = LoopConfig(
        total_frames=10**9,
        action_repeat=action_repeat,
        prefill_steps=prefill,
        train_ratio=train_ratio,
        batch_size=batch,
        seq_len=seq,
        log_every=0,
        eval_every=0,
        report_every=0,
        checkpoint_every=0,
        cuda_graph=cuda_graph,
    )
    marks: dict[str, float] = {}
    at_start = {"updates": 0, "steps": 0}

    def on_iteration(trainer: Trainer) -> None:
        done = trainer.counters["agent_steps"]
        # The first iteration that trains (it builds the CUDA graph, if any) stays untimed.
        if "start" not in marks and trainer.counters["updates"] > 0:
            sync(device)
            marks["start"] = time.perf_counter()
            at_start.update(updates=trainer.counters["updates"], steps=done)
        elif "start" in marks and done >= at_start["steps"] + steps:
            sync(device)
            marks["end"] = time.perf_counter()
            marks["steps"] = done - at_start["steps"]
            trainer.request_stop()

    with tempfile.TemporaryDirectory() as run_dir:
        logger = RunLogger("bench", log_dir=run_dir)
        trainer = Trainer(
            agent,
            env,
            replay,
            logger,
            run_dir,
            config,
            device=device,
            seed=seed,
            action_dim=action_dim,
        )
        t0 = time.perf_counter()
        trainer.run(progress=False, on_iteration=on_iteration)
        total = time.perf_counter() - t0
        updates = trainer.counters["updates"] - at_start["updates"]
        # What ran, not what was asked for: a failed capture falls back to eager updates.
        graphed = trainer.graphed
    env.close()
    seconds = marks["end"] - marks["start"]
    steps = marks["steps"]
    return {
        "task": task,
        "render": render,
        "num_envs": num_envs,
        "cuda_graph": graphed,
        "cuda_graph_requested": cuda_graph,
        "replay_storage": replay_storage,
        "train_ratio": train_ratio,
        "batch": f"{batch}x{seq}",
        "prefill_steps": prefill,
        "timed_agent_steps": steps,
        "updates_in_timed_steps": updates,
        "seconds": round(seconds, 2),
        "agent_steps_per_s": round(steps / seconds, 4),
        "env_frames_per_s": round(steps * action_repeat / seconds, 4),
        "wall_s_including_prefill_and_final_checkpoint": round(total, 2),
    }
