"""Sequence replay for Dreamer-style training, on torchrl storages.

Rows use the *arrival* layout (see :mod:`aefrl.keys`): one row per env stream per agent step, row t
holding ``pixels`` o_t, ``prev_action`` a_{t-1}, ``reward`` r_t, ``is_first`` and ``terminated``.
The data lives in a torchrl ``LazyTensorStorage`` (RAM, or the memory of ``device``: a GPU run
then gathers its batches where it trains, with no host-to-device copy of pixels) or
``LazyMemmapStorage`` (files under a directory) with ``ndim=2``, shape ``[rows_per_env,
num_envs]``: dim 0 is a ring over time shared by all streams (they are written in lock-step), dim 1
is the stream.

A training window is ``seq_len`` consecutive rows of one stream. Windows may cross episode
boundaries (the world model resets where ``is_first`` is set, as in DreamerV3, Hafner et al. 2023)
but never the ring's write cursor and never two streams. Every extend call is stamped with its
step number, so the valid rows are exactly the steps ``[oldest, steps)``; a window is a start step
in ``[oldest, steps - seq_len]`` and an env, drawn uniformly.

Why not torchrl's ``SliceSampler``: with ``ndim=2`` and a constant per-stream trajectory id it
samples the right windows, but it rebuilds the trajectory boundaries from the whole storage on every
sample (each extend invalidates its cache) and gathers the batch twice with advanced indexing; see
``docs/results/replay_cpu.md`` for the numbers. This module draws (stream, start) directly and
gathers each key once with ``index_select`` on a flat ``[rows, ...]`` view of the storage.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyMemmapStorage, LazyTensorStorage

from aefrl import keys
from aefrl.checkpoint import fsync_path, write_text_atomically
from aefrl.devices import canonical_device

STORAGES = ("memory", "device", "disk")
# Step stamp written next to every row; internal to the replay, never returned by ``sample``.
STEP_STAMP = "_replay_step"
# 2: the memory and device storages save only the rows written so far (1: the whole preallocated
# block, every row of the capacity; still loaded).
_STATE_VERSION = 2
_READABLE_VERSIONS = (1, 2)


def check_replay_sizes(capacity: int, num_envs: int, seq_len: int, batch_size: int) -> None:
    """:class:`SequenceReplay`'s checks of its sizes, allocating nothing: a one-sentence
    ValueError for the first bad one."""
    for name, value in [
        ("capacity", capacity),
        ("num_envs", num_envs),
        ("seq_len", seq_len),
        ("batch_size", batch_size),
    ]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if seq_len < 2:
        # A one-step window holds no transition: the recurrent weights get no gradient.
        raise ValueError(
            f"seq_len must be at least 2 (a window of one step has no transition for the "
            f"recurrent world model to learn from), got {seq_len}."
        )
    if capacity // num_envs < seq_len:
        raise ValueError(
            f"capacity={capacity} gives each of the {num_envs} env streams "
            f"{capacity // num_envs} rows, fewer than seq_len={seq_len}; "
            f"capacity must be at least num_envs * seq_len = {num_envs * seq_len}."
        )


class SequenceReplay:
    """Ring-buffer replay of ``num_envs`` parallel streams that samples ``[B, T]`` windows.

    Args:
        capacity: rows kept in total across streams; each stream keeps ``capacity // num_envs``.
        num_envs: number of env streams written together by :meth:`extend`.
        seq_len: window length T of a sample.
        batch_size: windows B per sample.
        storage: ``"memory"`` (``LazyTensorStorage`` in host RAM), ``"device"`` (the same on
            ``device``, e.g. GPU memory: batches are gathered there) or ``"disk"``
            (``LazyMemmapStorage`` under ``path``; pixels at 1M steps are 12 GB, so large
            buffers belong on disk or on a large GPU).
        path: directory of the memory-mapped files; required for ``"disk"`` only.
        device: where sampled batches are returned; the storage stays in host RAM (or on disk)
            unless ``storage="device"``.
        seed: seed of the replay's own ``torch.Generator`` (``None``: from the OS), so sampling
            neither uses nor disturbs the global RNG.
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        seq_len: int,
        batch_size: int,
        *,
        storage: str = "memory",
        path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        seed: int | None = None,
    ) -> None:
        check_replay_sizes(capacity, num_envs, seq_len, batch_size)
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}.")
        if storage == "disk" and path is None:
            raise ValueError("storage='disk' needs path=<directory for the memory-mapped files>.")
        if storage != "disk" and path is not None:
            raise ValueError(
                f"path is only used with storage='disk'; leave it None for {storage!r}."
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}.")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"device must name a torch device such as 'cpu', got {device!r}."
            ) from err
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available.")
        # As tensors on it report it: sample(out=...) compares the two.
        self.device = canonical_device(self.device)

        self.num_envs = num_envs
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rows_per_env = capacity // num_envs
        self.capacity = self.rows_per_env * num_envs  # rounded down to whole rows per stream
        self.storage_kind = storage
        self.path = None if path is None else Path(path).absolute()
        # Where the rows live: ``device`` for the "device" storage, else host RAM / files.
        self.storage_device = self.device if storage == "device" else torch.device("cpu")
        if self.path is None:
            self._storage = LazyTensorStorage(self.capacity, ndim=2, device=self.storage_device)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self._storage = LazyMemmapStorage(self.capacity, scratch_dir=self.path, ndim=2)
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._steps = 0  # extend calls so far; step s lives at ring position s % rows_per_env
        self._floor = 0  # lowest step that may be sampled (raised after an interrupted disk run)
        self._schema: dict[Any, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._flat: dict[Any, torch.Tensor] = {}

    # --- sizes ----------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of :meth:`extend` calls so far (agent steps, counting all of them)."""
        return self._steps

    @property
    def valid_rows_per_env(self) -> int:
        """Valid rows currently held by each stream."""
        return self._steps - self._oldest()

    def __len__(self) -> int:
        """Valid rows stored, across all streams."""
        return self.valid_rows_per_env * self.num_envs

    @property
    def num_valid_windows(self) -> int:
        """Number of distinct (stream, start) windows that :meth:`sample` draws from."""
        return self.num_envs * max(0, self.valid_rows_per_env - self.seq_len + 1)

    @property
    def ready(self) -> bool:
        """Whether :meth:`sample` can run (every stream holds at least one full window)."""
        return self.num_valid_windows > 0

    def _oldest(self) -> int:
        return max(self._steps - self.rows_per_env, self._floor)

    # --- writing --------------------------------------------------------------------------------
    def extend(self, rows: TensorDictBase) -> None:
        """Append one row to every stream.

        Args:
            rows: batch ``[num_envs]``, e.g. ``pixels`` uint8 ``[num_envs, 3, 64, 64]``,
                ``prev_action`` ``[num_envs, A]``, ``reward``/``is_first``/``terminated``
                ``[num_envs, 1]``. The keys, shapes and dtypes of the first call are fixed for
                the life of the replay.
        """
        if not isinstance(rows, TensorDictBase):
            raise ValueError(f"extend expects a TensorDict, got {type(rows).__name__}.")
        if tuple(rows.batch_size) != (self.num_envs,):
            raise ValueError(
                f"extend expects one row per env stream, batch_size [{self.num_envs}]; "
                f"got {list(rows.batch_size)}."
            )
        fresh = not self._storage.initialized and self.path is not None
        if fresh and (self.path / "meta.json").exists():
            raise ValueError(
                f"{self.path} already holds replay files; call load_state_dict to resume "
                "from them, or give a fresh directory to start a new buffer."
            )
        self._check_schema(rows)
        # A shallow copy, so the caller's TensorDict does not get the stamp key.
        data = rows.to(self.storage_device).copy()
        stamp = torch.full((self.num_envs,), self._steps, dtype=torch.int64)
        data.set(STEP_STAMP, stamp.to(self.storage_device))
        position = self._steps % self.rows_per_env
        if self.path is not None and self._flat:
            # The files outlive a killed process: mark the row as being written (stamp -1)
            # before its data, so one cut short keeps no older step's stamp over newer pixels.
            self._flat[STEP_STAMP].view(self.rows_per_env, self.num_envs)[position] = -1
        self._storage.set(position, data)
        if not self._flat:
            self._bind_views()
        self._steps += 1

    def _check_schema(self, rows: TensorDictBase) -> None:
        schema = {
            key: (tuple(value.shape[1:]), value.dtype)
            for key, value in rows.items(include_nested=True, leaves_only=True)
        }
        if STEP_STAMP in schema:
            raise ValueError(f"the key {STEP_STAMP!r} is reserved by the replay.")
        if self._schema is None:
            self._schema = schema
            return
        if schema.keys() != self._schema.keys():
            raise ValueError(
                f"extend got keys {sorted(map(str, schema))}, but the replay stores "
                f"{sorted(map(str, self._schema))}; every row must carry the same keys."
            )
        for key, (shape, dtype) in schema.items():
            if (shape, dtype) != self._schema[key]:
                want_shape, want_dtype = self._schema[key]
                raise ValueError(
                    f"key {key!r} arrived as {dtype} {list(shape)} per row, but the replay "
                    f"stores {want_dtype} {list(want_shape)}."
                )

    def _bind_views(self) -> None:
        # torchrl allocates the whole [rows_per_env, num_envs, ...] block on the first write and
        # keeps it in ``_storage``; a flat [rows, ...] plain-tensor view of each leaf lets sample()
        # gather with index_select (a memcpy per row), ~10x faster than advanced indexing.
        block = self._storage._storage
        self._flat = {
            key: value.as_subclass(torch.Tensor).view(self.capacity, *value.shape[2:])
            for key, value in block.items(include_nested=True, leaves_only=True)
        }

    # --- sampling -------------------------------------------------------------------------------
    def sample(
        self,
        out: TensorDictBase | None = None,
        generator: torch.Generator | None = None,
        *,
        ids: bool = False,
    ) -> TensorDictBase:
        """Draw ``batch_size`` windows uniformly over all valid (stream, start) pairs.

        Args:
            out: optional batch from an earlier call that the caller no longer needs; it is
                overwritten in place instead of allocating a new one. On the CPU this avoids the
                page faults of a fresh 12 MB allocation, which can cost more than the gather itself
                (``docs/results/replay_cpu.md``).
            generator: draw the windows from this CPU generator instead of the replay's own
                (whose state is checkpointed): a report's batch then leaves the training
                batches as they would have been.
            ids: also return each row's identity under ``replay_id`` (int64 ``[B, T]``,
                ``step * num_envs + env``), for :meth:`write` to put values back.

        Returns:
            TensorDict with batch ``[batch_size, seq_len]`` on ``device`` (``out`` if given); every
            stored key with its stored dtype (pixels stay uint8), e.g. ``pixels`` ``[B, T, 3, 64,
            64]``.
        """
        if not self.ready:
            raise RuntimeError(
                f"cannot sample yet: each env stream holds {self.valid_rows_per_env} rows but a "
                f"window needs seq_len={self.seq_len}; call extend "
                f"{self.seq_len - self.valid_rows_per_env} more times (check `ready` first)."
            )
        if out is not None:
            self._check_out(out, ids)
        windows_per_env = self.valid_rows_per_env - self.seq_len + 1
        pick = torch.randint(
            self.num_envs * windows_per_env,
            (self.batch_size,),
            generator=self._generator if generator is None else generator,
        )
        env = pick % self.num_envs
        start = self._oldest() + torch.div(pick, self.num_envs, rounding_mode="floor")
        steps = start[:, None] + torch.arange(self.seq_len)
        flat_index = ((steps % self.rows_per_env) * self.num_envs + env[:, None]).view(-1)
        if self.storage_device != flat_index.device:
            # Only the B·T indices cross to the device (8 KB), from pinned memory without
            # blocking; the rows are gathered where they live.
            pinned = self.storage_device.type == "cuda"
            host = flat_index.pin_memory() if pinned else flat_index
            flat_index = host.to(self.storage_device, non_blocking=pinned)

        pin = self.device.type == "cuda" and self.storage_device.type == "cpu"
        result = TensorDict(batch_size=[self.batch_size, self.seq_len], device=self.device)
        if ids:
            row_ids = (steps * self.num_envs + env[:, None]).to(self.device)
            if out is not None:
                out.get(keys.REPLAY_ID).copy_(row_ids)
            else:
                result.set(keys.REPLAY_ID, row_ids)
        for key, source in self._flat.items():
            if key == STEP_STAMP:
                continue
            shape = (flat_index.numel(), *source.shape[1:])
            if out is not None and not pin:
                torch.index_select(source, 0, flat_index, out=out.get(key).view(shape))
                continue
            # Gather where the rows live; from host RAM on CUDA runs, straight into pinned memory,
            # so the host-to-device copy can overlap (torch's pinned-memory cache does not reuse
            # a block before its copy ends).
            batch = torch.empty(shape, dtype=source.dtype, device=source.device, pin_memory=pin)
            torch.index_select(source, 0, flat_index, out=batch)
            batch = batch.view(self.batch_size, self.seq_len, *source.shape[1:])
            if out is not None:
                out.get(key).copy_(batch, non_blocking=pin)
            else:
                result.set(key, batch.to(self.device, non_blocking=pin))
        return result if out is None else out

    def _check_out(self, out: TensorDictBase, ids: bool) -> None:
        entries = [(k, v.shape[1:], v.dtype) for k, v in self._flat.items() if k != STEP_STAMP]
        if ids:
            entries.append((keys.REPLAY_ID, (), torch.int64))
        for key, shape, dtype in entries:
            want = (self.batch_size, self.seq_len, *shape)
            dest = out.get(key, None) if isinstance(out, TensorDictBase) else None
            if (
                dest is None
                or tuple(dest.shape) != want
                or dest.dtype != dtype
                or dest.device != self.device
                or not dest.is_contiguous()
            ):
                raise ValueError(
                    f"out must be a batch returned by an earlier sample() of this replay; its "
                    f"{key!r} entry should be a contiguous {dtype} tensor of shape "
                    f"{list(want)} on {self.device}."
                )

    # --- writing back ---------------------------------------------------------------------------
    def write(self, ids: torch.Tensor, values: TensorDictBase | dict[str, torch.Tensor]) -> int:
        """Overwrite stored entries of the rows named by ``ids`` (DreamerV3's ``replay.update``:
        an update puts back what it computed about the rows it trained on, e.g. their latents).

        Args:
            ids: int64 ``[*S]`` row identities from :meth:`sample` with ``ids=True``.
            values: ``{key: [*S, *shape]}``, keys the replay already stores, with their stored
                trailing shape (cast to the stored dtype).

        Rows written over by :meth:`extend` since they were sampled (their step stamp differs)
        or not yet written are skipped. Returns how many of ``ids`` named a stored row. Where
        ``ids`` names a row more than once (overlapping windows), the value that comes last in
        ``ids``' flattened order is kept (``index_copy_`` alone keeps an arbitrary one, on the
        CPU too at an update's sizes).

        On a disk replay the values go into the files in place: a run killed without a
        checkpoint (SIGKILL, power loss) resumes with the values written after its last one.
        """
        if not self._flat:
            raise RuntimeError("the replay holds no rows yet: nothing to write to.")
        ids = torch.as_tensor(ids)
        if ids.dtype != torch.int64:
            raise ValueError(f"ids must be int64 row ids from sample(ids=True), got {ids.dtype}.")
        lead = tuple(ids.shape)
        for key, value in values.items():
            stored = self._flat.get(key)
            if stored is None or key == STEP_STAMP:
                raise ValueError(
                    f"write got key {key!r}, which the replay does not store; it stores "
                    f"{sorted(str(k) for k in self._flat if k != STEP_STAMP)}."
                )
            if tuple(value.shape) != lead + tuple(stored.shape[1:]):
                raise ValueError(
                    f"write got {key!r} of shape {list(value.shape)} for ids of shape "
                    f"{list(lead)}; expected {list(lead + tuple(stored.shape[1:]))}."
                )
        flat, live = self._locate(ids)
        # The last occurrence of each row: a stable sort keeps equal positions in ids' order.
        pick = live.nonzero().squeeze(-1)
        where, order = torch.sort(flat[pick], stable=True)
        last = torch.ones_like(where, dtype=torch.bool)
        last[:-1] = where[1:] != where[:-1]
        where, pick = where[last], pick[order[last]]
        for key, value in values.items():
            stored = self._flat[key]
            rows = value.reshape(-1, *stored.shape[1:]).to(self.storage_device, stored.dtype)
            stored.index_copy_(0, where, rows[pick])
        return int(live.sum())

    def read(self, ids: torch.Tensor) -> TensorDict:
        """The stored rows named by ``ids`` (int64 ``[*S]`` from :meth:`sample` with
        ``ids=True``), every key, as a TensorDict ``[*S]`` on ``device``; a ValueError if one of
        them has been written over since (or was never written)."""
        ids = torch.as_tensor(ids)
        if not self._flat or ids.dtype != torch.int64:
            raise ValueError("read takes int64 row ids from sample(ids=True) of a filled replay.")
        flat, live = self._locate(ids)
        if not bool(live.all()):
            raise ValueError(
                f"{int((~live).sum())} of the {live.numel()} rows asked for are no longer stored."
            )
        out = TensorDict(batch_size=ids.shape, device=self.device)
        for key, stored in self._flat.items():
            if key != STEP_STAMP:
                rows = stored.index_select(0, flat)
                out.set(key, rows.view(*ids.shape, *stored.shape[1:]).to(self.device))
        return out

    def _locate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat storage positions ``[n]`` of the rows ``ids [*S]``, and whether each still
        holds that row (written, in the sampled range, its stamp unchanged)."""
        ids = ids.reshape(-1).to(self.storage_device)
        step, env = ids.div(self.num_envs, rounding_mode="floor"), ids % self.num_envs
        flat = (step % self.rows_per_env) * self.num_envs + env
        live = (step >= self._oldest()) & (step < self._steps) & (ids >= 0)
        live &= self._flat[STEP_STAMP].index_select(0, flat) == step
        return flat, live

    # --- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: step counter, generator state and, for the
        memory and device storages, the rows written so far (see :meth:`_written_rows`), not the
        whole preallocated capacity.

        For the disk storage the rows stay in the files under ``path``; this call writes torchrl's
        small ``storage_metadata.json`` there so a fresh replay on the same ``path`` can reattach.
        """
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "storage": self.storage_kind,
            "capacity": self.capacity,
            "num_envs": self.num_envs,
            "steps": self._steps,
            "floor": self._floor,
            "schema": None if self._schema is None else dict(self._schema),
            "generator": self._generator.get_state(),
            "data": None,
        }
        if self._storage.initialized:
            if self.path is None:
                state["data"] = {"rows": self._written_rows()}
            else:
                with warnings.catch_warnings():
                    # torchrl warns when a reattached storage has no write cursor; that cursor
                    # only feeds save hooks, which this replay does not use.
                    warnings.filterwarnings("ignore", message="last_cursor is None")
                    self._storage.dumps(self.path)
                # dumps re-maps the files; re-derive the views from the fresh mapping.
                self._bind_views()
                # The rows live in the page cache until the kernel writes them back; the
                # checkpoint about to name them is fsynced, so they are too (a power loss
                # would otherwise leave a checkpoint whose last rows read back as zeros).
                for file in sorted(self.path.rglob("*")):
                    if file.is_file():
                        fsync_path(file)
                # dumps rewrites its JSON metadata in place (truncate, then write): a kill in
                # that window would leave the run unresumable. The checkpoint, written
                # atomically, keeps a copy that load_state_dict puts back.
                state["disk_metadata"] = {
                    f.name: f.read_text() for f in sorted(self.path.glob("*.json"))
                }
        return state

    def _written_rows(self) -> dict[Any, torch.Tensor]:
        """The rows written so far, ``[rows, num_envs, ...]`` per key (the step stamps included).

        Step ``s`` lives at ring position ``s % rows_per_env``, so the written rows are always the
        first ``min(steps, rows_per_env)`` positions: a prefix before the ring wraps, all of it
        after. That is every row that can still be sampled (``[oldest, steps)``, ``_floor``
        included); rows past the prefix were never written. A full ring is returned by reference
        (as in ``nn.Module.state_dict``); a partial one is copied out to host RAM, because
        ``torch.save`` of a view writes the whole storage under it.
        """
        written = min(self._steps, self.rows_per_env)
        rows = {}
        for key, flat in self._flat.items():
            part = flat[: written * self.num_envs]
            if written < self.rows_per_env:
                part = part.to("cpu", copy=True)
            rows[key] = part.view(written, self.num_envs, *flat.shape[1:])
        return rows

    def _restore_rows(self, rows: dict[Any, torch.Tensor], steps: int, schema: dict | None) -> None:
        """Rebuild the full-capacity storage from the :meth:`_written_rows` of a state taken
        after ``steps`` extend calls of rows with ``schema``."""
        written = min(steps, self.rows_per_env)
        want = {*(schema or {}), STEP_STAMP}
        shapes = {key: tuple(value.shape[:2]) for key, value in rows.items()}
        if set(rows) != want or set(shapes.values()) != {(written, self.num_envs)}:
            got = {str(key): list(shape) for key, shape in shapes.items()}
            raise ValueError(
                f"the stored rows do not match this replay state: expected {written} rows of "
                f"{self.num_envs} streams with keys {sorted(map(str, want))}, got {got}."
            )
        # Writing one row allocates the whole [rows_per_env, num_envs] block where the rows live
        # (empty, as a fresh replay's); then each key is copied into it without a staging copy.
        first = TensorDict(batch_size=[self.num_envs])
        for key, value in rows.items():
            first.set(key, value[0])
        self._storage.set(0, first.to(self.storage_device))
        self._bind_views()
        for key, value in rows.items():
            self._flat[key][: written * self.num_envs].copy_(value.flatten(0, 1))
        # torchrl's count of stored elements, as the extend calls that wrote the rows left it.
        self._storage._len = written * self.num_envs

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a disk replay reattaches to the files under its ``path``.

        Also reads states of version 1, whose memory and device storages hold the whole block.

        Rows that an interrupted run wrote to the disk files after the state was taken hold
        steps the checkpoint never saw; they are detected by their step stamps and excluded (with a
        warning) until overwritten.
        """
        missing = {"version", "storage", "capacity", "num_envs", "steps", "generator"} - set(state)
        if missing:
            raise ValueError(f"not a SequenceReplay state dict: missing {sorted(missing)}.")
        if state["version"] not in _READABLE_VERSIONS:
            raise ValueError(
                f"replay state version {state['version']} is not supported (expected one of "
                f"{_READABLE_VERSIONS})."
            )
        for name in ("storage", "capacity", "num_envs"):
            mine = self.storage_kind if name == "storage" else getattr(self, name)
            if state[name] != mine:
                raise ValueError(
                    f"the checkpoint was taken with {name}={state[name]!r} but this replay has "
                    f"{name}={mine!r}; build the replay with the checkpoint's settings."
                )
        steps = int(state["steps"])
        schema = None if state.get("schema") is None else dict(state["schema"])
        if steps > 0 and self.path is None and state["version"] == 1:
            self._storage.load_state_dict(state["data"])  # the whole block
            block = self._storage._storage
            if block.device != self.storage_device:  # e.g. a checkpoint loaded to the CPU
                self._storage._storage = block.to(self.storage_device)
        elif steps > 0 and self.path is None:
            self._restore_rows(state["data"]["rows"], steps, schema)
        elif self.path is not None and steps == 0 and not self._storage.initialized:
            # Files here hold rows written after this checkpoint, which held none (a resumed
            # run that was killed before its next one): start afresh rather than refuse the
            # first extend forever after. (A replay already writing keeps its open files.)
            leftovers = [*self.path.glob("*.memmap"), *self.path.glob("*.json")]
            if leftovers:
                warnings.warn(
                    f"the checkpoint's replay held no rows; removing the {len(leftovers)} replay "
                    f"files written under {self.path} after it",
                    stacklevel=2,
                )
            for leftover in leftovers:
                leftover.unlink()
        elif steps > 0:
            if not any(self.path.glob("*.memmap")):
                raise ValueError(
                    f"no replay files under {self.path}: a disk replay resumes from the files "
                    "its state_dict was taken next to; pass that directory as path."
                )
            for name, text in (state.get("disk_metadata") or {}).items():
                write_text_atomically(self.path / name, text)
            self._storage.loads(self.path)
        self._steps = steps
        self._schema = schema
        self._floor = int(state.get("floor", 0))
        self._generator.set_state(state["generator"])
        self._flat = {}
        if self._storage.initialized:
            self._bind_views()
            self._check_stamps()

    def _check_stamps(self) -> None:
        stamps = self._flat[STEP_STAMP].view(self.rows_per_env, self.num_envs)
        floor, newer = self._floor, 0
        if self.path is not None:
            # Steps >= self._steps were written after the checkpoint (-1: one whose write was
            # cut short); they overwrote the oldest rows, which must not be sampled as if they
            # were the checkpoint's data.
            newer = int(((stamps >= self._steps) | (stamps < 0)).any(1).sum())
            floor = max(floor, self._steps + newer - self.rows_per_env)
        oldest = max(self._steps - self.rows_per_env, floor)
        steps = torch.arange(oldest, self._steps, device=stamps.device)
        if not bool((stamps[steps % self.rows_per_env] == steps[:, None]).all()):
            raise ValueError(
                "the stored rows do not match this replay state (their step stamps differ); "
                "the state dict or the files under path belong to another run."
            )
        if oldest > self._oldest():
            warnings.warn(
                f"{newer} rows under {self.path} were written after this checkpoint; "
                f"the {oldest - self._oldest()} oldest checkpointed rows they replaced are "
                "excluded from sampling until overwritten.",
                stacklevel=3,
            )
            self._floor = floor

    def __repr__(self) -> str:
        where = {"disk": f"disk:{self.path}", "device": f"device:{self.storage_device}"}.get(
            self.storage_kind, self.storage_kind
        )
        return (
            f"{type(self).__name__}(capacity={self.capacity}, num_envs={self.num_envs}, "
            f"seq_len={self.seq_len}, batch_size={self.batch_size}, storage={where}, "
            f"rows={len(self)}, steps={self._steps})"
        )
