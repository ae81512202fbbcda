"""End-to-end agent steps/s: the real training loop on a real DMC env, timed after the prefill.

:class:`aefrl.loop.Trainer` runs as ``scripts/train.py`` runs it (collector, replay, train-ratio
scheduling), with evaluation, reports, logging and periodic checkpoints switched off. The clock
starts when the random prefill ends and stops ``steps`` agent steps later; steps/s = steps /
seconds, so it covers acting, rendering, replay sampling and ``train_ratio / (B·T)`` updates per
agent step.
"""

from __future__ import annotations

import tempfile
import time

import torch

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
) -> dict:
    """Run the loop for ``prefill + steps`` agent steps; time the last ``steps``."""
    from aefrl.envs import make_dmc_env
    from aefrl.logging import RunLogger

    if prefill < seq:
        raise ValueError(f"prefill ({prefill}) must be at least seq ({seq}) to fill one window")
    device = torch.device(device)
    env = make_dmc_env(task, render=render, action_repeat=action_repeat, seed=seed)
    action_dim = int(env.action_spec.shape[-1])
    replay = SequenceReplay(
        max(4 * (prefill + steps), seq), 1, seq, batch, device=device, seed=seed
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
    )
    marks: dict[str, float] = {}
    updates_at_start = [0]

    def on_iteration(trainer: Trainer) -> None:
        done = trainer.counters["agent_steps"]
        if done == prefill:
            marks["start"] = time.perf_counter()
            updates_at_start[0] = trainer.counters["updates"]
        elif done >= prefill + steps:
            marks["end"] = time.perf_counter()
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
        updates = trainer.counters["updates"] - updates_at_start[0]
    env.close()
    seconds = marks["end"] - marks["start"]
    return {
        "task": task,
        "render": render,
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
