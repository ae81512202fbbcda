"""A trained world model's filtered latents as observations of a real torchrl env.

    from torchrl.envs import CatTensors, TransformedEnv
    from aefrl.envs import LatentObservation, make_dmc_env
    from aefrl.world_model.modules import load_world_model

    wm = load_world_model("runs/cartpole-swingup/dreamer-aef/s0-...")  # frozen, eval mode
    env = TransformedEnv(make_dmc_env("cartpole-swingup"), LatentObservation(wm))
    env.append_transform(CatTensors(["belief", "state"], "observation", del_keys=False))
    # any torchrl agent (SAC, TD3, PPO, ...) now learns on "observation" [*B, H + d]

Every frame the env hands over is filtered as the acting Dreamer agent filters it
(:func:`aefrl.world_model.modules.filter_step`): at a reset from zeros, with the episode-start
flag; at a step from the root's ``belief`` / ``state`` and the ``action`` just executed.

=========  ==========================================  =======================================
where      reads                                       writes
=========  ==========================================  =======================================
reset      pixels uint8 [*B, C, H, W] (o_0)            belief [*B, H], state [*B, d] (h_0, z_0)
step       belief, state (h_t, z_t), action [*B, A],   ("next", belief), ("next", state)
           ("next", pixels) (o_{t+1})                  (h_{t+1}, z_{t+1})
=========  ==========================================  =======================================

The carry travels in the env's own observations, so every frame is filtered with the action the
env executed, whoever chose it: a torchrl ``Collector``'s random ``init_random_frames`` too,
which :func:`agents.modules.policy_module`, a policy, does not see. torchrl hands a
transform's step the action after the inverse of every transform of its ``TransformedEnv``
(nested ones are merged by default), so an action rescaling anywhere in the stack is undone
first and the model reads the action the DMC env executed, in its own [-1, 1], as in training
(tested). Only with ``TransformedEnv(..., auto_unwrap=False)`` does an inner env's rescaling
come after this transform: put it in the same env or an outer one then. Batched envs
(``SerialEnv``, ``ParallelEnv``, ``make_dmc_env(num_envs=N)``) reset per env: an env that is not
reset keeps its carry. The AEF posterior is deterministic (dequantised at the bin centre), the
VAE's samples z from torch's global generator. No autograd: the features are the frozen world
model's; training it further is the Dreamer loop's work.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.data import Composite, Unbounded
from torchrl.envs.transforms import Transform

from aefrl import keys
from aefrl.compiled import eager_copy
from aefrl.world_model.modules import PosteriorStep
from aefrl.world_model.world_model import WorldModel


class LatentObservation(Transform):
    """Adds the world model's filtered belief h_t and state z_t of every frame to the env's
    observations (module docstring: keys, resets, batching).

    Args:
        world_model: a trained :class:`~aefrl.world_model.WorldModel`, e.g. from
            :func:`~aefrl.world_model.modules.load_world_model` or ``agent.world_model``. The
            transform keeps a frozen copy (eval mode, no gradients; the model given is left as
            it is, so an agent can go on training it: the copy does not follow), which
            ``env.to(device)`` moves with the env.
        pixels_key, action_key: where the env keeps its frames and executed actions.
        out_keys: the names of h_t and z_t.
    """

    def __init__(
        self,
        world_model: WorldModel,
        pixels_key: str = keys.PIXELS,
        action_key: str = keys.ACTION,
        out_keys: tuple[str, str] = (keys.BELIEF, keys.STATE),
    ) -> None:
        if not isinstance(world_model, WorldModel):
            raise TypeError(
                "LatentObservation takes an aefrl WorldModel (load_world_model(run) or "
                f"agent.world_model), got {type(world_model).__name__}"
            )
        if len(out_keys) != 2:
            raise ValueError(f"out_keys names belief and state (two keys), got {out_keys!r}")
        super().__init__(in_keys=[pixels_key], out_keys=list(out_keys))
        self.action_key = action_key
        # A copy of its own, also of a compiled model (whose compiled steps would run the
        # original's weights).
        frozen = eager_copy(world_model).eval().requires_grad_(False)
        self.posterior = PosteriorStep(frozen)

    @property
    def world_model(self) -> WorldModel:
        return self.posterior.world_model

    def _check_frames(self, shape) -> None:
        if tuple(shape[-3:]) != tuple(self.world_model.obs_shape):
            raise ValueError(
                f"the env's {self.in_keys[0]} are {list(shape[-3:])}, the world model's "
                f"{list(self.world_model.obs_shape)}: build the env with its run's "
                "env.image_size (run_config.yaml)"
            )

    def _filter(self, pixels, prev_action, is_first, carry) -> tuple[torch.Tensor, torch.Tensor]:
        """One filtering step on the model's device; ``(h, z)`` back on the frames' device."""
        self._check_frames(pixels.shape)
        device = self.world_model.device
        # Asynchronous only towards a GPU: a non-blocking copy from a GPU to the host may not
        # have landed when the host reads it.
        to = {"device": device, "non_blocking": device.type == "cuda"}
        with torch.no_grad():
            h, z, _, _ = self.posterior(
                pixels.to(**to),
                prev_action.to(**to),
                is_first.to(**to),
                *(x.to(**to) for x in carry),
            )
        return h.to(pixels.device), z.to(pixels.device)

    def _zeros(self, batch: torch.Size, device) -> tuple[torch.Tensor, ...]:
        rssm, dtype = self.world_model.rssm, self.world_model.dtype
        return tuple(
            torch.zeros(*batch, n, dtype=dtype, device=device)
            for n in (rssm.deter, rssm.latent_dim, rssm.action_dim)
        )

    def _reset(
        self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase
    ) -> TensorDictBase:
        # Every env's frame is filtered from zeros: torchrl merges a partial reset's output by
        # its "_reset" mask, so the envs not reset keep their carry (tested).
        pixels = tensordict_reset.get(self.in_keys[0])
        batch = tensordict_reset.batch_size
        h0, z0, a0 = self._zeros(batch, pixels.device)
        first = torch.ones(*batch, 1, dtype=torch.bool, device=pixels.device)
        h, z = self._filter(pixels, a0, first, (h0, z0))
        tensordict_reset.set(self.out_keys[0], h)
        tensordict_reset.set(self.out_keys[1], z)
        return tensordict_reset

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        pixels = next_tensordict.get(self.in_keys[0])
        action = tensordict.get(self.action_key)
        # The replay the model trained on holds actions clipped to the env's [-1, 1].
        action = action.to(self.world_model.dtype).clamp(-1, 1)
        carry = tuple(tensordict.get(k, None) for k in self.out_keys)
        if carry[0] is None or carry[1] is None:
            raise KeyError(
                f"LatentObservation steps from the {self.out_keys[0]!r} and {self.out_keys[1]!r} "
                "it wrote, and the tensordict has none: a later transform removed them (keep "
                "them, e.g. CatTensors(..., del_keys=False))"
            )
        first = torch.zeros(*next_tensordict.batch_size, 1, dtype=torch.bool)
        h, z = self._filter(pixels, action, first.to(pixels.device), carry)
        next_tensordict.set(self.out_keys[0], h)
        next_tensordict.set(self.out_keys[1], z)
        return next_tensordict

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        self._check_frames(observation_spec[self.in_keys[0]].shape)
        rssm, dtype = self.world_model.rssm, self.world_model.dtype
        for key, size in zip(self.out_keys, (rssm.deter, rssm.latent_dim), strict=True):
            observation_spec[key] = Unbounded(
                shape=(*observation_spec.shape, size), dtype=dtype, device=observation_spec.device
            )
        return observation_spec

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        raise RuntimeError(
            "LatentObservation filters frames one after another inside an env "
            "(TransformedEnv(env, LatentObservation(wm))); it cannot transform a stored "
            "tensordict on its own: filter stored sequences with posterior_module"
        )

    def __repr__(self) -> str:
        rssm = self.world_model.rssm
        return (
            f"{type(self).__name__}({self.world_model.kind}, {self.in_keys[0]!r} -> "
            f"{self.out_keys[0]!r} [{rssm.deter}], {self.out_keys[1]!r} [{rssm.latent_dim}])"
        )
