"""agents/run_settings.py: a run's configuration checked before anything is built (the CLI's
tests drive the same checks through scripts/train.py's command line)."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from aefrl.checkpoint import CheckpointError, load_checkpoint
from aefrl.cli import UserError
from aefrl.loop import LoopConfig
from agents.run_settings import check_settings, check_trains, check_weights

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"prefill_steps": 1000}, "loop.prefill_steps=1000 random steps fill the whole run"),
        ({"total_frames": 100}, "loop.prefill_steps=60 random steps fill the whole run"),
        ({"seq_len": 500}, "replay.seq_len=500 needs that many agent steps in each of the 1"),
        ({"train_ratio": 0.001}, "0.00 over the loop.total_frames=400 (200 agent steps"),
        # 140 steps after the prefill at 64 replayed steps per update: 0.9 updates
        ({"train_ratio": 64 / 140 * 0.9}, "0.90 over the loop.total_frames=400"),
    ],
)
def test_a_new_run_that_would_never_update_is_refused(settings, message):
    """Each of these ran to the end with 0 updates and exit 0, logging an untrained agent."""
    smoke = OmegaConf.load(ROOT / "configs/exp/smoke.yaml")
    loop = {k: v for k, v in smoke.loop.items()}
    loop.update(batch_size=smoke.replay.batch_size, seq_len=smoke.replay.seq_len)
    check_trains(LoopConfig(**loop), num_envs=1)  # smoke trains: 70 updates
    check_trains(LoopConfig(**{**loop, "train_ratio": 64 / 140}), num_envs=1)
    with pytest.raises(UserError, match="the run would end before its first update") as e:
        check_trains(LoopConfig(**{**loop, **settings}), num_envs=1)
    assert message in str(e.value)
    # More envs need more steps before every stream holds a window: 16 x 16 = 256 > 200 here.
    with pytest.raises(UserError, match="each of the 16 env stream"):
        check_trains(LoopConfig(**loop), num_envs=16)
    # A resume of a run stopped in its prefill is a run from 0 updates: lowering its
    # total_frames below the prefill trained nothing and exited 0. One that has updated may
    # stop where its new total_frames says.
    short = LoopConfig(**{**loop, "total_frames": 100})
    with pytest.raises(UserError, match="fill the whole run"):
        check_trains(short, num_envs=1, updates_done=0)
    check_trains(short, num_envs=1, updates_done=3)


def test_a_checkpoint_without_its_own_configurations_networks_is_refused(tmp_path):
    """A checkpoint whose weights are not the networks its run configuration builds (edited, or
    copied in from another run) failed in load_state_dict with a traceback, after the resume
    had appended its records and event files."""
    import torch

    from agents.factory import build_agent
    from tests.tiny_run import OBS, write_tiny_dreamer_run

    conf = write_tiny_dreamer_run(tmp_path)
    state = load_checkpoint(tmp_path)
    with torch.device("meta"):
        agent = build_agent(conf["agent"], conf["obs_model"], OBS, 1)
    check_weights(agent, state["agent"], tmp_path / "checkpoint.pt")  # its own: passes
    conf["obs_model"]["latent_dim"] = 4  # the configuration says otherwise
    with torch.device("meta"):
        other = build_agent(conf["agent"], conf["obs_model"], OBS, 1)
    with pytest.raises(CheckpointError, match=r"does not hold the networks of its own run"):
        check_weights(other, state["agent"], tmp_path / "checkpoint.pt")
    state["agent"]["modules"]["actor.extra.weight"] = torch.zeros(1)  # load_state_dict's error
    with pytest.raises(CheckpointError, match=r"actor\.extra\.weight is there, and not"):
        check_weights(agent, state["agent"], tmp_path / "checkpoint.pt")
    del state["agent"]["modules"]["actor.extra.weight"]
    del state["agent"]["modules"]["actor.net.0.weight"]
    with pytest.raises(CheckpointError, match=r"actor\.net\.0\.weight is missing there"):
        check_weights(agent, state["agent"], tmp_path / "checkpoint.pt")
    for broken in (None, {"modules": 5}):  # not a module dict at all: one sentence too
        with pytest.raises(CheckpointError, match="is missing there"):
            check_weights(agent, broken, tmp_path / "checkpoint.pt")


def test_auto_storage_counts_the_stored_contexts(tmp_path):
    """With agent.replay_context each row also stores float32 h and z (1152 bytes beside
    12288 of pixels at the defaults): a capacity whose pixels alone stay under auto's 2 GiB
    goes to disk with them."""
    from hydra import compose, initialize_config_dir

    capacity = 2**31 // (3 * 64 * 64) - 1000  # pixels: 2.135e9 bytes; with contexts 2.335e9
    line = [f"replay.capacity={capacity}", f"run_dir={tmp_path}"]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        plain = compose("config", overrides=line)
        with_context = compose("config", overrides=[*line, "agent.replay_context=true"])
    storages = [
        check_settings(OmegaConf.to_container(cfg, resolve=True)).storage
        for cfg in (plain, with_context)
    ]
    assert storages == ["memory", "disk"]
