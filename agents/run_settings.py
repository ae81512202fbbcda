"""A run's configuration checked before anything is built or written: every number, the
env, the networks (built on the meta device: their shapes, no memory), the loop and the
replay, each refusal one sentence naming the configuration key; and a checkpoint's weights
against the networks its own configuration builds.

``scripts/train.py`` runs :func:`check_settings` on every job of a new run before Hydra starts
the first (its ``check_job``), and on the configuration a run trains with when it builds it
(``build_run``: a new run's again, a resume's on its checkpoint's configuration). ``conf`` is
always the resolved configuration as plain dicts.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch

from aefrl.checkpoint import CheckpointError
from aefrl.cli import UserError, check_run_env, resolve_device
from aefrl.envs.dmc import task_action_dim
from aefrl.loop import LoopConfig
from aefrl.nn import conv_stages
from aefrl.replay import STORAGES, check_replay_sizes
from aefrl.resume_overrides import leaves
from agents.base import shared_entries
from agents.factory import IGNORED, build_agent, name_keys

# LoopConfig fields that come from other config groups than loop (for error messages).
LOOP_FIELD_KEYS = {
    "action_repeat": "env.action_repeat",
    "batch_size": "replay.batch_size",
    "seq_len": "replay.seq_len",
    "log_every": "logger.log_every",
    "video_fps": "logger.video_fps",
    "eval_video": "logger.eval_video",
}


def resolve_cuda_graph(value, device: torch.device) -> dict:
    """``loop.cuda_graph`` as LoopConfig fields: ``auto`` tries on CUDA devices and falls back to
    eager updates if the capture fails; ``true`` needs a CUDA device and a working capture."""
    if value == "auto":
        return {"cuda_graph": device.type == "cuda", "cuda_graph_fallback": True}
    if not isinstance(value, bool):
        raise UserError(f"loop.cuda_graph must be auto, true or false, got {value!r}")
    if value and device.type != "cuda":
        raise UserError(f"loop.cuda_graph=true needs a CUDA device, but device is {device}")
    return {"cuda_graph": value, "cuda_graph_fallback": False}


def check_whole_number(key: str, value, minimum: int | None = None) -> None:
    """Refuse ``value`` unless it is a whole number (>= ``minimum``, if given): int() would
    truncate 2.5 without a word. Whole floats (``1e6`` from the command line) pass."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    low = minimum is not None and whole and value < minimum
    if isinstance(value, bool) or not whole or low:  # is_integer(): False for inf and nan too
        bound = "" if minimum is None else f" >= {minimum}"
        raise UserError(f"{key} must be a whole number{bound}, got {value!r}")


def non_finite_keys(conf: dict) -> list[tuple[str, float]]:
    """``(dotted key, value)`` of the configuration's floats that are inf or nan: range checks
    of the form ``not value > 0`` let inf through (a learning rate of inf crashed deep in a
    sampler; a train ratio of inf trained nothing and exited 0)."""
    return [
        (key, value)
        for key, value in leaves(conf).items()
        if isinstance(value, float) and not math.isfinite(value)
    ]


#: Settings that reach their consumers through int(): refused unless whole.
WHOLE_NUMBERS = (
    ("replay", "batch_size"),
    ("replay", "seq_len"),
    ("replay", "capacity"),
    ("logger", "log_every"),
    ("env", "action_repeat"),
    ("env", "num_envs"),
)


def check_trains(loop: LoopConfig, num_envs: int, updates_done: int = 0) -> None:
    """Refuse a run that would end before its first update (it would log and evaluate an
    untrained agent and exit 0): the prefill, the first full window of every env's stream or
    a train ratio too low for the run's length. A resumed run that has updated may stop
    anywhere (``updates_done`` > 0); one stopped in its prefill is checked like a new one."""
    if updates_done:
        return
    steps = loop.total_frames // loop.action_repeat  # agent steps, all envs together
    ready = num_envs * loop.seq_len  # the replay samples once every stream holds a window
    frames = f"loop.total_frames={loop.total_frames} ({steps} agent steps at action repeat "
    frames += f"{loop.action_repeat})"
    never = "the run would end before its first update"
    if steps <= loop.prefill_steps:
        raise UserError(
            f"loop.prefill_steps={loop.prefill_steps} random steps fill the whole run, "
            f"{frames}: {never}; raise loop.total_frames or lower loop.prefill_steps"
        )
    if steps <= ready:
        raise UserError(
            f"replay.seq_len={loop.seq_len} needs that many agent steps in each of the "
            f"{num_envs} env stream(s) before the first batch, {ready} in all, and the run has "
            f"{frames}: {never}; raise loop.total_frames or lower replay.seq_len"
        )
    per_step = loop.train_ratio / (loop.batch_size * loop.seq_len)
    updates = (steps - max(loop.prefill_steps, ready)) * per_step
    if updates < 1:
        raise UserError(
            f"loop.train_ratio={loop.train_ratio} makes {per_step:.3g} updates per agent step "
            f"(replay.batch_size x replay.seq_len = {loop.batch_size * loop.seq_len} replayed "
            f"steps each), {updates:.2f} over the {frames}: {never}; raise loop.train_ratio or "
            "loop.total_frames"
        )


def check_replay_fits(storage: str, replay_bytes: int, capacity: int, device) -> None:
    """Refuse an in-memory replay larger than the memory that would hold it (the allocation
    would fail at the first row, after the run's files were written); disk files are sparse.
    ``replay_bytes``: its rows' pixels (and stored contexts)."""
    if storage == "memory":
        where, total = device_memory(torch.device("cpu"))
    elif storage == "device":
        where, total = device_memory(device)
    else:
        return
    if replay_bytes > total:
        raise UserError(
            f"replay.capacity={capacity} needs {replay_bytes / 2**30:.0f} GiB of {where} for its "
            f"rows, more than the {total / 2**30:.0f} GiB there; lower replay.capacity or use "
            "replay.storage=disk"
        )


_task_action_dim = functools.lru_cache(task_action_dim)  # once per task in a sweep's checks


class CheckedSettings(NamedTuple):
    """What :func:`check_settings` worked out of a run's configuration."""

    seed: int
    threads: int  # 0: torch's default
    device: torch.device
    image_size: int
    loop: LoopConfig
    storage: str  # replay.storage with auto decided
    agent: torch.nn.Module  # built on the meta device: its parameters' shapes, no memory


def check_settings(conf: dict, updates_done: int = 0) -> CheckedSettings:
    """Every check of a run's configuration ``conf`` (resolved) that needs no environment, no
    files and no memory; a :class:`UserError` or ValueError names the key. scripts/train.py's
    ``build_run`` runs it first, and its ``check_job`` before Hydra for every job of a ``-m``
    sweep, where a bad value in a later job (an unknown task, γ > 1, a run too short to update)
    stopped the sweep only after the jobs before it had trained. ``updates_done``: a resumed
    run's."""
    for key, value in non_finite_keys(conf):
        raise UserError(f"{key} must be a finite number, got {value}")
    threads = conf["threads"] or 0  # 0 and null: torch's default
    check_whole_number("threads", threads, 0)
    seed = conf["seed"]
    if isinstance(seed, bool) or seed != int(seed) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be a whole number in [0, 2**32 - 1], got {seed}")
    device = resolve_device(conf["device"])
    loop = dict(conf["loop"])  # runs from before loop.cuda_graph existed resume with "auto"
    cuda_graph = resolve_cuda_graph(loop.pop("cuda_graph", "auto"), device)
    try:  # the conv trunks halve the image down to 4 pixels: refuse other sides before the env
        conv_stages(conf["env"]["image_size"], conf["env"]["image_size"])
    except (TypeError, ValueError):
        raise UserError(
            "env.image_size must be 4 times a power of two (8, 16, 32, 64, 128, ...), got "
            f"{conf['env']['image_size']}"
        ) from None
    for section, key in WHOLE_NUMBERS:  # ranges are checked where the values are used
        check_whole_number(f"{section}.{key}", conf[section][key])
    check_run_env(conf["env"])  # the task, the renderer, num_envs, ...
    size = int(conf["env"]["image_size"])
    action_dim = _task_action_dim(conf["env"]["task"])
    agent = check_networks(conf, (3, size, size), action_dim, device)
    rep = conf["replay"]
    try:
        loop_conf = LoopConfig(
            **loop,
            **cuda_graph,
            action_repeat=int(conf["env"]["action_repeat"]),
            batch_size=int(rep["batch_size"]),
            seq_len=int(rep["seq_len"]),
            log_every=int(conf["logger"]["log_every"]),
            video_fps=float(conf["logger"]["video_fps"]),
            eval_video=conf["logger"].get("eval_video", True),  # runs from before it: on
        )
    except ValueError as exc:  # "name must ...": name the configuration key instead
        name, _, rest = str(exc).partition(" ")
        raise UserError(f"{LOOP_FIELD_KEYS.get(name, f'loop.{name}')} {rest}") from None
    num_envs, capacity = int(conf["env"]["num_envs"]), int(rep["capacity"])
    try:  # the replay's own checks, in the configuration's words
        check_replay_sizes(capacity, num_envs, int(rep["seq_len"]), int(rep["batch_size"]))
    except ValueError as exc:
        raise UserError(name_keys(str(exc), replay_sections(conf))) from None
    check_trains(loop_conf, num_envs, updates_done)
    storage = rep["storage"]
    if storage not in ("auto", *STORAGES):
        accepted = ", ".join(("auto", *STORAGES))
        raise UserError(f"replay.storage must be one of {accepted}, got {storage!r}")
    row_bytes = 3 * size * size  # the pixels dominate a row
    if getattr(agent, "replay_context", False):  # and its context: float32 h and z
        row_bytes += 4 * (agent.world_model.rssm.deter + agent.world_model.rssm.latent_dim)
    replay_bytes = capacity * row_bytes
    if storage == "auto":
        storage = "disk" if replay_bytes > 2**31 else "memory"
    check_replay_fits(storage, replay_bytes, capacity, device)
    return CheckedSettings(int(seed), int(threads), device, size, loop_conf, storage, agent)


def check_networks(
    conf: dict, obs_shape: tuple, action_dim: int, device: torch.device
) -> torch.nn.Module:
    """Build the run's agent on the meta device (no memory, milliseconds) and return it: its
    ValueErrors name a wrong setting, and networks whose weights, gradients and Adam's two
    moments alone exceed the device's memory are refused (building them for real was not an
    allocation error but the kernel's out-of-memory kill, exit 137, once the weights were
    initialised)."""
    with torch.device("meta"):
        agent = build_agent(conf["agent"], conf["obs_model"], obs_shape, action_dim)
    tensors = [*agent.parameters(), *agent.buffers()]
    need = 4 * sum(t.numel() * t.element_size() for t in tensors)
    where, total = device_memory(device)
    if need > total:
        count = sum(p.numel() for p in agent.parameters())
        raise UserError(
            f"the agent's networks do not fit in {where} at these sizes: {count:,} parameters, "
            f"{need / 2**30:,.1f} GiB with their gradients and optimiser states, more than the "
            f"{total / 2**30:.0f} GiB there; lower {network_sizes(conf)}"
        )
    return agent


def check_weights(agent: torch.nn.Module, saved: dict, path: Path) -> None:
    """Refuse a checkpoint whose weights (``saved``: its ``agent`` entry) do not have the shapes
    of the networks its own run configuration builds (``agent``, e.g. the meta-device one of
    :func:`check_settings`): a checkpoint edited or copied in from another run failed deep in
    ``load_state_dict`` with a traceback, after the run had appended its records and logs."""
    modules = saved.get("modules") if isinstance(saved, dict) else None
    modules = modules if isinstance(modules, dict) else {}
    expected = agent.state_dict()["modules"]
    aliases = shared_entries(agent)  # checkpoints from before listed them too
    wrong = [
        f"{key} is there, and not in the configured model"
        for key in modules
        if key not in expected and key not in aliases
    ]
    # an alias's stored tensor is loaded as it is (agents/base.py): its shape matters as well
    checked = {**expected, **{a: expected[n] for a, n in aliases.items() if a in modules}}
    for key, tensor in checked.items():
        found = modules.get(key)
        if not isinstance(found, torch.Tensor) or found.shape != tensor.shape:
            there = "missing" if found is None else "not a tensor"
            if isinstance(found, torch.Tensor):
                there = f"{tuple(found.shape)}"
            wrong.append(f"{key} is {there} there, {tuple(tensor.shape)} in the configured model")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{path} does not hold the networks of its own run configuration: {wrong[0]}{more}; "
            "it was written by another run, edited, or by an aefrl version with other networks"
        )


def replay_sections(conf: dict) -> dict:
    """The configuration sections :class:`SequenceReplay`'s arguments come from (``name_keys``
    turns ``capacity`` into ``replay.capacity``, ``num_envs`` into ``env.num_envs``)."""
    return {"replay": conf["replay"], "env": {"num_envs": conf["env"]["num_envs"]}}


def network_sizes(conf: dict) -> str:
    """The settings that size the run's agent's networks (those of the sections it reads)."""
    ignored = IGNORED[conf["agent"]["name"]]  # the planner has no actor-critic
    sizes = [f"agent.{k}" for k in ("world_model", "actor", "critic") if k not in ignored]
    return ", ".join(sizes) + " or obs_model.latent_dim"


def device_memory(device: torch.device) -> tuple[str, int]:
    """``(what to call it, bytes)`` of the memory tensors on ``device`` live in."""
    if device.type == "cuda":
        return f"{device} memory", torch.cuda.get_device_properties(device).total_memory
    return "RAM", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
