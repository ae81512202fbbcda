"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename.

A crash or Ctrl-C during a save leaves the previous checkpoint intact: ``os.replace`` is atomic
on POSIX file systems. Numpy arrays (RNG and environment states) are stored as tensors so that
loading can use ``torch.load(weights_only=True)``, which runs no pickled code.
"""

from __future__ import annotations

import os
import random
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1  # the layout aefrl.loop.Trainer.save writes; bump when it changes
# What a training checkpoint must hold to resume (Trainer.save); readers of the model alone
# (evaluation, reports) need only the first two.
MODEL_KEYS = ("run_config", "agent")
TRAINING_KEYS = (*MODEL_KEYS, "loop_config", "counters", "train_credit", "replay", "collector",
                 "heldout", "rng")  # fmt: skip


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the run."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode(v) for v in obj)
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(_encode(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # a full disk, a quota, a vanished mount: one
        # sentence, no debris. torch's zip writer reports a failed write as a RuntimeError
        # ("[enforce fail at inline_container.cc] unexpected pos"), not an OSError.
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
        elif any(m in str(exc) for m in ("inline_container", "PytorchStreamWriter")):
            reason = "torch could not write it (is the disk full?)"
        else:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"could not write the checkpoint {path}: {reason}; the previous one, if any, is intact"
        ) from None
    except BaseException:  # a kill signal turned into an exception: no debris either
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # make the rename itself durable


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)`` that neither a crash nor a power cut can leave
    half-written or empty (temp file in the same folder, fsync, rename, fsync of the folder)."""
    write_bytes_atomically(path, text.encode())


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    """``Path(path).write_bytes(data)``, atomically as :func:`write_text_atomically`. A symlink
    is followed: its target is replaced, not the link."""
    path = Path(path).resolve()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_path(path: str | os.PathLike) -> None:
    """Write a file's dirty pages (also those written through a memory mapping), or a
    directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; one clear error if it can't be."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(
            f"no checkpoint at {path} (expected a run directory holding {CHECKPOINT_NAME}, "
            "or the file itself)"
        )
    if path.suffix in (".yaml", ".yml", ".jsonl", ".json"):  # a run's other files
        raise CheckpointError(
            f"{path} is a run's {path.suffix[1:]} file, not a checkpoint; pass the run "
            f"directory ({path.parent}) or its {CHECKPOINT_NAME}"
        )
    bad = _failed_checksum(path)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its record {bad} fails its checksum (a disk or copy "
            "error); nothing was loaded from it"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or not an aefrl checkpoint): "
            f"{type(exc).__name__}"
        ) from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"checkpoint {path} is not an aefrl checkpoint")
    return _decode(payload)


def _failed_checksum(path: Path) -> str | None:
    """The first record of the checkpoint's zip archive whose CRC-32 does not match its bytes,
    or None. torch.load does not check them, so a bit flip or a zeroed block inside a record
    loaded as wrong weights or optimiser states. Costs one more read of the file: 0.4 s per
    GiB against torch.load's 0.6 s on the project's 2-core VM (a 1 GiB record, page-cached).
    A file that is no zip archive is left to torch.load's own error; records saved without a
    checksum (torch's ``serialization.config.save.compute_crc32 = False`` stores 0) pass."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                try:
                    with archive.open(info) as record:  # checks the CRC once read to the end
                        while record.read(1 << 24):
                            pass
                # A flipped bit in the record's directory entry: another method, encryption.
                except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError):
                    return info.filename
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None
    return None


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(.*?)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[(.*?)\]\)"
)


def load_error_summary(exc: RuntimeError) -> str:
    """One line from ``load_state_dict``'s multi-line report (which lists every key): how many
    keys are missing, unexpected or of another shape, and the first of each."""
    parts, shapes, others = [], [], []
    for line in str(exc).splitlines()[1:]:
        line = line.strip().rstrip(".").strip()
        if line.startswith(("Missing key(s)", "Unexpected key(s)")):
            what, names = line.split(":", 1)
            names = [n.strip().strip('"') for n in names.split(",") if n.strip()]
            kind = "missing" if what.startswith("Missing") else "unexpected"
            parts.append(f"{len(names)} {kind} key(s), first {names[0]}")
        elif m := _SIZE_MISMATCH.match(line):
            shapes.append(f"{m[1]} is [{m[2]}] in the checkpoint, [{m[3]}] in the model")
        elif line:  # a module's own message (e.g. a two-hot head's bins)
            others.append(line)
    if shapes:  # the first is enough to see that the sizes differ
        parts.append(shapes[0] + (f" ({len(shapes) - 1} more shapes differ)" if shapes[1:] else ""))
    parts += others[:1]
    if not parts:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "; ".join(parts)


def check_contents(state: dict, path, required: tuple[str, ...] = TRAINING_KEYS) -> None:
    """Raise :class:`CheckpointError` (one sentence) unless ``state`` has this version's format
    and every ``required`` entry."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {state.get('format')!r}; this aefrl reads format "
            f"{CHECKPOINT_FORMAT}"
        )
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}: not one written by scripts/train.py"
        )


def rng_state() -> dict:
    """Every global RNG a run draws from: python, numpy, torch (CPU and CUDA)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU of the machine that saved it: a machine with fewer GPUs takes
        # those it has (set_rng_state_all raised IndexError for the others).
        for index, gpu_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)
