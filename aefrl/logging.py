"""TensorBoard logging on torchrl's ``TensorboardLogger``, with namespaced tags.

Tags follow CleanRL's namespaces (``train/loss_*``, ``env/episode_return``,
``eval/episode_return``, ``perf/fps``, ...); the x-axis is environment frames.

torchrl's ``log_video`` needs moviepy (and torch's ``add_video`` breaks on moviepy 2), so videos
are written here as animated-GIF image summaries encoded with Pillow — what TensorBoard's own
video summaries are under the hood.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image
from torchrl.record.loggers import TensorboardLogger

from aefrl.checkpoint import fsync_path
from aefrl.resume_overrides import leaves


def to_hwc_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[C, H, W]`` or ``[H, W, C]`` image, uint8 or float in [0, 1] -> ``[H, W, C]`` uint8."""
    arr = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"expected an image [C, H, W] or [H, W, C], got shape {arr.shape}")
    if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Tile rows of images (each ``[N, C, H, W]``, uint8 or float) into one ``[H, W, C]`` array."""
    tiles = [[to_hwc_uint8(img) for img in row] for row in rows]
    h, w, c = tiles[0][0].shape
    ncol = max(len(r) for r in tiles)
    out = np.full((len(tiles) * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            out[y0 : y0 + h, x0 : x0 + w] = tile
    return out


#: The strip above an open-loop video's frames: the context (posterior reconstructions of
#: frames the model saw) and the open-loop prediction (frames it did not), RGB.
CONTEXT_COLOUR, PREDICTION_COLOUR = (40, 170, 60), (200, 40, 40)
STRIP = 2  # pixels


def open_loop_video(real: torch.Tensor, pred: torch.Tensor, context: int = 0) -> torch.Tensor:
    """Real | imagined | absolute error, side by side: ``real``, ``pred`` uint8
    ``[..., T, C, H, W]`` -> uint8 ``[..., T, C, H, 3W]``; several sequences (``[N, T, ...]``)
    are stacked top to bottom, ``[T, C, N·H, 3W]``. With ``context`` > 0, a strip of
    :data:`STRIP` pixels above each sequence's frames says which frames are the context's
    reconstructions (:data:`CONTEXT_COLOUR`, the first ``context``) and which the open-loop
    prediction (:data:`PREDICTION_COLOUR`): each frame is then ``H + STRIP`` high."""
    error = (real.float() - pred.float()).abs().clamp(0, 255).to(torch.uint8)
    video = torch.cat([real, pred, error], -1)
    if context > 0 and video.shape[-3] == 3:
        steps = video.shape[-4]
        colours = torch.tensor([CONTEXT_COLOUR, PREDICTION_COLOUR], dtype=torch.uint8)
        which = (torch.arange(steps) >= context).long()  # [T]: 0 context, 1 prediction
        strip = colours[which][:, :, None, None]  # [T, 3, 1, 1]
        strip = strip.expand(*video.shape[:-2], STRIP, video.shape[-1])
        video = torch.cat([strip, video], -2)
    return torch.cat(list(video), -2) if video.dim() == 5 else video


def encode_gif(frames: list[np.ndarray], fps: float) -> bytes:
    """Frames ``[H, W, C]`` uint8 -> animated GIF bytes (looping). GIFs time frames in
    centiseconds: ``fps`` is rounded to the nearest such duration (15 -> 70 ms, 14.3 frames/s),
    at least 20 ms (browsers slow shorter ones down)."""
    images = [Image.fromarray(f.squeeze(-1) if f.shape[-1] == 1 else f) for f in frames]
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=max(round(100 / fps), 2) * 10,
        loop=0,
    )
    return buf.getvalue()


#: The metrics TensorBoard's HPARAMS tab shows beside each run's hyperparameters.
HPARAM_METRICS = ("eval/episode_return", "env/episode_return", "heldout/bits_per_dim")


def _hparam_value(value) -> int | float | str:
    """A config leaf as TensorBoard's hparams take it: numbers and strings as they are,
    anything else as its YAML-like text (``true``, ``null``, ``[1, 2]``; torch would turn a
    boolean into the number 1)."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return value
    return json.dumps(value, default=str)


class RunLogger(TensorboardLogger):
    """One run's TensorBoard writer: ``<log_dir>/<exp_name>/events.*``.

    Adds dict-of-scalars logging, images, GIF videos and the resolved config as text.

    ``purge_step`` (a resumed run: its checkpoint's frames + 1) tells TensorBoard to drop the
    events this directory already holds at that step and later: those of a run killed after its
    last checkpoint, which the resumed run logs again.
    """

    def __init__(self, exp_name: str, log_dir: str = "tb_logs", purge_step: int | None = None):
        self.purge_step = purge_step  # read by _create_experiment, which super().__init__ calls
        super().__init__(exp_name, log_dir=log_dir)

    def _create_experiment(self):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = os.path.join(self.log_dir, self.exp_name)
        return SummaryWriter(log_dir=log_dir, purge_step=self.purge_step)

    def log_scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        """Log ``{name: value}`` as ``prefix/name``; tensors are converted with ``float()``."""
        for name, value in values.items():
            tag = f"{prefix}/{name}" if prefix else name
            self.experiment.add_scalar(tag, float(value), global_step=step)

    def log_image(self, name: str, image: torch.Tensor | np.ndarray, step: int) -> None:
        """Log one image (``[C, H, W]`` / ``[H, W, C]``, uint8 or float in [0, 1])."""
        self.experiment.add_image(name, to_hwc_uint8(image), global_step=step, dataformats="HWC")

    def log_video(self, name: str, video: torch.Tensor, step: int | None = None, **kwargs) -> None:
        """Log a video ``[T, C, H, W]`` (uint8 or float in [0, 1]) as an animated GIF."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        fps = float(kwargs.pop("fps", 15))
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if video.dim() == 5:  # torchrl's ((N), T, C, H, W): tile the N videos side by side
            video = torch.cat(list(video), dim=-1)
        if video.dim() != 4 or video.shape[1] not in (1, 3):
            raise ValueError(f"video must be [T, C, H, W] with C in (1, 3), got {video.shape}")
        frames = [to_hwc_uint8(f) for f in video]
        h, w, c = frames[0].shape
        summary = Summary(
            value=[
                Summary.Value(
                    tag=name,
                    image=Summary.Image(
                        height=h,
                        width=w,
                        colorspace=c,
                        encoded_image_string=encode_gif(frames, fps),
                    ),
                )
            ]
        )
        self.experiment._get_file_writer().add_summary(summary, step)

    def log_text(self, name: str, text: str, step: int = 0) -> None:
        self.experiment.add_text(name, text, global_step=step)

    def log_config(self, config: Mapping, step: int = 0) -> None:
        """The resolved config as pretty-printed JSON text (``config``): at the start, and again
        at ``step`` when a resume changes a key."""
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self.log_text("config", "```\n" + text + "\n```", step)

    def log_hparams(self, config: Mapping, metrics: tuple[str, ...] = HPARAM_METRICS) -> None:
        """The configuration's leaves (``obs_model.kind``, ``env.task``, ``seed``, ...) as this
        run's hyperparameters, for TensorBoard's HPARAMS tab, which tables and filters runs by
        them beside the ``metrics`` tags the run logs. Written once, when a run starts."""
        from torch.utils.tensorboard.summary import hparams

        values = {key: _hparam_value(v) for key, v in leaves(config).items()}
        writer = self.experiment._get_file_writer()
        for summary in hparams(values, dict.fromkeys(metrics, 0.0)):
            writer.add_summary(summary)

    def flush(self) -> None:
        """Write the pending events to the run's event files, and those to disk (fsync): the
        loop flushes before each checkpoint, which a resume trusts to have every earlier step's
        logs behind it (it purges the later ones), and the checkpoint itself is fsynced."""
        self.experiment.flush()
        log_dir = self.experiment.get_logdir()
        for name in sorted(os.listdir(log_dir)):
            if name.startswith("events.out.tfevents."):  # earlier runs' files: nothing dirty
                fsync_path(os.path.join(log_dir, name))
        fsync_path(log_dir)  # a new file's directory entry (each resume starts one)

    def close(self) -> None:
        self.experiment.close()
