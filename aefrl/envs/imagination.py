"""Imagination in a trained world model as a torchrl model-based environment (SPEC §4, §8).

:class:`ImaginationEnv` is a :class:`~torchrl.envs.model_based.ModelBasedEnvBase`, so torchrl's
planners (``CEMPlanner``, ``MPPIPlanner``), rollouts, value estimators and losses drive it
unchanged::

    env = ImaginationEnv(load_world_model(run_dir))
    td = env.reset(TensorDict({"belief": h, "state": z}, [N], device=h.device), set_state=True)
    plan = CEMPlanner(env, planning_horizon=12, optim_steps=10, num_candidates=1000, top_k=100)
    action = plan(td)["action"]  # [N, A]

Keys (:mod:`aefrl.keys`, torchrl's names, as in its ``DreamerEnv``): observations and state
``belief`` = h ``[*B, H]`` and ``state`` = z ``[*B, d]``; ``action`` ``[*B, A]`` in ``[-1, 1]``;
``("next", "reward")`` ``[*B, 1]`` is the mean of the symlog two-hot reward head on the *next*
state (the arrival layout: r_t is predicted from feat_t, after a_{t-1}). A step is
:meth:`RSSM.img_step <aefrl.world_model.RSSM.img_step>`: ``h' = f(h, z, a)``, ``z' ~ p(z' | h')``.

``done`` / ``terminated`` are always False: DMC tasks never terminate, imagination runs for a
fixed horizon, and a thresholded continue head would only add noise to planners' returns. With
``predict_continue=True`` the continue head's probability is an extra observation
``pred_continue`` ``[*B, 1]``, for code that wants to discount by it.

The env is not batch-locked (any batch shape, like every ``ModelBasedEnvBase``). ``reset``
starts from the ``belief`` / ``state`` of the input tensordict with ``set_state=True`` (torchrl's
protocol for stateless envs; torchrl 0.14 honours a given state without it too, with a
FutureWarning that this changes in 0.15), and from the RSSM's initial state (zeros) when the
tensordict holds none.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictSequential
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs.model_based import ModelBasedEnvBase

from aefrl import keys
from aefrl.devices import canonical_device
from aefrl.world_model.modules import (
    check_step_inputs,
    continue_module,
    prior_module,
    reward_module,
)
from aefrl.world_model.world_model import WorldModel

_MOVE_REFUSED = (
    "an ImaginationEnv shares its world model and cannot move it to {} (torch would move only "
    "the pieces the env holds): move the world model (world_model.to(device)) and build a new "
    "ImaginationEnv, and planner, on it"
)


class ImaginationEnv(ModelBasedEnvBase):
    """Prior rollouts of ``world_model`` as a torchrl env (see the module docstring).

    Args:
        world_model: a trained :class:`~aefrl.world_model.WorldModel` (shared, not copied).
        predict_continue: also observe the continue probability under ``pred_continue``.
        device: where the env's tensors live: the world model's device (the default). Another
            one is refused: torchrl's ``ModelBasedEnvBase`` would move the shared model in
            place, and only the modules it holds (the continue head would stay behind).
    """

    # reset(td, set_state=True) starts from the given belief / state (torchrl >= 0.14).
    _supports_set_state = True

    def __init__(
        self, world_model: WorldModel, *, predict_continue: bool = False, device=None
    ) -> None:
        pieces = [prior_module(world_model), reward_module(world_model, out_key=keys.REWARD)]
        self.predict_continue = bool(predict_continue)
        if self.predict_continue:
            pieces.append(continue_module(world_model, out_key=keys.PRED_CONTINUE))
        model_device = world_model.device
        if device is None:
            device = model_device
        elif canonical_device(device) != model_device:  # "cuda" is the model's "cuda:0"
            raise ValueError(
                f"device {device} is not the world model's ({model_device}): move the model "
                "first (world_model.to(device)); the env would move it in place, and only in part"
            )
        super().__init__(TensorDictSequential(*pieces), device=device)
        dtype = world_model.dtype
        rssm = world_model.rssm
        latent = {
            keys.BELIEF: Unbounded((rssm.deter,), device=self.device, dtype=dtype),
            keys.STATE: Unbounded((rssm.latent_dim,), device=self.device, dtype=dtype),
        }
        observations = dict(latent)
        if self.predict_continue:
            observations[keys.PRED_CONTINUE] = Bounded(
                0.0, 1.0, (1,), device=self.device, dtype=dtype
            )
        self.observation_spec = Composite(observations)
        self.state_spec = Composite({k: v.clone() for k, v in latent.items()})
        self.action_spec = Bounded(-1.0, 1.0, (rssm.action_dim,), device=self.device, dtype=dtype)
        self.reward_spec = Unbounded((1,), device=self.device, dtype=dtype)
        # The plain-tensor modules inside the TensorDictModules, for _step (see there).
        self._prior, self._reward = pieces[0].module, pieces[1].module
        self._continue = pieces[2].module if self.predict_continue else None
        self._latent_sizes = {keys.BELIEF: rssm.deter, keys.STATE: rssm.latent_dim}
        self._dtype = dtype

    def to(self, device) -> ImaginationEnv:
        """The env itself on its own device; another is refused (:meth:`_apply`)."""
        if canonical_device(device) != self.device:
            raise ValueError(_MOVE_REFUSED.format(device))
        return self

    def _apply(self, fn, recurse: bool = True):
        """torch's module moves (``planner.to(device)``, ``.double()``, ``.cuda()``) would move
        the world-model pieces this env holds, which it shares with its model, and leave the
        rest of the model, the specs and ``self.device`` where they were: refused, unless the
        move changes nothing (a planner moved to where it already is)."""
        probe = torch.empty(0, device=self.device, dtype=self._dtype)
        moved = fn(probe)
        if moved.device != probe.device or moved.dtype != probe.dtype:
            raise ValueError(_MOVE_REFUSED.format(f"{moved.device} / {moved.dtype}"))
        return super()._apply(fn, recurse)

    def reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        """torchrl's reset, from a tensordict without dimension names: start states taken from
        a rollout (``rollout["next"].select("belief", "state")``) keep its ``"time"`` name, and
        a rollout from them would stack a second ``"time"`` dimension, which torchrl refuses."""
        if tensordict is not None and any(name is not None for name in tensordict.names):
            tensordict = tensordict.clone(False)  # the caller's keeps its names
            tensordict.names = None
        return super().reset(tensordict, **kwargs)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        shape = tensordict.batch_size if tensordict is not None else self.batch_size
        if kwargs.get("set_state"):
            missing = [k for k in self._latent_sizes if tensordict is None or k not in tensordict]
            if missing:
                raise ValueError(
                    f"reset(set_state=True) needs {missing} in the tensordict (the filtered "
                    "belief h and state z to imagine from)"
                )
            # On the env's device (a user's CPU tensors for a CUDA env).
            out = tensordict.select(*self._latent_sizes).to(self.device)
            sizes = self._latent_sizes.items()
            check_step_inputs(self._prior.rssm, {k: (out[k], n) for k, n in sizes})
        else:
            out = TensorDict(
                {
                    k: torch.zeros(*shape, n, device=self.device, dtype=self._dtype)
                    for k, n in self._latent_sizes.items()
                },
                shape,
                device=self.device,
            )
        if self._continue is not None:
            out[keys.PRED_CONTINUE] = self._continue(out[keys.BELIEF], out[keys.STATE])
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        """What ``self.world_model`` (the TensorDictSequential) computes, calling its plain-tensor
        modules directly: TensorDictModule's per-key bookkeeping (tensordict 0.14 even looks for
        pandas on every key it writes) would add about a quarter to a small model's step, in every
        planner rollout. ``done`` is filled in by torchrl (all False)."""
        belief, state = self._prior(
            tensordict.get(keys.BELIEF), tensordict.get(keys.STATE), tensordict.get(keys.ACTION)
        )
        # The prior checked its inputs; the heads read what it returned, so unchecked.
        reward = self._reward.unchecked(belief, state)
        out = {keys.BELIEF: belief, keys.STATE: state, keys.REWARD: reward}
        if self._continue is not None:
            out[keys.PRED_CONTINUE] = self._continue.unchecked(belief, state)
        return TensorDict(out, tensordict.batch_size, device=self.device)

    # Imagination never terminates (done is always False), so torchrl's per-step done checks and
    # partial resets are skipped, as in torchrl's own DreamerEnv: this saves a device sync and a
    # few tensordict operations per step of every planner rollout.
    def any_done(self, tensordict: TensorDictBase) -> bool:
        return False

    def maybe_reset(self, tensordict: TensorDictBase) -> TensorDictBase:
        return tensordict
