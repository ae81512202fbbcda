"""TensorBoard logging: scalars, images, GIF videos and config text land in the event file."""

import io
import os

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aefrl import logging as logging_module
from aefrl.logging import RunLogger, encode_gif, image_grid


def _events(path):
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_everything_logged_is_read_back(tmp_path):
    logger = RunLogger("run", log_dir=str(tmp_path))
    logger.log_scalars({"loss_model": torch.tensor(1.5), "kl": 0.25}, step=10, prefix="train")
    logger.log_image("images/grid", torch.rand(3, 8, 12), step=10)
    video = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    logger.log_video("video/imagined", video, step=10, fps=10)
    logger.log_config({"env": {"task": "walker-walk"}, "seed": 1})
    logger.close()
    acc = _events(tmp_path / "run")
    assert acc.Scalars("train/loss_model")[0].value == 1.5
    assert acc.Scalars("train/kl")[0].step == 10
    img = acc.Images("images/grid")[0]
    assert (img.width, img.height) == (12, 8)
    gif = Image.open(io.BytesIO(acc.Images("video/imagined")[0].encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 5
    gif.seek(3)
    assert np.array_equal(np.asarray(gif.convert("RGB")), video[3].permute(1, 2, 0).numpy())
    assert "walker-walk" in str(acc.Tensors("config/text_summary")[0])


def test_purge_step_drops_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    """A run logs steps 0-9 and dies; resumed from a checkpoint at step 5 (purge_step 6), it logs
    6-9 again: each step is read back once, with the resumed run's value."""
    first = RunLogger("run", log_dir=str(tmp_path))
    for step in range(10):
        first.log_scalars({"x": step}, step=step)
    first.close()
    # The killed run started earlier, so its file sorts first. In one process within one second
    # the names differ only in a per-process counter, which sorts as text (…9 after …10).
    (path,) = (tmp_path / "run").rglob("events.out.tfevents.*")
    parts = path.name.split(".")
    parts[3] = f"{int(parts[3]) - 1:010d}"
    path.rename(path.with_name(".".join(parts)))
    resumed = RunLogger("run", log_dir=str(tmp_path), purge_step=6)
    for step in range(6, 10):
        resumed.log_scalars({"x": 100 + step}, step=step)
    resumed.close()
    points = [(e.step, e.value) for e in _events(tmp_path / "run").Scalars("x")]
    assert points == [(s, s) for s in range(6)] + [(s, 100 + s) for s in range(6, 10)]


def test_grid_layout_and_gif_frames():
    rows = [torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.ones(2, 3, 4, 4)]
    grid = image_grid(rows, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert grid[1, 1, 0] == 0 and grid[6, 1, 0] == 255
    frames = [np.full((4, 4, 3), i * 40, np.uint8) for i in range(4)]
    assert Image.open(io.BytesIO(encode_gif(frames, fps=5))).n_frames == 4


def test_hparams_table_the_run_by_its_configuration(tmp_path):
    """TensorBoard's HPARAMS tab reads the session-start summary: every config leaf (booleans,
    null and lists as their text), and the metrics to show beside them."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    logger = RunLogger("run", log_dir=str(tmp_path))
    config = {"obs_model": {"kind": "aef"}, "seed": 3, "loop": {"lr": 3e-4, "video": True},
              "resume": None, "sizes": [1, 2]}  # fmt: skip
    logger.log_hparams(config)
    logger.close()
    content = _events(tmp_path / "run").PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData
    start = data.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["obs_model.kind"].string_value == "aef"
    assert start["seed"].number_value == 3 and start["loop.lr"].number_value == 3e-4
    assert start["loop.video"].string_value == "true"
    assert start["resume"].string_value == "null" and start["sizes"].string_value == "[1, 2]"
    experiment = data.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {
        "eval/episode_return", "env/episode_return", "heldout/bits_per_dim"
    }  # fmt: skip


def test_gif_frame_durations_round_to_the_nearest_centisecond():
    """GIFs count centiseconds: 15 frames/s was truncated to 60 ms (16.7 frames/s)."""
    frames = [np.full((4, 4, 3), i * 40, np.uint8) for i in range(3)]
    for fps, ms in ((15, 70), (10, 100), (30, 30), (200, 20)):
        assert Image.open(io.BytesIO(encode_gif(frames, fps=fps))).info["duration"] == ms


def test_flush_puts_the_events_on_disk_before_it_returns(tmp_path, monkeypatch):
    """The loop flushes before each checkpoint, which is fsynced: the logs it vouches for must
    be too (a power loss could otherwise keep the checkpoint and lose their events)."""
    synced = []

    def record(path):  # what the file holds when its fsync comes
        synced.append((os.path.basename(path), os.path.getsize(path)))

    monkeypatch.setattr(logging_module, "fsync_path", record)
    logger = RunLogger("run", log_dir=str(tmp_path))
    logger.log_scalars({"loss": 1.0}, step=3, prefix="train")
    logger.flush()
    (name,) = os.listdir(tmp_path / "run")
    size = os.path.getsize(tmp_path / "run" / name)
    assert synced == [(name, size), ("run", os.path.getsize(tmp_path / "run"))]
    logger.close()
    assert _events(tmp_path / "run").Scalars("train/loss")[0].step == 3
