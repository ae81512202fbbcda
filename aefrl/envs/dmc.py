"""DeepMind Control Suite pixel environments on torchrl, rendered once per agent step.

:func:`make_dmc_env` is the entry point. Differences from torchrl's stock ``DMControlEnv`` with
``from_pixels=True, frame_skip=k``, which renders (at 240x320, HWC) after *every* one of the k
sub-steps and cannot be given a render size (its ``render_kwargs`` end up in the task's kwargs):

* one ``image_size`` x ``image_size`` frame per agent step, channels first, after the last sub-step;
* our own offscreen renderer (:class:`aefrl.envs.gl.OffscreenRenderer`), 2-4x faster than
  ``physics.render`` with the same pixels (``render="faithful"``);
* actions in [-1, 1] for every task (affinely mapped onto the task's bounds, as Dreamer does);
* exact save / restore of the episode (:meth:`DMCPixelEnv.get_env_state`).
"""

from __future__ import annotations

import difflib
import functools
import numbers
import os
import signal
import warnings
import weakref

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase, ParallelEnv
from torchrl.envs.libs.dm_control import DMControlWrapper

from aefrl import keys
from aefrl.envs.gl import OffscreenRenderer, select_gl_backend
from aefrl.seeding import stream_seed

RENDER_MODES = ("faithful", "fast")
# Short names used in the Dreamer papers' tables.
TASK_ALIASES = {"cup-catch": "ball_in_cup-catch"}
# Dreamer renders quadruped from its third camera; every other domain from camera 0.
CAMERA_IDS = {"quadruped": 2}
# Model fields that DMC tasks change when an episode starts: part of the episode's state, so
# saved with it. Found by grepping dm_control/suite, then checked by resetting every task with
# two seeds and comparing every MjModel array (manipulator and stacker move bodies through a
# local alias, which the grep missed: their targets came back at the fresh env's place).
_TASK_MODEL_FIELDS = (
    "body_pos", "body_quat", "geom_pos", "geom_size", "geom_rgba", "site_pos", "site_size",
    "site_rgba", "light_pos", "dof_damping", "wrap_prm", "hfield_data",
)  # fmt: skip


def _suite():
    """dm_control.suite, imported after MUJOCO_GL is chosen (dm_control reads it on import)."""
    select_gl_backend(strict=False)
    from dm_control import suite

    return suite


def available_tasks() -> list[str]:
    """All DMC suite tasks as ``"domain-task"`` names, e.g. ``"walker-walk"``."""
    suite = _suite()
    return sorted(f"{domain}-{task}" for domain, task in suite.ALL_TASKS)


def task_action_dim(task: str) -> int:
    """Size of a DMC task's action vector (loads its physics; renders nothing)."""
    domain, name = _parse_task(task)
    return int(_suite().load(domain, name).action_spec().shape[0])


def _parse_task(task: str) -> tuple[str, str]:
    """Split ``"domain-task"`` (aliases allowed) into dm_control's domain and task names."""
    name = TASK_ALIASES.get(task, task) if isinstance(task, str) else None
    valid = available_tasks()
    if name not in valid:
        raise ValueError(_unknown_task_message(task, valid))
    domain, task_name = name.split("-", 1)
    return domain, task_name


def _unknown_task_message(task, valid: list[str]) -> str:
    """One sentence for a task that is not in ``valid`` (the whole list is some 900 characters):
    the tasks of its domain when the domain exists, else the closest names, else the domains."""
    text = str(task)
    domain = text.split("-", 1)[0]
    domains = sorted({name.split("-", 1)[0] for name in valid})
    close = difflib.get_close_matches(text, [*valid, *TASK_ALIASES], n=3, cutoff=0.6)
    head = f"task {task!r} is not a DMC task"
    if domain in domains:
        listed = ", ".join(n for n in valid if n.startswith(f"{domain}-"))
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{head} ({domain} tasks: {listed}){hint}"
    if close:
        names = " or ".join([", ".join(close[:-1]), close[-1]] if len(close) > 1 else close)
        return f"{head}; did you mean {names}?"
    return (
        f"{head}: names are domain-task with domain one of {', '.join(domains)} "
        f"(aliases: {', '.join(TASK_ALIASES)})"
    )


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
        high is not None and value > high
    ):  # fmt: skip
        accepted = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {accepted}, got {value!r}.")


def check_env_args(
    task, image_size=64, action_repeat=2, seed=0, render="faithful", num_envs=1, time_limit=None
) -> None:
    """:func:`make_dmc_env`'s checks of its arguments, without building anything: a
    one-sentence ValueError for the first bad one (the task last)."""
    _check_args(image_size, action_repeat, seed, render, num_envs, time_limit)
    _parse_task(task)  # fail here, not in a worker


def _check_args(image_size, action_repeat, seed, render, num_envs=1, time_limit=None) -> None:
    """Raise a one-sentence ValueError for the first bad argument."""
    _check_int("image_size", image_size, 8, 1024)
    _check_int("action_repeat", action_repeat, 1)
    _check_int("num_envs", num_envs, 1)
    _check_int("seed", seed, 0, 2**32 - 1)  # RandomState takes < 2**32
    if render not in RENDER_MODES:
        raise ValueError(f"render must be one of {', '.join(RENDER_MODES)}, got {render!r}.")
    if time_limit is not None and not (isinstance(time_limit, numbers.Real) and time_limit > 0):
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}.")


class DMCPixelEnv(DMControlWrapper):
    """One DMC task seen through a camera: uint8 pixels ``[3, H, W]``, actions ``[A]`` in [-1, 1].

    Each agent step repeats the action ``action_repeat`` times (fewer if the episode ends on the
    way), sums the rewards and renders one frame. Output of ``step`` under ``"next"``:
    ``pixels`` uint8 ``[3, H, W]``, ``reward`` float32 ``[1]``, ``done`` / ``terminated`` /
    ``truncated`` bool ``[1]``, ``frames`` int64 ``[1]`` (control steps simulated: the repeat,
    or fewer at an episode's end; 0 after a reset). DMC's time limit (1000 physics-control
    steps, i.e. 500 agent steps at action repeat 2) ends episodes as *truncated*; a task's own
    termination as *terminated*.

    Args:
        task: ``"domain-task"``, see :func:`available_tasks`; ``"cup-catch"`` is an alias.
        image_size: height = width of the frames.
        action_repeat: physics-control steps per agent step (torchrl's ``frame_skip``).
        seed: seeds the task's ``RandomState`` (initial states, targets).
        render: ``"faithful"`` (dm_control's pixels) or ``"fast"`` (no shadows or multisampling).
        time_limit: episode length in seconds; ``None`` keeps the task's (usually 1000 steps).
        device: where the output tensors go.
    """

    def __init__(
        self,
        task: str,
        *,
        image_size: int = 64,
        action_repeat: int = 2,
        seed: int = 0,
        render: str = "faithful",
        time_limit: float | None = None,
        device="cpu",
    ) -> None:
        _check_args(image_size, action_repeat, seed, render, time_limit=time_limit)
        domain, task_name = _parse_task(task)
        self.task_name = f"{domain}-{task_name}"
        super().__init__(
            domain=domain,
            task_name=task_name,
            image_size=image_size,
            seed=seed,
            render=render,
            time_limit=time_limit,
            frame_skip=action_repeat,
            device=device,
        )

    @property
    def action_repeat(self) -> int:
        """Physics-control steps per agent step."""
        return self.frame_skip

    def _check_kwargs(self, kwargs: dict) -> None:
        pass  # arguments were checked in __init__, with messages that name the accepted values

    def _build_env(self, domain, task_name, image_size, seed, render, time_limit):
        task_kwargs = {"random": seed}
        if time_limit is not None:
            task_kwargs["time_limit"] = time_limit
        env = _suite().load(domain, task_name, task_kwargs=task_kwargs)
        self.image_size = image_size
        self.camera_id = CAMERA_IDS.get(domain, 0)
        self.renderer = OffscreenRenderer(
            env.physics.model.ptr, image_size, self.camera_id, fast=render == "fast"
        )
        spec = env.action_spec()
        # Identity when the task's bounds already are [-1, 1]: keeps actions bit-exact.
        self._action_low = spec.minimum.astype(np.float64)
        self._action_half_range = (spec.maximum - spec.minimum).astype(np.float64) / 2.0
        self._rescale_actions = not (np.all(spec.minimum == -1) and np.all(spec.maximum == 1))
        return env

    def _make_specs(self, env) -> None:
        size, device = self.image_size, self.device
        num_actions = env.action_spec().shape[0]
        self.action_spec = Bounded(
            -1.0, 1.0, shape=(num_actions,), dtype=torch.float32, device=device
        )
        pixels = Bounded(0, 255, shape=(3, size, size), dtype=torch.uint8, device=device)
        frames = Unbounded(shape=(1,), dtype=torch.int64, device=device)
        self.observation_spec = Composite(
            {keys.PIXELS: pixels, keys.FRAMES: frames},
            device=device,
        )
        self.reward_spec = Unbounded(shape=(1,), dtype=torch.float32, device=device)
        flag = Categorical(2, shape=(1,), dtype=torch.bool, device=device)
        self.done_spec = Composite(
            {keys.DONE: flag.clone(), keys.TERMINATED: flag.clone(), keys.TRUNCATED: flag.clone()},
            device=device,
        )

    def _render(self) -> torch.Tensor:
        """The current frame as uint8 ``[3, H, W]``."""
        frame = self.renderer.render(self._env.physics.data.ptr)
        return torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1)))

    def _flags(self, terminated: bool, truncated: bool) -> dict[str, torch.Tensor]:
        return {
            keys.DONE: torch.tensor([terminated or truncated]),
            keys.TERMINATED: torch.tensor([terminated]),
            keys.TRUNCATED: torch.tensor([truncated]),
        }

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        self._env.reset()
        self.renderer.upload_hfields()  # quadruped-escape draws a new terrain every episode
        # No reward at reset: torchrl's rollout refuses a root-level reward.
        out = {
            keys.PIXELS: self._render(),
            keys.FRAMES: torch.zeros(1, dtype=torch.int64),
            **self._flags(False, False),
        }
        return TensorDict(out, batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = _checked_action(tensordict, self.action_spec.shape, self.task_name)
        action = action.detach().to("cpu", torch.float64).numpy()
        if self._rescale_actions:
            action = self._action_low + (action + 1.0) * self._action_half_range
        if self._env._reset_next_step:
            # Checked before stepping: dm_control would silently start the next episode, and the
            # reset() asked for would then skip one seeded episode.
            raise RuntimeError("step() was called after the episode ended; call reset() first.")
        reward, frames = 0.0, 0
        for _ in range(self.frame_skip):
            timestep = self._env.step(action)
            frames += 1
            reward += timestep.reward
            if timestep.last():
                break
        # dm_control ends episodes at the time limit with discount 1 (bootstrap: truncation) and
        # on task failure with discount 0 (termination).
        truncated = bool(timestep.last() and timestep.discount == 1.0)
        terminated = bool(timestep.last() and not truncated)
        out = {
            keys.PIXELS: self._render(),
            keys.REWARD: torch.tensor([reward], dtype=torch.float32),
            keys.FRAMES: torch.tensor([frames]),
            **self._flags(terminated, truncated),
        }
        return TensorDict(out, batch_size=self.batch_size, device=self.device)

    def get_env_state(self) -> dict:
        """Everything that determines the next steps' outputs; picklable (numpy / python scalars).

        Physics (``mjSTATE_INTEGRATION``: time, positions, velocities, actuator activations, solver
        warm start, controls, ...), the task's RandomState, the model fields tasks randomise per
        episode, and dm_control's step counter. Restore with :meth:`set_env_state`.
        """
        import mujoco

        physics = self._env.physics
        model = physics.model.ptr
        _, rng_keys, rng_pos, has_gauss, cached_gaussian = self._env.task.random.get_state()
        return {
            "task": self.task_name,
            "physics": physics.get_state(sig=mujoco.mjtState.mjSTATE_INTEGRATION).copy(),
            "model": {name: getattr(model, name).copy() for name in _TASK_MODEL_FIELDS},
            "random": {
                "keys": rng_keys.copy(),
                "pos": int(rng_pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            # dm_control.rl.control.Environment keeps its time limit in these private counters.
            "step_count": int(self._env._step_count),
            "reset_next_step": bool(self._env._reset_next_step),
        }

    def set_env_state(self, state: dict) -> None:
        """Restore a state from :meth:`get_env_state` of an env of the same task."""
        import mujoco

        if state.get("task") != self.task_name:
            raise ValueError(
                f"This state is from task {state.get('task')!r}, not {self.task_name!r}."
            )
        physics = self._env.physics
        model = physics.model.ptr
        for name, value in state["model"].items():
            np.copyto(getattr(model, name), value)
        physics.set_state(state["physics"], sig=mujoco.mjtState.mjSTATE_INTEGRATION)
        physics.forward()  # derived quantities (positions of bodies, sensors) used by rewards
        rng = state["random"]
        self._env.task.random.set_state(
            ("MT19937", rng["keys"], rng["pos"], rng["has_gauss"], rng["cached_gaussian"])
        )
        self._env._step_count = state["step_count"]
        self._env._reset_next_step = state["reset_next_step"]
        self.renderer.upload_hfields()

    def close(self, *, raise_if_closed: bool = True) -> None:
        self.renderer.close()
        super().close(raise_if_closed=raise_if_closed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(task={self.task_name}, image_size={self.image_size}, "
            f"action_repeat={self.action_repeat}, device={self.device})"
        )


def _make_worker_env(task: str, seed: int, parent_pid: int | None = None, **kwargs) -> DMCPixelEnv:
    """Module-level (hence picklable) constructor for ParallelEnv workers.

    A worker ignores SIGINT and SIGTERM: Ctrl-C in a terminal signals the whole process group,
    and so do schedulers (Slurm's scancel and time limit, systemd) with SIGTERM; the training
    process, which stops cleanly on either, saves, then closes the workers, needs them alive
    until then (a worker killed by the signal made the next step fail before the checkpoint).
    torchrl also calls this in the process that builds the ParallelEnv (``parent_pid``), to read
    the specs: that process keeps its handlers, even when it is itself a child process (a
    sweep launcher's)."""
    if parent_pid is not None and os.getpid() != parent_pid:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    return DMCPixelEnv(task, seed=seed, **kwargs)


def _reap(workers) -> None:
    """SIGKILL and join the workers still alive (they ignore SIGTERM: see _make_worker_env)."""
    alive = []
    for process in workers:
        try:
            if process.is_alive():
                process.kill()
                alive.append(process)
        except (ValueError, AssertionError):  # closed by torchrl; or not our child (a fork)
            pass
    for process in alive:
        process.join(timeout=10)


def _exit_code(process) -> int | None:
    """A worker's exit code; None while it runs or once torchrl has closed its handle."""
    try:
        return process.exitcode
    except ValueError:
        return None


def _checked_action(tensordict: TensorDictBase, shape: torch.Size, what: str) -> torch.Tensor:
    """``tensordict``'s action, refused in one sentence unless it has the spec's ``shape``:
    dm_control broadcasts it into the actuators (a cartpole agent's 1-d action drove all six of
    walker's), and so does a parallel env's copy into its shared ``[N, A]`` buffer."""
    action = tensordict.get(keys.ACTION, None)
    if action is None or action.shape != shape:
        got = (
            f"no {keys.ACTION!r} entry"
            if action is None
            else f"shape {list(action.shape)} (an agent trained on another task?)"
        )
        raise ValueError(
            f"{what} takes actions of shape {list(shape)} under {keys.ACTION!r}, got {got}"
        )
    return action


class DMCParallelEnv(ParallelEnv):
    """torchrl's ParallelEnv whose workers never outlive it.

    Our workers ignore SIGTERM (:func:`_make_worker_env`). When one of them dies, torchrl's
    check before every call SIGTERMs the others and then fails to close the first one still
    running (``ValueError: Cannot close a process while it is still running``), leaving them
    waiting for commands for hours — and the interpreter's exit waiting for them. Here a call
    that finds a dead worker kills the others and says which one exited; ``close`` does the
    same and warns instead of raising a second error (in a ``finally`` it would replace the
    first). Workers of an env that is never closed are killed at exit.
    """

    def _start_workers(self) -> None:
        threads = torch.get_num_threads()  # torchrl lowers it for the workers' start
        try:
            super()._start_workers()
        except (EOFError, ConnectionError) as exc:  # a worker died before its first message
            codes = ", ".join(map(str, self.__dict__.pop("_start_exit_codes", ()))) or "unknown"
            raise RuntimeError(
                f"a parallel env worker exited while starting (exit code {codes}); its own "
                "error, if it raised one, is printed above"
            ) from exc
        except BaseException:  # a KeyboardInterrupt while waiting for the workers: none left
            _reap(list(self.__dict__.get("_workers") or ()))
            for channel in self.__dict__.get("parent_channels") or ():
                channel.close()
            self._workers, self.parent_channels, self.is_closed = [], [], True
            torch.set_num_threads(threads)  # what torchrl's own cleanup does on an Exception
            raise
        self._reaper = weakref.finalize(self, _reap, list(self._workers))

    def _cleanup_failed_worker_startup(self) -> None:
        # torchrl forgets its workers here (after joining them); the error names their codes.
        workers = list(self._workers)
        super()._cleanup_failed_worker_startup()
        _reap(workers)  # ours ignore the SIGTERM torchrl's cleanup ends with
        self._start_exit_codes = [code for code in map(_exit_code, workers) if code is not None]

    @property
    def _owns(self) -> bool:
        """False for torchrl's indexed views (``env[i]``): they share the parent's workers."""
        return getattr(self, "_owns_workers", True)

    def _dead_workers(self) -> dict[int, int]:
        """``{index: exit code}`` of the workers that have exited; the others are killed, unless
        this is a view (the parent env owns them, and its own calls or close kill them)."""
        workers = [] if self.is_closed else list(self.__dict__.get("_workers") or ())
        dead = {i: code for i, code in enumerate(map(_exit_code, workers)) if code is not None}
        if dead and self._owns:
            _reap(workers)
        return dead

    def _check_workers(self) -> None:
        dead = self._dead_workers()
        if dead:
            which = ", ".join(f"{i} (exit code {code})" for i, code in dead.items())
            raise RuntimeError(
                f"parallel env worker {which} exited, so the env cannot go on (the other "
                "workers were stopped); its own error, if it raised one, is printed above."
            )

    # The calls torchrl checks its workers in (its check is what fails on ours): ours first.
    def _reset(self, tensordict=None, **kwargs):
        self._check_workers()
        return super()._reset(tensordict, **kwargs)

    def _step(self, tensordict):
        self._check_workers()
        _checked_action(tensordict, self.action_spec.shape, self._what)
        return super()._step(tensordict)

    def step_and_maybe_reset(self, tensordict):
        self._check_workers()
        _checked_action(tensordict, self.action_spec.shape, self._what)
        return super().step_and_maybe_reset(tensordict)

    @property
    def _what(self) -> str:
        # Not getattr: torchrl's ParallelEnv answers missing attributes from its workers.
        return f"{self.__dict__.get('task_name', 'this env')} with {self.num_workers} envs"

    def set_seed(self, *args, **kwargs):
        self._check_workers()
        return super().set_seed(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        self._check_workers()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._check_workers()
        return super().load_state_dict(*args, **kwargs)

    def close(self, *, raise_if_closed: bool = True) -> None:
        if not self._owns:  # a view: closing it must leave the parent's workers alone
            return super().close(raise_if_closed=raise_if_closed)
        if self.is_closed and not self.__dict__.get("_workers"):
            return  # never started, or its start failed (which said why): nothing to close
        workers = list(self.__dict__.get("_workers") or ())
        dead = self._dead_workers()
        try:
            super().close(raise_if_closed=raise_if_closed)
        except (RuntimeError, ValueError):
            if not dead:  # a failure of its own
                raise
            self.is_closed = True  # torchrl's check refused the dead worker; all are ended
        finally:
            _reap(workers)  # normally none left
        if dead:
            codes = ", ".join(map(str, dead.values()))
            warnings.warn(
                f"a parallel env worker had exited (exit code {codes}); the others were killed",
                RuntimeWarning,
                stacklevel=2,
            )


def make_dmc_env(
    task: str,
    *,
    image_size: int = 64,
    action_repeat: int = 2,
    seed: int = 0,
    render: str = "faithful",
    num_envs: int = 1,
    time_limit: float | None = None,
    device="cpu",
    mp_start_method: str = "spawn",
) -> EnvBase:
    """A DMC pixel env (see :class:`DMCPixelEnv`); with ``num_envs > 1`` a torchrl ParallelEnv.

    Shapes: pixels ``[3, H, W]`` (``[num_envs, 3, H, W]`` when parallel), actions ``[A]``
    (``[num_envs, A]``). Worker ``i`` is seeded with ``stream_seed(seed, "env_worker", i)``
    (:mod:`aefrl.seeding`: runs with nearby seeds share no worker's episodes, as ``seed + i``
    would) and builds its env, and its GL context, in its own process.

    Args:
        task, image_size, action_repeat, seed, render, time_limit, device: see DMCPixelEnv.
        num_envs: number of environments; more than one runs each in a worker process. The
            workers ignore SIGINT and SIGTERM once built; while they re-run the main script's
            imports (spawn: seconds), they do so if that script's first lines call
            ``aefrl.interrupts.quiet_ctrl_c_while_starting(__name__)``, as the scripts in
            ``scripts/`` do; otherwise a Ctrl-C to the process group then can stop a worker.
        mp_start_method: how workers start. ``"spawn"`` (default) is safe even when this process
            already holds a GL context; ``"fork"`` starts faster but hangs in that case (Mesa EGL).
    """
    check_env_args(task, image_size, action_repeat, seed, render, num_envs, time_limit)
    kwargs = dict(
        image_size=image_size,
        action_repeat=action_repeat,
        render=render,
        time_limit=time_limit,
        device=device,
    )
    if num_envs == 1:
        return DMCPixelEnv(task, seed=seed, **kwargs)
    select_gl_backend()  # probe once here (and fail here); workers inherit os.environ
    makers = [
        functools.partial(
            _make_worker_env, task, stream_seed(seed, "env_worker", i), os.getpid(), **kwargs
        )
        for i in range(num_envs)
    ]
    env = DMCParallelEnv(num_envs, makers, mp_start_method=mp_start_method, device=device)
    env.task_name = task  # for its messages (the workers' envs have their own)
    return env
