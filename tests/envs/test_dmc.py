"""DMC pixel env: specs, pixels, action repeat, rendering, seeding, exact resume, workers."""

import os
import pickle
import signal
import time

import mujoco
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.envs import ParallelEnv
from torchrl.envs.utils import check_env_specs

from aefrl.envs import DMCPixelEnv, available_tasks, gl, make_dmc_env
from aefrl.envs.dmc import _exit_code
from aefrl.seeding import stream_seed


def _suite():
    from dm_control import suite  # imported after aefrl.envs chose MUJOCO_GL

    return suite


def _step(env, action: torch.Tensor) -> TensorDict:
    return env.step(TensorDict({"action": action}, batch_size=[]))["next"]


def _actions(env, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(env.action_spec.shape, generator=g) * 2 - 1 for _ in range(n)]


def test_specs_pass_check_env_specs():
    env = make_dmc_env("walker-walk", render="fast")
    check_env_specs(env)
    assert env.action_spec.shape == (6,) and env.action_spec.dtype == torch.float32
    assert (env.action_spec.space.low == -1).all() and (env.action_spec.space.high == 1).all()
    # pixels only, no proprio state; and the env's frame counter
    assert set(env.observation_spec.keys()) == {"pixels", "frames"}


@pytest.mark.parametrize("image_size", [64, 32])
def test_pixels_are_uint8_channels_first(image_size):
    env = make_dmc_env("cartpole-swingup", image_size=image_size, render="fast")
    first = env.reset()
    nxt = _step(env, _actions(env, 1)[0])
    for pixels in (first["pixels"], nxt["pixels"]):
        assert pixels.shape == (3, image_size, image_size) and pixels.dtype == torch.uint8
        assert pixels.float().std() > 0  # an actual picture, not a blank buffer
    assert nxt["reward"].shape == (1,) and nxt["reward"].dtype == torch.float32
    for key in ("done", "terminated", "truncated"):
        assert nxt[key].shape == (1,) and nxt[key].dtype == torch.bool


def test_frames_count_the_substeps_an_episode_end_cuts_short():
    """cartpole's 0.01 s control step: a 0.25 s limit is 25 steps, so at repeat 2 the 13th
    agent step simulates one; the loop's frame counter adds these, not steps x repeat."""
    env = make_dmc_env("cartpole-swingup", action_repeat=2, time_limit=0.25, render="fast")
    assert env.reset()["frames"].item() == 0
    frames = []
    for action in _actions(env, 13):
        nxt = _step(env, action)
        frames.append(nxt["frames"].item())
    assert frames == [2] * 12 + [1] and nxt["truncated"].item()


def test_reward_is_the_sum_over_repeated_substeps():
    env = make_dmc_env("walker-walk", action_repeat=3, seed=5, render="fast")
    raw = _suite().load("walker", "walk", task_kwargs={"random": 5})
    env.reset()
    raw.reset()
    for action in _actions(env, 15):
        expected = sum(raw.step(action.double().numpy()).reward for _ in range(3))
        assert _step(env, action)["reward"].item() == np.float32(expected)


def test_renders_once_per_agent_step(monkeypatch):
    calls = []
    original = mujoco.mjr_render
    monkeypatch.setattr(mujoco, "mjr_render", lambda *a: (calls.append(1), original(*a)))
    env = make_dmc_env("cartpole-swingup", action_repeat=4, render="fast")
    env.rollout(10)
    assert len(calls) == 1 + 10  # the reset frame, then one frame per agent step


def test_faithful_render_matches_dm_control():
    """Same pixels as dm_control's physics.render(64, 64, camera_id=0), with the two interleaved."""
    env = make_dmc_env("walker-walk", seed=2)  # render="faithful"
    raw = _suite().load("walker", "walk", task_kwargs={"random": 2})
    frames = [env.reset()["pixels"]]
    raw.reset()
    references = [raw.physics.render(64, 64, camera_id=0)]
    for action in _actions(env, 2):
        frames.append(_step(env, action)["pixels"])
        for _ in range(2):
            raw.step(action.double().numpy())
        references.append(raw.physics.render(64, 64, camera_id=0))
    ours = torch.stack(frames).permute(0, 2, 3, 1).numpy().astype(np.int16)
    diff = np.abs(ours - np.stack(references).astype(np.int16))
    assert diff.mean() < 0.2, diff.mean()  # measured: ~0.05 / 255 (shadow map 256 vs 2048)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        # a known domain: its tasks, and the closest (the whole list was ~930 characters)
        (
            "walker-fly",
            "task 'walker-fly' is not a DMC task (walker tasks: walker-run, walker-stand, "
            "walker-walk); did you mean walker-walk?",
        ),
        ("cheetah-walk", "(cheetah tasks: cheetah-run); did you mean cheetah-run?"),
        # an unknown domain: the closest names
        ("walkr-walk", "did you mean walker-walk, walker-stand or walker-run?"),
        ("cup-catc", "did you mean cup-catch or ball_in_cup-catch?"),
        # nothing close: the domains
        ("foo", "names are domain-task with domain one of acrobot, ball_in_cup, cartpole,"),
    ],
)
def test_unknown_task_suggests_the_closest_names(task, message):
    with pytest.raises(ValueError) as info:
        make_dmc_env(task)
    text = str(info.value)
    assert message in text and text.startswith(f"task {task!r} is not a DMC task")
    assert len(text) < 300 and "\n" not in text
    assert "walker-walk" in available_tasks()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 0}, "image_size must be an integer between 8 and 1024"),
        ({"image_size": 64.0}, "image_size must be an integer"),
        ({"action_repeat": 0}, "action_repeat must be an integer >= 1"),
        ({"render": "pretty"}, "render must be one of faithful, fast"),
        ({"num_envs": 0}, "num_envs must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer"),
        ({"time_limit": -2.0}, "time_limit must be a positive number"),
    ],
)
def test_bad_arguments_say_what_is_accepted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_dmc_env("walker-walk", **kwargs)


def test_cup_catch_alias():
    env = make_dmc_env("cup-catch", render="fast")
    assert env.task_name == "ball_in_cup-catch" and env.action_spec.shape == (2,)


def test_quadruped_camera_and_action_bounds():
    env = make_dmc_env("quadruped-walk", image_size=16, render="fast")
    assert env.camera_id == 2  # as in Dreamer
    low, high = env._env.action_spec().minimum, env._env.action_spec().maximum
    assert not (low == -1).all()  # the one suite domain whose bounds are not [-1, 1]
    env.reset()
    env.reset()  # the second reset re-uploads the height field to the now open GL context
    for action, expected in ((1.0, high), (-1.0, low)):
        _step(env, torch.full((12,), action))
        np.testing.assert_allclose(env._env.physics.data.ctrl, expected, atol=1e-12)


def test_same_seed_same_episode():
    outs = []
    for seed in (3, 3, 4):
        env = make_dmc_env("cartpole-swingup", seed=seed, render="fast")
        frames = [env.reset()["pixels"]]
        rewards = []
        for action in _actions(env, 5):
            out = _step(env, action)
            frames.append(out["pixels"])
            rewards.append(out["reward"])
        outs.append((torch.stack(frames), torch.stack(rewards)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])


@pytest.mark.parametrize(
    "task",
    # reacher and finger place sites, manipulator and stacker bodies, point_mass and swimmer
    # geoms or sites at each reset: each needs its own model field restored
    [
        "walker-walk",
        "reacher-easy",
        "manipulator-bring_ball",
        "stacker-stack_2",
        "finger-turn_easy",
        "point_mass-easy",
        "swimmer-swimmer6",
    ],
)
def test_get_set_env_state_resumes_exactly(task):
    # 0.5 s = 20 control steps = 10 agent steps: the resumed part also crosses the time limit.
    a = make_dmc_env(task, seed=0, render="fast", time_limit=0.5 if task == "walker-walk" else None)
    b = make_dmc_env(task, seed=1, render="fast", time_limit=0.5 if task == "walker-walk" else None)
    a.reset()
    b.reset()
    actions = _actions(a, 10)
    for action in actions[:6]:
        _step(a, action)
    state = pickle.loads(pickle.dumps(a.get_env_state()))
    continued = [_step(a, action) for action in actions[6:]]
    b.set_env_state(state)
    resumed = [_step(b, action) for action in actions[6:]]
    for x, y in zip(continued, resumed):
        assert (x == y).all(), (x, y)
    if task == "walker-walk":
        assert resumed[-1]["truncated"].item() and not resumed[-2]["done"].item()
    with pytest.raises(ValueError, match="not 'cartpole-swingup'"):
        make_dmc_env("cartpole-swingup", render="fast").set_env_state(state)


def test_time_limit_truncates_and_stops_the_repeat():
    # 1 s at walker's 0.025 s control step = 40 control steps; at action repeat 3 the 14th agent
    # step has only one sub-step left in the episode.
    env = make_dmc_env("walker-walk", action_repeat=3, seed=1, render="fast", time_limit=1.0)
    raw = _suite().load("walker", "walk", task_kwargs={"random": 1, "time_limit": 1.0})
    env.reset()
    raw.reset()
    for t, action in enumerate(_actions(env, 14)):
        out = _step(env, action)
        substeps = [raw.step(action.double().numpy()) for _ in range(1 if t == 13 else 3)]
        assert out["reward"].item() == np.float32(sum(s.reward for s in substeps))
        assert out["done"].item() == (t == 13)
    assert substeps[-1].last() and substeps[-1].discount == 1.0
    assert out["truncated"].item() and not out["terminated"].item()
    with pytest.raises(RuntimeError, match="call reset"):
        _step(env, action)
    # The refused step left the env alone: the reset asked for starts the next seeded episode
    # (dm_control would have started one inside the step, and this reset a second).
    raw.reset()
    after = env.reset()
    torch.testing.assert_close(
        torch.as_tensor(env._env.physics.get_state()), torch.as_tensor(raw.physics.get_state())
    )
    assert not after["done"].item()


def test_default_episode_is_500_agent_steps():
    env = DMCPixelEnv("cartpole-swingup", render="fast", image_size=8)
    out = env.rollout(600)  # stops at the first done
    assert out.shape == (500,)  # DMC's 1000 control steps at action repeat 2
    assert out["next", "truncated"][-1].item() and not out["next", "terminated"].any()


def test_parallel_env_two_workers():
    env = make_dmc_env("cartpole-swingup", num_envs=2, seed=3, render="fast")
    try:
        assert isinstance(env, ParallelEnv)
        first = env.reset()["pixels"]
        assert first.shape == (2, 3, 64, 64)
        # Worker i is seeded with stream_seed(seed, "env_worker", i), not seed + i.
        worker1 = stream_seed(3, "env_worker", 1)
        single = make_dmc_env("cartpole-swingup", seed=worker1, render="fast").reset()["pixels"]
        next_seed = make_dmc_env("cartpole-swingup", seed=4, render="fast").reset()["pixels"]
        assert torch.equal(first[1], single) and not torch.equal(first[0], first[1])
        assert not torch.equal(first[1], next_seed)
        check_env_specs(env)
        out = env.rollout(3)
        assert out["next", "pixels"].shape == (2, 3, 3, 64, 64)
        assert out["next", "reward"].shape == (2, 3, 1)
    finally:
        env.close()


def test_a_parallel_env_refuses_an_action_of_another_size_too():
    """The parent's copy into its shared [2, 6] buffer broadcast a cartpole agent's [2, 1]
    actions to all six of walker's actuators, before any worker's own check could see them."""
    env = make_dmc_env("walker-walk", num_envs=2, image_size=16, render="fast")
    try:
        td = env.reset()
        refused = r"walker-walk with 2 envs takes actions of shape \[2, 6\] .*got shape \[2, 1\]"
        for step in (env.step, env.step_and_maybe_reset):
            with pytest.raises(ValueError, match=refused):
                step(td.clone().set("action", torch.zeros(2, 1)))
        assert env.step(td.set("action", torch.zeros(2, 6)))["next", "pixels"].shape[0] == 2
    finally:
        env.close()
    # One built without make_dmc_env has no task name: torchrl's ParallelEnv answers a missing
    # attribute from its workers (a dispatcher object in the message, or starting them).
    import functools

    from aefrl.envs.dmc import DMCParallelEnv

    make = functools.partial(DMCPixelEnv, "walker-walk", image_size=16, render="fast")
    bare = DMCParallelEnv(2, [make, make], mp_start_method="spawn")
    assert bare._what == "this env with 2 envs" and bare.is_closed  # nothing started
    bare.close()


def test_gl_backend_respects_user_choice(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setattr(gl, "_probe", lambda backend: pytest.fail("probed"))
    assert gl.select_gl_backend() == "osmesa"


def test_gl_backend_error_says_what_to_install(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "")  # empty counts as unset; monkeypatch restores it
    monkeypatch.setattr(gl, "_probe", lambda backend: False)
    assert gl.select_gl_backend(strict=False) is None
    with pytest.raises(RuntimeError, match=r"install an EGL driver .* or OSMesa"):
        gl.select_gl_backend()


def test_gl_backend_probe_picks_first_that_works(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "")
    monkeypatch.setattr(gl, "_probe", lambda backend: backend == "osmesa")
    assert gl.select_gl_backend() == "osmesa"
    assert os.environ["MUJOCO_GL"] == "osmesa"  # cached for worker processes


def _worker_sigint(queue, parent_pid):
    from aefrl.envs.dmc import _make_worker_env

    # As a process started from a terminal: the test's own may run with Ctrl-C ignored (a
    # background job), which a spawned child inherits.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parent_pid = os.getpid() if parent_pid is None else parent_pid
    env = _make_worker_env("cartpole-swingup", 0, parent_pid, image_size=16, render="fast")
    queue.put([signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)])
    env.close()


def test_parallel_env_workers_ignore_ctrl_c_and_the_process_building_them_does_not():
    """Ctrl-C in a terminal (SIGINT) and schedulers (SIGTERM) signal the process group: workers
    must outlive it so that the training process can stop cleanly and save; building an env in
    the process that owns the workers changes nothing there, even when that process is itself a
    child (a sweep launcher's: torchrl builds one env in it to read the specs)."""
    import multiprocessing

    from aefrl.envs.dmc import _make_worker_env

    ctx = multiprocessing.get_context("spawn")
    for parent_pid, ignored in ((os.getpid(), [True, True]), (None, [False, False])):
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker_sigint, args=(queue, parent_pid))
        proc.start()
        assert queue.get(timeout=120) == ignored
        proc.join(timeout=60)
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    _make_worker_env("cartpole-swingup", 0, os.getpid(), image_size=16, render="fast").close()
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before


def test_a_dead_worker_does_not_keep_the_others_alive():
    """torchrl's close meets a dead worker, SIGTERMs the others (which ignore it) and failed on
    the first still running, leaving it to wait for commands for hours (and the interpreter's
    exit with it). close now kills the rest, and warns instead of raising a second error."""
    env = make_dmc_env("cartpole-swingup", num_envs=2, seed=0, render="fast", image_size=16)
    env.reset()
    workers = list(env._workers)
    env[1].close()  # a view shares the parent's workers: closing it leaves them running
    assert all(p.is_alive() for p in workers)
    env.rand_step()
    os.kill(workers[0].pid, signal.SIGKILL)
    workers[0].join(timeout=30)
    with pytest.raises(RuntimeError, match=r"worker 0 \(exit code -9\) exited"):
        env.step(env.rand_action())
    assert not workers[1].is_alive()  # stopped with it, not left waiting
    with pytest.raises(RuntimeError, match="exited, so the env cannot go on"):
        env.set_seed(1)  # torchrl's own check failed here on the worker it could not stop
    with pytest.warns(RuntimeWarning, match="worker had exited"):
        env.close()
    assert env.is_closed
    assert [_exit_code(process) for process in workers] == [-9, -9]  # none left running


def _slow_in_a_worker(parent_pid: int, **kwargs):
    """An env constructor whose workers take a minute to start (the parent gets its env)."""
    if os.getpid() != parent_pid:
        import time

        time.sleep(60)
    return DMCPixelEnv("cartpole-swingup", **kwargs)


def test_ctrl_c_while_the_workers_start_stops_them_and_leaves_nothing_running():
    """The process waiting for its workers stays interruptible; what it started is killed (the
    workers ignore SIGINT and SIGTERM, and would otherwise keep the interpreter's exit
    waiting), and closing the env afterwards is quiet."""
    import functools
    import multiprocessing
    import threading

    from aefrl.envs.dmc import DMCParallelEnv

    make = functools.partial(_slow_in_a_worker, os.getpid(), image_size=16, render="fast")
    env = DMCParallelEnv(2, [make, make], mp_start_method="spawn")
    main = threading.main_thread().ident
    timer = threading.Timer(3.0, signal.pthread_kill, (main, signal.SIGINT))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threads = torch.get_num_threads()
    started = time.monotonic()
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            env.reset()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 30  # not after the workers' minute
    assert env.is_closed and env._workers == []
    assert not multiprocessing.active_children()  # both killed and joined
    assert torch.get_num_threads() == threads  # torchrl lowered it for the start
    env.close()  # quiet


def _dies_in_a_worker(parent_pid: int, **kwargs):
    """An env constructor whose workers exit at once (the spec-reading parent gets its env)."""
    if os.getpid() != parent_pid:
        os._exit(7)
    return DMCPixelEnv("cartpole-swingup", **kwargs)


def test_a_worker_that_dies_while_starting_is_one_error_and_close_is_quiet():
    """The start failed with torchrl's EOFError, and the training script's close in its
    finally then raised "trying to close a closed environment" over it."""
    import functools

    from aefrl.envs.dmc import DMCParallelEnv

    make = functools.partial(_dies_in_a_worker, os.getpid(), image_size=16, render="fast")
    env = DMCParallelEnv(2, [make, make], mp_start_method="spawn")
    with pytest.raises(RuntimeError, match=r"worker exited while starting \(exit code 7"):
        env.reset()
    env.close()  # nothing to close, and no second error
    assert env.is_closed


_UNCLOSED = """
from aefrl.envs.dmc import make_dmc_env
env = make_dmc_env("cartpole-swingup", num_envs=2, seed=0, render="fast", image_size=16)
env.reset()
print("started", flush=True)
raise SystemExit(3)  # no close, as after an uncaught error
"""


def test_an_unclosed_parallel_env_does_not_block_the_exit():
    """Workers ignore SIGTERM and are not daemons: without a close, the interpreter's exit
    waited on them for hours; they are now killed at exit."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _UNCLOSED], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 3 and "started" in out.stdout, out.stderr[-2000:]


def test_an_action_of_another_size_is_refused_not_broadcast():
    """dm_control broadcasts the action into the actuators: a cartpole agent's 1-d action drove
    all 6 of walker's, and its run went on without a word."""
    env = make_dmc_env("walker-walk", image_size=16, render="fast")
    env.reset()
    before = env._env.physics.data.time
    for action, got in ((torch.zeros(1), "got shape \\[1\\]"), (torch.zeros(2, 6), "\\[2, 6\\]")):
        with pytest.raises(ValueError, match=f"walker-walk takes actions of shape \\[6\\].*{got}"):
            _step(env, action)
    with pytest.raises(ValueError, match="got no 'action' entry"):
        env.step(TensorDict({}, batch_size=[]))
    assert env._env.physics.data.time == before  # nothing was simulated
    assert _step(env, torch.zeros(6))["pixels"].shape == (3, 16, 16)
