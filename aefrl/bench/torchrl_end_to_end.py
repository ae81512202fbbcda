"""torchrl's Dreamer end to end: its env pipeline, collector, replay buffer and acting policy
around the peer's update, timed as :mod:`aefrl.bench.end_to_end` times ours.

Assembled as pytorch/rl's ``sota-implementations/dreamer`` does (``dreamer_utils.py``:
``_make_env`` + ``transform_env``, ``make_collector``, ``make_replay_buffer``,
``_dreamer_make_actor_real`` with its Gaussian exploration noise; ``dreamer.py``: collect a
batch, extend the buffer, then train), from the blocks of the installed torchrl:

* env: dm_control's task in ``DMControlWrapper`` (pixels only) with ``TensorDictPrimer``
  (``state`` / ``belief``), ``RenameTransform`` + ``ToTensorImage`` (uint8 ``pixels_int``, float
  ``pixels``), ``DoubleToFloat``, ``RewardSum``, ``FrameSkipTransform`` (action repeat, a render
  per sub-step) and ``StepCounter``. One difference, in torchrl's favour: the task renders
  64 x 64 directly (``render_kwargs``), where torchrl's script renders dm_control's 240 x 320
  and resizes with torchvision's ``Resize`` (not installed here) after every step and again at
  every sample.
* policy: ``ObsEncoder`` -> ``RSSMPosterior`` -> ``DreamerActor`` -> ``RSSMPrior`` (the next
  belief, from the action before the noise, as torchrl's script has it), then
  ``AdditiveGaussianModule`` (σ 0.3, torchrl's ``exploration_noise``). The actor's head defaults
  to its mode, but the collector sets torchrl's RANDOM exploration type, so it samples, as in
  torchrl's script.
* ``Collector`` (torchrl's ``SyncDataCollector``) with ``init_random_frames`` as the prefill;
  ``TensorDictReplayBuffer`` over ``LazyMemmapStorage`` with a ``SliceSampler`` (windows of
  ``seq`` steps within a trajectory, cached trajectory bounds; ``strict_length=True`` where
  torchrl's script has False, whose short windows after an episode start make a sample its
  ``reshape`` then refuses: the loop crashed once a run passed an episode's end) that
  stores ``pixels_int`` only and converts at sample time, with 3 batches prefetched in a
  thread, as torchrl's script builds it (without its ``compile=True`` sampler: compiling on the
  CPU takes minutes).
* updates: :meth:`TorchrlDreamer.full_update_sampled <aefrl.bench.torchrl_peer.TorchrlDreamer>`
  on each ``[B, T]`` sample, ``train_ratio / (B·T)`` per agent step (a fractional credit, as our
  loop keeps it), after every collected batch of ``frames_per_batch`` agent steps.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace

import torch

from aefrl.bench.subjects import Sizes
from aefrl.bench.timing import sync
from aefrl.bench.torchrl_peer import TorchrlDreamer, actor_head

#: torchrl's Dreamer exploration noise (its ``networks.exploration_noise``).
EXPLORATION_STD = 0.3


def torchrl_env(task: str, sizes: Sizes, action_repeat: int, seed: int):
    """The pixel env of torchrl's Dreamer script for ``task`` (``domain-task``), rendering
    ``sizes.image`` square frames; see the module docstring."""
    from aefrl.envs.gl import select_gl_backend

    select_gl_backend()  # dm_control reads MUJOCO_GL when it is imported
    from dm_control import suite
    from torchrl.data import Unbounded
    from torchrl.envs import (
        DMControlWrapper,
        DoubleToFloat,
        FrameSkipTransform,
        RenameTransform,
        RewardSum,
        StepCounter,
        TensorDictPrimer,
        ToTensorImage,
        TransformedEnv,
    )

    domain, name = task.split("-", 1)
    side = sizes.image
    env = TransformedEnv(
        DMControlWrapper(
            suite.load(domain, name.replace("-", "_"), task_kwargs={"random": seed}),
            from_pixels=True,
            pixels_only=True,
            render_kwargs={"height": side, "width": side},
        )
    )
    primers = {"state": Unbounded((sizes.latent,)), "belief": Unbounded((sizes.deter,))}
    env.append_transform(TensorDictPrimer(random=False, default_value=0, **primers))
    env.append_transform(RenameTransform(in_keys=["pixels"], out_keys=["pixels_int"]))
    env.append_transform(ToTensorImage(from_int=True, in_keys=["pixels_int"], out_keys=["pixels"]))
    env.append_transform(DoubleToFloat())
    env.append_transform(RewardSum())
    env.append_transform(FrameSkipTransform(action_repeat))
    env.append_transform(StepCounter())
    return env


def torchrl_policy(peer: TorchrlDreamer, action_spec):
    """``_dreamer_make_actor_real`` over the peer's networks, with its exploration noise."""
    from tensordict.nn import InteractionType, TensorDictSequential
    from torchrl.modules import AdditiveGaussianModule, SafeModule, SafeSequential

    real = SafeSequential(
        SafeModule(peer.encoder, in_keys=["pixels"], out_keys=["encoded_latents"]),
        SafeModule(
            peer.rssm_posterior, in_keys=["belief", "encoded_latents"], out_keys=["_", "_", "state"]
        ),
        actor_head(peer.actor_module, action_spec, InteractionType.DETERMINISTIC),
        SafeModule(
            peer.rssm_prior,
            in_keys=["state", "belief", "action"],
            out_keys=["_", "_", "_", ("next", "belief")],
        ),
    )
    noise = AdditiveGaussianModule(
        spec=action_spec,
        sigma_init=1.0,
        sigma_end=1.0,
        annealing_num_steps=1,
        mean=0.0,
        std=EXPLORATION_STD,
    )
    return TensorDictSequential(real, noise)


def torchrl_replay(capacity: int, seq: int, batch: int, scratch_dir: str):
    """``make_replay_buffer`` of torchrl's script (pixels stored as uint8, converted at sample
    time; ``batch`` windows of ``seq`` steps per sample, flat ``[batch·seq]``)."""
    from torchrl.data import LazyMemmapStorage, SliceSampler, TensorDictReplayBuffer
    from torchrl.envs import Compose, ExcludeTransform, ToTensorImage

    pixels = ["pixels", ("next", "pixels")]
    return TensorDictReplayBuffer(
        storage=LazyMemmapStorage(capacity, scratch_dir=scratch_dir, device="cpu"),
        sampler=SliceSampler(
            slice_len=seq,
            strict_length=True,
            traj_key=("collector", "traj_ids"),
            cache_values=True,
        ),
        transform=Compose(
            ExcludeTransform(*pixels, inverse=True),  # only pixels_int is stored
            ToTensorImage(in_keys=["pixels_int", ("next", "pixels_int")], out_keys=pixels),
        ),
        batch_size=batch * seq,
        prefetch=3,
    )


def torchrl_agent_steps_per_second(
    sizes: Sizes,
    *,
    task: str = "walker-walk",
    train_ratio: float = 512.0,
    prefill: int = 64,
    steps: int = 8,
    action_repeat: int = 2,
    frames_per_batch: int = 8,
    device="cpu",
    seed: int = 0,
) -> dict:
    """Run torchrl's Dreamer (a fresh :class:`TorchrlDreamer` at ``sizes``) for ``prefill``
    random agent steps and then until ``steps`` more have been collected after the first batch
    that trained; time those. Batches of ``sizes.batch`` windows of ``sizes.seq`` steps.
    Returns the keys of :func:`aefrl.bench.end_to_end.agent_steps_per_second` that apply."""
    from torchrl.collectors import Collector

    if prefill < sizes.seq:
        raise ValueError(f"prefill ({prefill}) must be at least seq ({sizes.seq})")
    device = torch.device(device)
    env = torchrl_env(task, sizes, action_repeat, seed)
    peer = TorchrlDreamer(replace(sizes, action_dim=int(env.action_spec.shape[-1])), device)
    policy = torchrl_policy(peer, env.action_spec.to(device))
    collector = Collector(
        env,
        policy,
        frames_per_batch=frames_per_batch,
        total_frames=-1,
        init_random_frames=prefill,
        policy_device=device,
        env_device="cpu",
        storing_device="cpu",
        # torchrl's Dreamer env has no InitTracker (its script adds none); keep it so
        auto_register_policy_transforms=False,
    )
    collector.set_seed(seed)
    per_step = train_ratio / (sizes.batch * sizes.seq)
    credit, collected, updates = 0.0, 0, 0
    start = end = None
    at_start = {"steps": 0, "updates": 0}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        capacity = 4 * (prefill + steps) + frames_per_batch
        replay = torchrl_replay(capacity, sizes.seq, sizes.batch, scratch)
        try:
            for data in collector:
                replay.extend(data)
                collected += data.numel()
                if collected < prefill:  # torchrl's script trains from init_random_frames on
                    continue
                credit += per_step * data.numel()
                while credit >= 1:
                    sample = replay.sample().reshape(sizes.batch, sizes.seq).to(device)
                    peer.full_update_sampled(sample)
                    updates, credit = updates + 1, credit - 1
                if start is None and updates:  # the first batch that trained stays untimed
                    sync(device)
                    start = time.perf_counter()
                    at_start.update(steps=collected, updates=updates)
                elif start is not None and collected >= at_start["steps"] + steps:
                    sync(device)
                    end = time.perf_counter()
                    break
        finally:
            collector.shutdown()
            replay.shutdown()  # its prefetch threads
    if end is None:
        raise RuntimeError("the collector stopped before the timed steps were collected")
    timed = collected - at_start["steps"]
    seconds = end - start
    return {
        "impl": "torchrl",
        "task": task,
        "render": f"dm_control {sizes.image}x{sizes.image}, one render per sub-step",
        "num_envs": 1,
        "train_ratio": train_ratio,
        "batch": f"{sizes.batch}x{sizes.seq}",
        "prefill_steps": prefill,
        "frames_per_batch": frames_per_batch,
        "timed_agent_steps": timed,
        "updates_in_timed_steps": updates - at_start["updates"],
        "seconds": round(seconds, 2),
        "agent_steps_per_s": round(timed / seconds, 4),
        "env_frames_per_s": round(timed * action_repeat / seconds, 4),
        "wall_s_including_prefill": round(time.perf_counter() - t0, 2),
    }
