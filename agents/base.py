"""What every agent on the world model shares: the carry between environment steps, the
optimiser step, the world-model report and checkpoints (:class:`WorldModelAgent`).

The training loop talks to an agent through five methods only (danijar/dreamerv3's narrow agent
interface): ``initial_carry``, ``act``, ``train_step``, ``report`` and ``state_dict`` /
``load_state_dict``. :class:`~agents.dreamer.DreamerAgent` and
:class:`~agents.planner.PlannerAgent` subclass :class:`WorldModelAgent`, which gives them all but
``act`` and ``train_step``; checkpoints have one layout (``{"modules", "optimizers"}``), so either
agent's world model loads from the other's checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from torch import nn

from aefrl import keys
from aefrl.cuda_graph import GROUP_FLAGS as _OPTIMIZER_FLAGS  # what capture changes
from aefrl.cuda_graph import restore_flags
from aefrl.precision import trunk_precision
from aefrl.world_model import RSSMState, WorldModel
from aefrl.world_model.evaluation import open_loop_prediction, sequence_bits_per_dim

# "random": filter o_t only and return a placeholder zero action; the caller (the collector's
# prefill) draws the action and writes it into the carry, so no policy runs for nothing.
ACT_MODES = ("explore", "eval", "random")


def check_optimizer_settings(lr: dict, grad_clip: dict, adam_eps: float) -> None:
    """Refuse settings that silently stop learning: a clip norm of 0 zeroes every update."""
    for group, values in (("lr", lr), ("grad_clip", grad_clip)):
        for name, value in values.items():
            if not value > 0:
                raise ValueError(f"{group}.{name} must be > 0, got {value}")
    if not adam_eps > 0:  # eps = 0 divides by zero where a gradient is zero
        raise ValueError(f"adam_eps must be > 0, got {adam_eps}")


def loss_scalars(out: TensorDictBase) -> dict[str, torch.Tensor]:
    """The 0-d entries of a loss module's output, detached (the metrics of an update)."""
    return {
        key: value.detach()
        for key, value in out.items()
        if isinstance(key, str) and value.dim() == 0
    }


def shared_entries(module: nn.Module) -> dict[str, str]:
    """``{alias: name}`` for the ``state_dict`` entries of ``module`` that are the same tensor
    as an entry of an earlier child (``wm_loss.world_model.*`` and ``world_model.*``: the loss
    modules hold the networks they train). Sharing inside one child (the RSSM holds the world
    model's observation model) is that child's own layout and stays."""
    first: dict[int, str] = {}
    aliases = {}
    # keep_vars: the parameters and buffers themselves, one object however often registered
    # (data pointers would not do: every meta tensor's, and every empty one's, is 0).
    for name, value in nn.Module.state_dict(module, keep_vars=True).items():
        ident = id(value)
        if ident not in first:
            first[ident] = name
        elif first[ident].split(".", 1)[0] != name.split(".", 1)[0]:
            aliases[name] = first[ident]
    return aliases


def check_explore_noise(std: float) -> float:
    """``std`` of the collection noise as a float; a ValueError below 0 (or nan)."""
    if not std >= 0:
        raise ValueError(f"explore_noise must be >= 0, got {std}")
    return float(std)


def add_explore_noise(action: torch.Tensor, std: float) -> torch.Tensor:
    """``action [N, A]`` plus N(0, std²), clipped to [-1, 1]: the collection noise of DreamerV1
    and PlaNet (``explore`` mode only). ``std`` 0 returns ``action`` and draws nothing."""
    if std <= 0:
        return action
    return (action + std * torch.randn_like(action)).clamp(-1.0, 1.0)


def check_replay_context(value) -> bool:
    """``agent.replay_context`` as a bool; a ValueError for anything but true or false."""
    if not isinstance(value, bool):
        raise ValueError(f"replay_context must be true or false, got {value!r}")
    return value


def context_updates(batch: TensorDictBase, wm_out: TensorDictBase) -> dict[str, torch.Tensor]:
    """What an update learned about its window's rows for ``agent.replay_context``: row t's
    posterior ``(h_t, z_t)`` as the context of row t+1, ``context_belief [B, T-1, H]`` and
    ``context_state [B, T-1, d]`` for rows 1..T-1 of the window (zeros where a row is an
    episode's first); the loop writes them back to the replay under the batch's ``replay_id``
    ``[:, 1:]``."""
    keep = ~batch[keys.IS_FIRST][:, 1:].bool()  # [B, T-1, 1]
    # Detached: with repval_grad the posteriors carry the world model's graph.
    return {
        keys.CONTEXT_BELIEF: wm_out[keys.BELIEF][:, :-1].detach().where(keep, 0.0),
        keys.CONTEXT_STATE: wm_out[keys.STATE][:, :-1].detach().where(keep, 0.0),
    }


def check_wm_loss(wm_loss: dict | None) -> dict:
    """The ``wm_loss`` kwargs of an agent, refusing ``state_grad``: whether the world-model
    loss hands its posteriors over with their graph is the agent's to decide (the Dreamer's
    ``value_loss.repval_grad``); a setting of its own would do nothing or keep a graph for
    nothing."""
    wm_loss = dict(wm_loss or {})
    if "state_grad" in wm_loss:
        raise ValueError(
            "wm_loss.state_grad is not a setting; the Dreamer agent's "
            "value_loss.repval_grad=true sends a loss's gradient through the posteriors"
        )
    return wm_loss


def placeholder_action(carry: Carry) -> torch.Tensor:
    """The zero action ``[N, A]`` of ``act(..., mode="random")``."""
    return torch.zeros_like(carry.prev_action)


@dataclass
class Carry:
    """What the policy carries between environment steps: the posterior state and a_{t-1}."""

    state: RSSMState  # h [N, H], z [N, d]
    prev_action: torch.Tensor  # [N, A]

    def reset(self, done: torch.Tensor) -> Carry:
        """Zero the rows whose episode ended (``done [N]`` bool); the RSSM also resets on
        ``is_first``, this keeps a_{t-1} right."""
        keep = ~done.bool().unsqueeze(-1)  # where, not · 0: a nan state must not outlive it
        h, z = self.state.h.where(keep, 0.0), self.state.z.where(keep, 0.0)
        return Carry(RSSMState(h, z), self.prev_action.where(keep, 0.0))


class WorldModelAgent(nn.Module):
    """An agent with a :class:`~aefrl.world_model.WorldModel` trained by Adam optimisers, one
    per parameter group. Subclasses set ``world_model``, ``action_dim`` and ``autocast``, call
    :meth:`_init_optimizers`, and define ``act`` and ``train_step``."""

    world_model: WorldModel
    action_dim: int
    autocast: str

    def _init_optimizers(
        self, groups: dict[str, nn.Module], lr: dict, grad_clip: dict, adam_eps: float
    ) -> None:
        """One Adam per group (``{"model": world_model, ...}``) at ``lr[name]``, its gradients
        clipped at ``grad_clip[name]``."""
        check_optimizer_settings(lr, grad_clip, adam_eps)
        self.grad_clip = grad_clip
        self._groups = groups
        self.optimizers = {
            name: torch.optim.Adam(module.parameters(), lr=lr[name], eps=adam_eps)
            for name, module in groups.items()
        }
        # How they step eagerly: a checkpoint taken while CUDA graphs ran holds the graph's
        # settings (capturable, fused), which load_state_dict would otherwise adopt.
        self._optimizer_flags = {
            name: {k: opt.param_groups[0][k] for k in _OPTIMIZER_FLAGS}
            for name, opt in self.optimizers.items()
        }

    # --- acting ----------------------------------------------------------------------------------
    def initial_carry(self, num_envs: int) -> Carry:
        p = next(self.parameters())
        return Carry(
            self.world_model.rssm.initial(num_envs),
            torch.zeros(num_envs, self.action_dim, device=p.device, dtype=p.dtype),
        )

    # --- training --------------------------------------------------------------------------------
    def precision(self):
        """The context of the updates' loss forwards: trunks in bf16 under ``autocast="bf16"``
        (:mod:`aefrl.precision`)."""
        return trunk_precision(self.autocast)

    def _step(self, names: str | tuple[str, ...], loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backward of ``loss``, then clip and step of the optimiser ``names`` (one name, or
        several whose parameters one loss trains together: one backward, each group clipped on
        its own norm). Returns per group the gradient norm before clipping and 1.0 if it was
        clipped (its mean over a log period: the share of updates clipped; a tensor comparison,
        so a captured update needs no host synchronisation)."""
        names = (names,) if isinstance(names, str) else tuple(names)
        for name in names:
            self.optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        metrics = {}
        for name in names:
            clip = self.grad_clip[name]
            norm = nn.utils.clip_grad_norm_(self._groups[name].parameters(), clip)
            self.optimizers[name].step()
            metrics.update(
                {f"grad_norm_{name}": norm, f"grad_clipped_{name}": (norm > clip).float()}
            )
        return metrics

    # --- reporting -------------------------------------------------------------------------------
    @torch.no_grad()
    def report(self, batch: TensorDictBase, num_samples: int = 8) -> dict:
        """World-model diagnostics on a ``[B, T]`` batch: open-loop prediction (video, MSE and
        SSIM per horizon; with rewards in the batch, the reward head's absolute error and bias
        per horizon) and the sequence bits/dim with the model's estimator."""
        context = min(5, batch.shape[1] - 1)
        pred = open_loop_prediction(self.world_model, batch, context=context)
        bpd = sequence_bits_per_dim(self.world_model, batch, num_samples)
        out = {
            "context": context,  # the first frames of video_pred: posterior reconstructions
            "video_real": pred["real"],
            "video_pred": pred["pred"],
            "open_loop_mse": pred["mse"],
            "open_loop_ssim": pred["ssim"],
            "open_loop_sharpness": pred["sharpness"],
            "bits_per_dim": bpd.mean(),
        }
        if "reward_abs_error" in pred:
            out["open_loop_reward_abs_error"] = pred["reward_abs_error"]
            out["open_loop_reward_bias"] = pred["reward_bias"]
        return out

    # --- checkpoints -----------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Module parameters and buffers, each once, plus optimiser states (one dict for
        checkpoints). The loss modules hold the world model, actor and critics too; their
        entries (``wm_loss.world_model.*`` beside ``world_model.*``) are left out."""
        aliases = shared_entries(self)
        modules = super().state_dict(*args, **kwargs)
        return {
            "modules": {k: v for k, v in modules.items() if k not in aliases},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
        }

    def load_state_dict(self, state, strict: bool = True):
        modules = dict(state["modules"])
        for alias, name in shared_entries(self).items():  # checkpoints from before list them
            if name in modules:
                modules.setdefault(alias, modules[name])
        result = super().load_state_dict(modules, strict=strict)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            restore_flags(opt, [self._optimizer_flags[name]] * len(opt.param_groups))
        return result
