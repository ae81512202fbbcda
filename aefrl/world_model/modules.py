"""A trained world model as tensordict modules with torchrl's keys; loading it from a checkpoint.

    from aefrl.world_model.modules import load_world_model, world_model_modules

    wm = load_world_model("runs/cartpole-swingup/dreamer-aef/s0-...")  # run dir or checkpoint.pt
    m = world_model_modules(wm)  # name -> TensorDictModule
    td = m["posterior"](td)      # filter one real frame: updates td["belief"], td["state"]
    td = m["prior"](td)          # one imagined step under td["action"]

Every module reads and writes the keys of :mod:`aefrl.keys` (torchrl's vocabulary: ``state`` = z,
``belief`` = h); predictions get their own keys. Any batch shape ``[*B]`` works:

=========  ========================================  ==========================================
module     in_keys                                   out_keys
=========  ========================================  ==========================================
posterior  pixels uint8 [*B, C, H, W], prev_action   belief [*B, H], state [*B, d] (h_t, z_t),
           [*B, A], is_first bool [*B, 1], belief,   posterior_mean, posterior_std [*B, d]
           state (h_{t-1}, z_{t-1})
prior      belief, state (h_t, z_t), action [*B, A]  belief, state (h_{t+1}, z_{t+1} ~ prior)
reward     belief, state                             pred_reward [*B, 1] (two-hot mean)
continue   belief, state                             pred_continue [*B, 1] (probability)
decoder    belief, state                             reco_pixels uint8 [*B, C, H, W] (μ_x)
=========  ========================================  ==========================================

The posterior follows the replay's arrival layout (:mod:`aefrl.world_model.rssm`): o_t and a_{t-1}
enter the same step, and ``is_first`` zeroes h, z and a_{t-1} first. The recurrent state is updated
in place (the keys ``belief`` / ``state`` hold the latest state), so a loop carries it in one
tensordict. Filtering dequantises at the bin centre, as acting does, so it is deterministic in the
AEF modes and samples z in VAE mode (SPEC §4). The prior samples ``z ~ p(z | h)`` (SPEC §4).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tensordict.nn import TensorDictModule
from torch import nn

from aefrl import keys
from aefrl.checkpoint import CheckpointError, load_checkpoint, load_error_summary
from aefrl.devices import usable_device
from aefrl.world_model.rssm import RSSMState
from aefrl.world_model.world_model import WorldModel

WEIGHTS_PREFIX = "world_model."  # of the world model's entries in an agent's state_dict["modules"]


def _flat(x: torch.Tensor, lead: torch.Size, event_dims: int) -> torch.Tensor:
    """``[*lead, *event] -> [N, *event]``: the GRU cell and conv trunks take one batch axis."""
    return x.reshape(lead.numel(), *x.shape[x.dim() - event_dims :])


def check_step_inputs(rssm, inputs: dict, dtype: torch.dtype | None = None) -> None:
    """Refuse in one sentence inputs a step of ``rssm`` cannot take, before they fail deep in
    torch. ``inputs``: key -> ``(tensor or None, size of its last axis)``, every one
    ``[*B, size]`` with the first one's ``*B`` (size None: only its presence is checked);
    ``belief`` and ``state`` in the model's dtype (or autocast's, where it is on: its steps hand
    back lower-precision states; ``dtype`` overrides the model's, for a module converted on its
    own). A KeyError names every missing one (None: a tensordict without
    the key), a ValueError a wrong shape or dtype. Shapes and dtypes only: no values are read,
    nothing waits for a device."""
    missing = [name for name, (x, _) in inputs.items() if not isinstance(x, torch.Tensor)]
    if missing:
        hint = (
            f' (torchrl\'s InitTracker writes "{keys.IS_INIT}": is_first_key="{keys.IS_INIT}" '
            "reads it)"
            if keys.IS_FIRST in missing
            else " (a tensordict without them?)"
        )
        raise KeyError(f"the step needs {missing}{hint}")
    lead = first = None
    dtype = dtype or rssm.gru.weight_hh.dtype
    for name, (x, size) in inputs.items():
        if size is None:
            continue
        if x.dim() < 1 or x.shape[-1] != size:
            raise ValueError(f"{name} must be [*B, {size}], got shape {list(x.shape)}")
        if lead is None:
            lead, first = x.shape[:-1], name
        elif x.shape[:-1] != lead:
            raise ValueError(
                f"{name} has batch shape {list(x.shape[:-1])}, {first} {list(lead)}: each "
                "input is [*B, size] with the same *B"
            )
        latent = name in (keys.BELIEF, keys.STATE)
        if latent and x.dtype != dtype and x.dtype != autocast_dtype(x.device):
            raise ValueError(f"{name} must be {dtype} (the model's dtype), got {x.dtype}")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast's dtype where it is on for ``device`` (a step under it hands back states in that
    dtype), else None. Asked only on a mismatch: the model's own dtype needs no query."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        pass
    return None


def filter_step(
    world_model: WorldModel,
    prev: RSSMState,
    prev_action: torch.Tensor,
    pixels: torch.Tensor,
    is_first: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[RSSMState, torch.Tensor, torch.Tensor]:
    """Filter one real frame as an acting agent does: ``pixels`` uint8 ``[N, C, H, W]`` (o_t),
    ``prev`` (h, z at t−1), ``prev_action`` ``[N, A]``, ``is_first`` ``[N, 1]``.

    Dequantises at the bin centre, so the AEF modes are deterministic; ``noise`` ``[N, d]`` is
    the VAE's standard-normal draw (sampled when omitted). Returns the posterior state and
    ``(μ_q, σ_q)``, each ``[N, d]``.
    """
    y, _ = world_model.encode_pixels(pixels, dequantize="mid")
    embed, coords = world_model.obs_model.embed(y)
    return world_model.rssm.obs_step(prev, prev_action.to(y.dtype), embed, coords, is_first, noise)


class PosteriorStep(nn.Module):
    """:func:`filter_step` on any batch shape, on plain tensors (keys in the module docstring).

    ``forward(pixels [*B, C, H, W] uint8, prev_action [*B, A], is_first [*B, 1], belief [*B, H],
    state [*B, d], noise [*B, d] | None) -> (belief, state, μ_q, σ_q)``.
    """

    def __init__(self, world_model: WorldModel, is_first_key: str = keys.IS_FIRST) -> None:
        super().__init__()
        self.world_model = world_model
        self.is_first_key = is_first_key  # what its messages call the flag

    def forward(self, pixels, prev_action, is_first, belief, state, noise=None):
        rssm = self.world_model.rssm
        inputs = {
            keys.BELIEF: (belief, rssm.deter),
            keys.STATE: (state, rssm.latent_dim),
            keys.PREV_ACTION: (prev_action, rssm.action_dim),
            self.is_first_key: (is_first, 1),
            keys.PIXELS: (pixels, None),  # its shape is the preprocessing's to check
        }
        if noise is not None:
            inputs["noise"] = (noise, rssm.latent_dim)
        check_step_inputs(rssm, inputs)
        lead = belief.shape[:-1]
        if pixels.dim() < 3 or pixels.shape[:-3] != lead:  # a reshape would mix frames up
            raise ValueError(
                f"pixels must be [*B, C, H, W] with belief's *B {list(lead)}, got shape "
                f"{list(pixels.shape)}"
            )
        post, mu_q, sigma_q = filter_step(
            self.world_model,
            RSSMState(_flat(belief, lead, 1), _flat(state, lead, 1)),
            _flat(prev_action, lead, 1),
            _flat(pixels, lead, 3),
            _flat(is_first, lead, 1),
            None if noise is None else _flat(noise, lead, 1),
        )
        return tuple(x.reshape(*lead, x.shape[-1]) for x in (post.h, post.z, mu_q, sigma_q))


class PriorStep(nn.Module):
    """One imagined step, :meth:`RSSM.img_step <aefrl.world_model.RSSM.img_step>` on any batch
    shape: ``(belief [*B, H], state [*B, d], action [*B, A], noise [*B, d] | None) ->
    (belief, state)`` with ``z ~ p(z | h)`` (``noise`` the standard-normal draw)."""

    def __init__(self, world_model: WorldModel) -> None:
        super().__init__()
        self.rssm = world_model.rssm

    def forward(self, belief, state, action, noise=None):
        rssm = self.rssm
        inputs = {
            keys.BELIEF: (belief, rssm.deter),
            keys.STATE: (state, rssm.latent_dim),
            keys.ACTION: (action, rssm.action_dim),
        }
        if noise is not None:
            inputs["noise"] = (noise, rssm.latent_dim)
        check_step_inputs(rssm, inputs)
        lead = belief.shape[:-1]
        prev = RSSMState(_flat(belief, lead, 1), _flat(state, lead, 1))
        noise = None if noise is None else _flat(noise, lead, 1)
        nxt = self.rssm.img_step(prev, _flat(action, lead, 1).to(belief.dtype), noise)
        return nxt.h.reshape(*lead, -1), nxt.z.reshape(*lead, -1)


class _LatentHead(nn.Module):
    """A module of ``(belief [*B, H], state [*B, d])`` whose inputs are checked as the steps'
    are (:func:`check_step_inputs`): a wrong size or dtype is one sentence naming the key."""

    def __init__(self, world_model: WorldModel) -> None:
        super().__init__()
        self._rssm = [world_model.rssm]  # a list: sizes and dtype only, not a submodule

    def forward(self, belief, state):
        rssm = self._rssm[0]
        # The head's own dtype: `reward_module(wm).double()` converts it, not the RSSM.
        dtype = next(self.parameters()).dtype
        sizes = {keys.BELIEF: (belief, rssm.deter), keys.STATE: (state, rssm.latent_dim)}
        check_step_inputs(rssm, sizes, dtype)
        return self.unchecked(belief, state)

    def unchecked(self, belief, state):
        """The forward without the input checks, for callers whose inputs come from the model's
        own steps (imagination runs it at every step of every planner rollout)."""
        raise NotImplementedError


class RewardMean(_LatentHead):
    """``(belief [*B, H], state [*B, d]) -> [*B, 1]``: mean of the symlog two-hot reward head."""

    def __init__(self, world_model: WorldModel) -> None:
        super().__init__(world_model)
        self.head = world_model.reward_head

    def unchecked(self, belief, state):
        return self.head(torch.cat([belief, state], -1)).mean.unsqueeze(-1)


class ContinueProb(_LatentHead):
    """``(belief, state) -> [*B, 1]``: probability that the episode goes on (1 − terminated)."""

    def __init__(self, world_model: WorldModel) -> None:
        super().__init__(world_model)
        self.head = world_model.continue_head

    def unchecked(self, belief, state):
        return self.head(torch.cat([belief, state], -1)).probs.unsqueeze(-1)


class DecodePixels(_LatentHead):
    """``(belief, state) -> uint8 [*B, C, H, W]``: the decoder mean mapped back to pixels."""

    def __init__(self, world_model: WorldModel) -> None:
        super().__init__(world_model)
        self.world_model = world_model

    def unchecked(self, belief, state):
        return self.world_model.decode_pixels(RSSMState(belief, state))


_LATENT = [keys.BELIEF, keys.STATE]


def posterior_in_keys(is_first_key: str = keys.IS_FIRST) -> list:
    """The posterior step's in_keys, in :class:`PosteriorStep`'s argument order."""
    return [keys.PIXELS, keys.PREV_ACTION, is_first_key, *_LATENT]


def posterior_module(world_model: WorldModel, is_first_key=keys.IS_FIRST) -> TensorDictModule:
    """Filtering step; keys in the module docstring. ``is_first_key`` names the episode-start
    flag: torchrl's ``InitTracker`` writes ``"is_init"``, so a tensordict from a torchrl
    pipeline is read with ``is_first_key="is_init"``."""
    return TensorDictModule(
        PosteriorStep(world_model, is_first_key),
        in_keys=posterior_in_keys(is_first_key),
        out_keys=[*_LATENT, keys.POSTERIOR_MEAN, keys.POSTERIOR_STD],
    )


def prior_module(world_model: WorldModel) -> TensorDictModule:
    """Imagined step ``(belief, state, action) -> (belief, state)``."""
    return TensorDictModule(
        PriorStep(world_model), in_keys=[*_LATENT, keys.ACTION], out_keys=_LATENT
    )


def reward_module(world_model: WorldModel, out_key=keys.PRED_REWARD) -> TensorDictModule:
    """Reward head mean; the imagination env writes it under ``"reward"`` instead."""
    return TensorDictModule(RewardMean(world_model), in_keys=_LATENT, out_keys=[out_key])


def continue_module(world_model: WorldModel, out_key=keys.PRED_CONTINUE) -> TensorDictModule:
    """Continue probability."""
    return TensorDictModule(ContinueProb(world_model), in_keys=_LATENT, out_keys=[out_key])


def decoder_module(world_model: WorldModel) -> TensorDictModule:
    """Decoded frame of a latent state."""
    return TensorDictModule(DecodePixels(world_model), in_keys=_LATENT, out_keys=[keys.RECO_PIXELS])


def world_model_modules(
    world_model: WorldModel, is_first_key=keys.IS_FIRST
) -> dict[str, TensorDictModule]:
    """The pieces of ``world_model`` as TensorDictModules: ``posterior``, ``prior``, ``reward``,
    ``continue``, ``decoder`` (keys in the module docstring; ``is_first_key`` as in
    :func:`posterior_module`). They share its parameters."""
    return {
        "posterior": posterior_module(world_model, is_first_key),
        "prior": prior_module(world_model),
        "reward": reward_module(world_model),
        "continue": continue_module(world_model),
        "decoder": decoder_module(world_model),
    }


# --- loading --------------------------------------------------------------------------------
def world_model_kwargs(agent: dict, obs_model: dict) -> dict:
    """:class:`~aefrl.world_model.WorldModel` keyword arguments from a run configuration's
    ``agent`` and ``obs_model`` sections (the one switch ``kind``, ``latent_dim``, options)."""
    return {
        **dict(agent.get("world_model") or {}),
        "obs_model": obs_model["kind"],
        "latent_dim": obs_model["latent_dim"],
        "obs_options": dict(obs_model.get("options") or {}),
    }


def stored_action_dim(state: dict, expected: int | None = None) -> int:
    """The action size of a loaded checkpoint's agent, read off its weights (it is stored
    nowhere else: the RSSM's ``img_in`` reads ``[z_{t-1}, a_{t-1}]``); ``expected`` (the env's),
    when given, must agree. One-sentence :class:`~aefrl.checkpoint.CheckpointError` otherwise."""
    key = WEIGHTS_PREFIX + "rssm.img_in.0.weight"
    try:
        conf = state["run_config"]
        modules = state["agent"]["modules"]
        if key not in modules:
            raise CheckpointError("the checkpoint's agent holds no world model (no world_model.*)")
        acts = modules[key].shape[1] - int(conf["obs_model"]["latent_dim"])
    except KeyError as exc:
        raise CheckpointError(
            f"not an aefrl training checkpoint (missing {exc}); expected one written by "
            "scripts/train.py"
        ) from None
    except (TypeError, AttributeError, IndexError, ValueError) as exc:
        raise CheckpointError(
            f"not an aefrl training checkpoint ({type(exc).__name__}: {exc}); expected one "
            "written by scripts/train.py"
        ) from None
    if acts < 1:  # the layer reads [z, a]: fewer inputs than the configured latents
        raise CheckpointError(
            f"the checkpoint's weights do not match its configuration: {key} reads "
            f"{acts + int(conf['obs_model']['latent_dim'])} inputs, fewer than obs_model."
            f"latent_dim={conf['obs_model']['latent_dim']} plus one action"
        )
    if expected is not None and acts != expected:
        raise CheckpointError(
            f"the checkpoint's agent (trained on {conf['env'].get('task')!r}) takes {acts}-d "
            f"actions, the environment given has {expected}"
        )
    return acts


def world_model_from_checkpoint(state: dict) -> WorldModel:
    """The world model of a loaded checkpoint (``aefrl.checkpoint.load_checkpoint``) written by
    ``scripts/train.py`` for any agent: its weights are the ``world_model.*`` entries of
    ``state["agent"]["modules"]``, its sizes come from ``state["run_config"]``. In eval mode."""
    try:
        conf = state["run_config"]
        modules = state["agent"]["modules"]
        size = int(conf["env"]["image_size"])
        kwargs = world_model_kwargs(conf["agent"], conf["obs_model"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(
            f"not an aefrl training checkpoint (missing {exc}); expected one written by "
            "scripts/train.py"
        ) from None
    weights = {
        k[len(WEIGHTS_PREFIX) :]: v for k, v in modules.items() if k.startswith(WEIGHTS_PREFIX)
    }
    acts = stored_action_dim(state)
    try:  # an option another version wrote (TypeError), a kind this one lacks (ValueError)
        world_model = WorldModel((3, size, size), acts, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's configuration is not valid: {exc}") from None
    try:
        world_model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(
            "the checkpoint's world model does not match its configuration: "
            + load_error_summary(exc)
        ) from None
    return world_model.eval()


def load_world_model(path: str | os.PathLike, map_location="cpu") -> WorldModel:
    """The world model of a run directory or ``checkpoint.pt`` written by ``scripts/train.py``
    (Dreamer or planner runs, any observation model), on the device ``map_location`` names
    (a device or its name, checked first: :func:`aefrl.devices.usable_device`, whose ValueError
    names a device this machine lacks; torch.load's dict and callable forms place the loaded
    tensors). Raises :class:`~aefrl.checkpoint.CheckpointError` with one clear sentence when the
    checkpoint can't give one."""
    if not isinstance(map_location, str | torch.device):
        return world_model_from_checkpoint(load_checkpoint(Path(path), map_location=map_location))
    device = usable_device(map_location, "map_location=", other_types=True)
    # Read onto the CPU: the file also holds the replay, optimiser states and held-out data,
    # which must not land on the GPU only to be dropped.
    state = load_checkpoint(Path(path), map_location="cpu")
    return world_model_from_checkpoint(state).to(device)
