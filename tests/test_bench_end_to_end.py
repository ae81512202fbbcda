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


def test_torchrls_loop_trains_at_the_ratio_on_its_replays_float_windows(monkeypatch):
    """torchrl's Dreamer end to end (aefrl/bench/torchrl_end_to_end.py) at toy sizes: after the
    prefill every collected batch of 2 agent steps earns train_ratio / (B·T) · 2 = 4 updates,
    each on a [B, T] sample of its replay buffer with float pixels in [0, 1] (converted from
    the stored uint8 at sample time) and the actions its policy took, inside [-1, 1]."""
    from aefrl.bench.subjects import Sizes
    from aefrl.bench.torchrl_end_to_end import torchrl_agent_steps_per_second
    from aefrl.bench.torchrl_peer import TorchrlDreamer

    seen = []
    update = TorchrlDreamer.full_update_sampled

    def recording(self, td):
        pixels = td["next", "pixels"]
        seen.append((tuple(td.shape), pixels.dtype, float(pixels.min()), float(pixels.max()),
                     float(td["action"].abs().max())))  # fmt: skip
        return update(self, td)

    monkeypatch.setattr(TorchrlDreamer, "full_update_sampled", recording)
    torch.manual_seed(0)
    toy = Sizes(latent=3, deter=8, hidden=16, depth=4, batch=2, seq=4, horizon=3)
    out = torchrl_agent_steps_per_second(
        toy, task="cartpole-swingup", train_ratio=16, prefill=8, steps=4, frames_per_batch=2
    )
    assert out["timed_agent_steps"] == 4 and out["updates_in_timed_steps"] == 8
    assert out["agent_steps_per_s"] > 0 and out["impl"] == "torchrl"
    assert len(seen) == 4 + 8  # the untimed first training batch, then the timed ones
    for shape, dtype, low, high, action in seen:
        assert shape == (2, 4) and dtype == torch.float32
        assert 0.0 <= low < high <= 1.0 and action <= 1.0


def test_torchrls_replay_samples_whole_windows_within_one_trajectory(tmp_path):
    """After an episode's end the newest trajectory is shorter than a window; with torchrl's
    script's strict_length=False its short slices made samples of fewer than B·T rows, which
    the loop's reshape refused (a run past an episode's end crashed)."""
    from tensordict import TensorDict

    from aefrl.bench.torchrl_end_to_end import torchrl_replay

    n = 23  # a 20-step trajectory, then the first 3 steps of the next
    frames = torch.zeros(n, 4, 4, 3, dtype=torch.uint8)
    data = TensorDict(
        {
            "pixels_int": frames, ("next", "pixels_int"): frames.clone(),
            "step": torch.arange(n), ("collector", "traj_ids"): torch.tensor([0] * 20 + [1] * 3),
            ("next", "done"): torch.zeros(n, 1, dtype=torch.bool),
        },
        [n],
    )  # fmt: skip
    replay = torchrl_replay(100, seq=4, batch=2, scratch_dir=str(tmp_path))
    replay.extend(data)
    try:
        for _ in range(50):
            sample = replay.sample().reshape(2, 4)
            assert (sample["step"].diff(dim=1) == 1).all()  # consecutive steps
            assert (sample["step"] < 20).all()  # not the 3-step trajectory's
            assert sample["next", "pixels"].dtype == torch.float32
    finally:
        replay.shutdown()
