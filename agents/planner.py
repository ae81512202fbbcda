"""PlaNet-style planning agent: Dreamer's world model, no actor or critic, torchrl's planners.

Hafner et al., "Learning Latent Dynamics for Planning from Pixels" (PlaNet), ICML 2019. At every
environment step the agent filters the real frame with the world model's posterior (as Dreamer
acts), then plans with torchrl's :class:`~torchrl.modules.CEMPlanner` (or
:class:`~torchrl.modules.MPPIPlanner`) over :class:`~aefrl.envs.ImaginationEnv`, which scores
candidate action sequences with the reward head's mean along prior rollouts (SPEC §4, §8). It
executes the first action of the plan and replans at the next step (model-predictive control).
Only the world model is trained, with Dreamer's :class:`~aefrl.objectives.WorldModelLoss`.

The training loop sees the same narrow interface as :class:`~agents.dreamer.DreamerAgent`, and a
Dreamer checkpoint's world model plans directly: ``scripts/eval.py RUN --agent planner``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import CEMPlanner, MPPIPlanner
from torchrl.objectives.value import TDLambdaEstimator

from aefrl import keys
from aefrl.compiled import compile_steps
from aefrl.envs.imagination import ImaginationEnv
from aefrl.nn import check_size
from aefrl.objectives import WorldModelLoss
from aefrl.precision import check_autocast
from aefrl.world_model import WorldModel
from aefrl.world_model.modules import WEIGHTS_PREFIX, filter_step, world_model_kwargs
from agents.base import (
    ACT_MODES,
    Carry,
    WorldModelAgent,
    add_explore_noise,
    check_explore_noise,
    check_replay_context,
    check_wm_loss,
    context_updates,
    loss_scalars,
    placeholder_action,
)

PLANNERS = ("cem", "mppi")
# Sections of an agent configuration that only Dreamer reads: configs/agent/planner.yaml inherits
# dreamer.yaml (one source of truth for the world model) and exp presets may set them.
DREAMER_ONLY = ("actor", "critic", "actor_loss", "value_loss", "slow_critic_tau")


@dataclass
class PlanningConfig:
    """What the planner searches (defaults: PlaNet's CEM).

    ``temperature`` is MPPI's: torchrl weights elites by ``exp(temperature · return)``, an
    *inverse* temperature.
    """

    method: str = "cem"  # cem | mppi
    horizon: int = 12  # imagined steps per candidate action sequence
    candidates: int = 1000  # action sequences sampled per iteration
    top_k: int = 100  # elites that refit the action distribution
    iterations: int = 10  # refits per environment step
    temperature: float = 1.0  # mppi only

    def __post_init__(self) -> None:
        # Messages name the fields: agents.factory turns them into configuration keys
        # (agent.planner.top_k), scripts/eval.py into its options (--top-k).
        if self.method not in PLANNERS:
            raise ValueError(f"method must be one of {', '.join(PLANNERS)}, got {self.method!r}")
        for name in ("horizon", "candidates", "top_k", "iterations"):  # 2.5 used to plan with 2
            setattr(self, name, check_size(name, getattr(self, name)))
        if self.top_k > self.candidates:
            raise ValueError(f"top_k ({self.top_k}) must not exceed candidates ({self.candidates})")
        # torchrl keeps it as a float32 buffer: above float32's largest value it is inf there,
        # and inf · 0 (the best candidate's shifted return) made NaN actions.
        number = isinstance(self.temperature, int | float) and not isinstance(
            self.temperature, bool
        )
        with np.errstate(over="ignore", under="ignore"):  # host arithmetic, also on "meta"
            in_float32 = float(np.float32(self.temperature)) if number else math.nan
        # Subnormal float32 values (below 1.18e-38) lose precision. cem does not read it: a cem
        # run's stored value stays loadable whatever it is.
        usable = math.isfinite(in_float32) and in_float32 >= np.finfo(np.float32).tiny
        if self.method == "mppi" and not usable:
            # An inverse temperature: a negative one weights the worst sequences most, and NaN
            # made NaN actions (the physics refused them several frames into an episode).
            raise ValueError(
                f"temperature must be a finite number > 0 (in float32: 1.18e-38 to 3.4e38), got "
                f"{self.temperature}"
            )
        if self.method == "cem" and self.top_k < 2 and self.iterations > 1:
            # torchrl refits the std of the elites (unbiased): NaN from a single elite, and the
            # next iteration would sample NaN actions.
            raise ValueError(
                "cem needs top_k >= 2 when iterations > 1 (it refits the std of its elites), "
                f"got top_k 1 and iterations {self.iterations}"
            )


class _ZeroValue(nn.Module):
    """``V = 0``: with γ = λ = 1 the TD(λ) advantage MPPI ranks by is the return-to-go, the same
    objective as CEM's (PlaNet has no critic)."""

    def forward(self, belief: torch.Tensor) -> torch.Tensor:
        return belief.new_zeros(*belief.shape[:-1], 1)


class _ShiftedAdvantage(nn.Module):
    """An advantage module minus its maximum over the candidates.

    torchrl 0.14's MPPIPlanner weights the elites by ``exp(temperature · advantage)`` without
    subtracting the maximum first, so once ``temperature · return`` exceeds ~88 (float32) the
    weights overflow to inf and the planned action is NaN. A shift shared by all candidates leaves
    MPPI's ranking and normalised weights unchanged, so this is the whole workaround.
    """

    def __init__(self, estimator: nn.Module) -> None:
        super().__init__()
        self.estimator = estimator

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self.estimator(tensordict)
        advantage = tensordict.get("advantage")  # [*B, K, T, 1]: candidates on dim -3
        return tensordict.set("advantage", advantage - advantage.amax(-3, keepdim=True))


def make_planner(env: ImaginationEnv, config: PlanningConfig):
    """torchrl's CEMPlanner or MPPIPlanner over ``env``, unchanged (MPPI's advantage is shifted,
    see :class:`_ShiftedAdvantage`)."""
    c = config
    if c.method == "cem":
        return CEMPlanner(env, c.horizon, c.iterations, c.candidates, c.top_k)
    value = TensorDictModule(_ZeroValue(), in_keys=[keys.BELIEF], out_keys=[keys.STATE_VALUE])
    advantage = TDLambdaEstimator(gamma=1.0, lmbda=1.0, value_network=value)
    return MPPIPlanner(
        env,
        _ShiftedAdvantage(advantage),
        c.temperature,
        c.horizon,
        c.iterations,
        c.candidates,
        c.top_k,
    )


class PlannerAgent(WorldModelAgent):
    """World model + its loss and optimiser; actions from a torchrl planner.

    Args:
        obs_shape: ``(C, H, W)`` pixels.
        action_dim: A (actions in ``[-1, 1]``).
        world_model: kwargs of :class:`~aefrl.world_model.WorldModel`, or a built (e.g. loaded)
            world model to plan with.
        wm_loss: kwargs of :class:`~aefrl.objectives.WorldModelLoss`.
        planner: fields of :class:`PlanningConfig`.
        explore_noise: std of the Gaussian noise added to planned actions in ``"explore"`` mode
            (PlaNet: 0.3), clipped back to ``[-1, 1]``.
        lr, grad_clip: ``{"model": ...}`` (other entries, e.g. Dreamer's, are ignored).
        adam_eps: Adam's epsilon.
        compile: ``torch.compile`` the world model's RSSM steps and heads
            (:func:`aefrl.compiled.compile_steps`).
        autocast: ``"none"`` or ``"bf16"``: the MLPs and conv trunks of the world-model update
            in bf16, the rest in float32 (:mod:`aefrl.precision`), as Dreamer's.
        replay_context: start replayed windows from their stored latents, as Dreamer's.
    """

    def __init__(
        self,
        obs_shape,
        action_dim: int,
        *,
        world_model: dict | WorldModel | None = None,
        wm_loss: dict | None = None,
        planner: dict | None = None,
        explore_noise: float = 0.3,
        lr: dict | None = None,
        grad_clip: dict | None = None,
        adam_eps: float = 1e-6,
        compile: bool = False,
        autocast: str = "none",
        replay_context: bool = False,
    ) -> None:
        super().__init__()
        self.autocast = check_autocast(autocast)
        self.replay_context = check_replay_context(replay_context)
        if isinstance(world_model, WorldModel):
            self.world_model = world_model
        else:
            self.world_model = WorldModel(tuple(obs_shape), action_dim, **(world_model or {}))
        self.wm_loss = WorldModelLoss(self.world_model, **check_wm_loss(wm_loss))
        self.planning = PlanningConfig(**(planner or {}))
        self.explore_noise = check_explore_noise(explore_noise)
        self._init_optimizers(
            {"model": self.world_model},
            {"model": 3e-4, **(lr or {})},
            {"model": 1000.0, **(grad_clip or {})},
            adam_eps,
        )
        self.action_dim = int(action_dim)
        if compile:
            compile_steps(self.world_model)
        # The imagination env and planner share the world model's modules; kept in a plain dict
        # so that they are not registered twice in state_dict, and rebuilt when the model moves.
        self._planner_cache: dict = {}

    # --- planning --------------------------------------------------------------------------------
    @property
    def planner(self):
        """torchrl's planner over an :class:`~aefrl.envs.ImaginationEnv` of this world model."""
        device = self.world_model.device
        if self._planner_cache.get("device") != device:
            env = ImaginationEnv(self.world_model, device=device)
            self._planner_cache = {"device": device, "planner": make_planner(env, self.planning)}
        return self._planner_cache["planner"]

    @torch.no_grad()
    def plan(self, belief: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The planner's first action ``[N, A]`` from filtered states h ``[N, H]``, z ``[N, d]``."""
        td = TensorDict(
            {keys.BELIEF: belief, keys.STATE: state}, belief.shape[:-1], device=belief.device
        )
        return self.planner(td)[keys.ACTION]

    @torch.no_grad()
    def act(
        self, pixels: torch.Tensor, is_first: torch.Tensor, carry: Carry, mode: str = "explore"
    ) -> tuple[torch.Tensor, Carry]:
        """One policy step. ``pixels`` uint8 ``[N, C, H, W]`` (o_t), ``is_first`` ``[N, 1]``.

        Filters o_t with the posterior, plans ``a_t`` from the filtered state, and in
        ``"explore"`` mode adds ``N(0, explore_noise²)`` noise; ``"random"`` (the prefill) only
        filters and returns zeros for the caller to replace, so no plan is made and thrown away.
        Returns ``a_t [N, A]`` and the new carry.
        """
        if mode not in ACT_MODES:
            raise ValueError(f"mode must be one of {ACT_MODES}, got {mode!r}")
        state, _, _ = filter_step(
            self.world_model, carry.state, carry.prev_action, pixels, is_first
        )
        if mode == "random":
            action = placeholder_action(carry)
            return action, Carry(state, action)
        action = self.plan(state.h, state.z)
        if mode == "explore":
            action = add_explore_noise(action, self.explore_noise)
        return action, Carry(state, action)

    # --- training --------------------------------------------------------------------------------
    def train_step(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """One world-model update on a ``[B, T]`` replay batch (PlaNet trains nothing else).

        Returns detached scalar metrics (losses, diagnostics, the gradient norm), and with
        ``replay_context`` the rows' new contexts (:func:`~agents.base.context_updates`).
        """
        with self.precision():
            out = self.wm_loss(batch)
        metrics = self._step("model", self.wm_loss.total(out))
        metrics.update(loss_scalars(out))
        if self.replay_context:
            metrics.update(context_updates(batch, out))
        return metrics

    # --- checkpoints -----------------------------------------------------------------------------
    def load_world_model_state(self, modules: dict) -> None:
        """Load the ``world_model.*`` weights of any agent's ``state_dict()["modules"]`` (e.g. a
        Dreamer checkpoint's) and leave everything else as it is."""
        n = len(WEIGHTS_PREFIX)
        self.world_model.load_state_dict(
            {k[n:]: v for k, v in modules.items() if k.startswith(WEIGHTS_PREFIX)}
        )

    def planning_options(self) -> dict:
        """The planner's settings, for logs and result files."""
        return {**asdict(self.planning), "explore_noise": self.explore_noise}


def build_planner(agent: dict, obs_model: dict, obs_shape, action_dim: int) -> PlannerAgent:
    """A :class:`PlannerAgent` from the ``agent`` (``configs/agent/planner.yaml``) and
    ``obs_model`` groups; Dreamer-only sections (inherited, or set by exp presets) are ignored."""
    kwargs = {k: v for k, v in agent.items() if k not in ("name", *DREAMER_ONLY)}
    kwargs["world_model"] = world_model_kwargs(agent, obs_model)
    return PlannerAgent(obs_shape, action_dim, **kwargs)
