"""aefrl.bench.end_to_end: the real loop on a real DMC task, at toy sizes (no timings asserted)."""

import torch

from aefrl.bench.end_to_end import agent_steps_per_second
from tests.agents.test_dreamer import TINY

from agents.dreamer import DreamerAgent  # isort: skip


def test_two_envs_device_replay_and_graph_fallback_run_the_loop(capsys):
    torch.manual_seed(0)
    cfg = {k: dict(v) for k, v in TINY.items()}
    agent = DreamerAgent((3, 64, 64), 1, **cfg)
    out = agent_steps_per_second(
        agent,
        task="cartpole-swingup",
        batch=2,
        seq=4,
        train_ratio=16,  # two updates per agent step at 2 x 4
        prefill=8,
        steps=4,
        render="fast",
        num_envs=2,
        replay_storage="device",  # the device is the CPU here: the same code path as a GPU's
        cuda_graph=True,  # no CUDA: the loop says so once and trains eagerly
    )
    assert out["num_envs"] == 2 and out["replay_storage"] == "device"
    # Two envs step together, so the timed window covers at least the 4 steps asked for.
    assert out["timed_agent_steps"] >= 4 and out["updates_in_timed_steps"] >= 8
    assert out["agent_steps_per_s"] > 0
    assert "cuda_graph: capturing the update failed" in capsys.readouterr().err
    # The result says what ran (the report must not claim graphed updates after a fallback).
    assert out["cuda_graph_requested"] and not out["cuda_graph"]
