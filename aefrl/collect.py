"""Stepping a torchrl environment with an agent, one *arrival* row per env per call.

Each call of :meth:`Collector.step` returns, for every env, the row of the observation that just
arrived (``pixels`` o_t, ``prev_action`` a_{t-1}, ``reward`` r_t, ``is_first``, ``terminated``).
An env whose observation ended its episode is reset on the *next* call instead of being stepped
(torchrl's partial ``_reset`` / ``_step``), so the terminal row — with the last reward and the
terminal flag the continue head learns from — is stored like any other, and the replay receives
exactly one row per env per call.

With ``context=True`` each row also carries the policy's filtered latent of the row before it,
``context_belief`` h_{t-1} and ``context_state`` z_{t-1} (zeros on a first row): where a replayed
window starting at that row begins (``agent.replay_context``, :mod:`aefrl.keys`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from aefrl import keys

COLLECT_MODES = ("random", "explore", "eval")


@dataclass
class EpisodeStats:
    """Episodes finished during one :meth:`Collector.step` call, and the frames it simulated
    (the envs' ``frames`` entries summed; ``None`` for an env without that key)."""

    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    frames: int | None = 0


class Collector:
    """Drives ``env`` (a torchrl env, batched or not) with ``agent``'s policy.

    Args:
        env: torchrl env whose observation key is ``"pixels"`` (uint8 ``[C, H, W]``) and whose
            actions lie in ``[-1, 1]``.
        agent: object with ``initial_carry(n)`` and ``act(pixels, is_first, carry, mode)``,
            ``mode`` one of ``"random"`` (filter only: the collector draws the action),
            ``"explore"``, ``"eval"``.
        action_dim: A.
        device: where the agent runs; rows are returned on the CPU.
        generator: RNG for random actions (the prefill policy), so it doesn't touch global RNGs.
        context: also return each row's context, the latent the agent's carry held before the
            row arrived (its ``state``'s ``h`` and ``z``, float32 ``[N, H]`` and ``[N, d]``).
    """

    def __init__(
        self, env, agent, action_dim: int, device="cpu", generator=None, context: bool = False
    ) -> None:
        self.env = env
        self.context = bool(context)
        self.agent = agent
        self.action_dim = int(action_dim)
        self.device = torch.device(device)
        self.generator = generator or torch.Generator().manual_seed(0)
        self.single = len(env.batch_size) == 0
        self.num_envs = 1 if self.single else int(env.batch_size[0])
        self.obs: TensorDict | None = None  # the latest row per env, [N]
        self.carry = None
        self.ep_return = torch.zeros(self.num_envs, dtype=torch.float64)
        self.ep_length = torch.zeros(self.num_envs, dtype=torch.long)

    # --- env adapters (single envs have batch_size [], everything here is [N]) -------------------
    def _batched(self, td):
        return td.unsqueeze(0) if self.single else td

    def _reset(self, mask: torch.Tensor) -> TensorDict:
        if self.single or bool(mask.all()):
            return self._batched(self.env.reset())
        return self.env.reset(TensorDict({"_reset": mask.unsqueeze(-1)}, self.env.batch_size))

    def _step(self, action: torch.Tensor, mask: torch.Tensor) -> TensorDict:
        td = TensorDict({keys.ACTION: action}, [self.num_envs])
        if not bool(mask.all()):
            td.set("_step", mask)
        if self.single:
            td = td.squeeze(0)
        return self._batched(self.env.step(td)).get(keys.NEXT)

    # --- rows ------------------------------------------------------------------------------------
    def _first_rows(self, pixels: torch.Tensor) -> TensorDict:
        n = pixels.shape[0]
        rows = TensorDict(
            {
                keys.PIXELS: pixels,
                keys.PREV_ACTION: torch.zeros(n, self.action_dim),
                keys.REWARD: torch.zeros(n, 1),
                keys.IS_FIRST: torch.ones(n, 1, dtype=torch.bool),
                keys.TERMINATED: torch.zeros(n, 1, dtype=torch.bool),
                keys.DONE: torch.zeros(n, 1, dtype=torch.bool),
            },
            [n],
        )
        if self.context:  # nothing came before a first row
            state = self.carry.state
            rows.set(keys.CONTEXT_BELIEF, torch.zeros(n, state.h.shape[-1]))
            rows.set(keys.CONTEXT_STATE, torch.zeros(n, state.z.shape[-1]))
        return rows

    def _context(self, envs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The carry's latent of the envs ``envs [N]`` (bool) as their next rows' context
        (float32, on the CPU)."""
        state = self.carry.state
        envs = envs.to(state.h.device)
        return {
            keys.CONTEXT_BELIEF: state.h[envs].float().cpu(),
            keys.CONTEXT_STATE: state.z[envs].float().cpu(),
        }

    def step(self, mode: str = "explore") -> tuple[TensorDict, EpisodeStats, int]:
        """Advance every env by one row. Returns ``(rows [N], finished episodes, envs stepped)``;
        ``rows`` has the replay keys plus ``done``."""
        if mode not in COLLECT_MODES:
            raise ValueError(f"mode must be one of {COLLECT_MODES}, got {mode!r}")
        stats = EpisodeStats()
        if self.obs is None:  # the very first call: reset everything
            everyone = torch.ones(self.num_envs, dtype=torch.bool)
            self.carry = self.agent.initial_carry(self.num_envs)
            self.obs = self._first_rows(self._reset(everyone)[keys.PIXELS])
            return self.obs.clone(), stats, 0

        obs = self.obs
        pixels = obs[keys.PIXELS].to(self.device)
        is_first = obs[keys.IS_FIRST].to(self.device)
        # In "random" mode the agent only filters o_t (its carry stays current for the switch
        # to its policy) and the action is drawn here.
        action, self.carry = self.agent.act(pixels, is_first, self.carry, mode)
        if mode == "random":
            action = torch.rand(action.shape, generator=self.generator) * 2 - 1
            self.carry.prev_action = action.to(self.carry.prev_action)
        action = action.cpu()

        reset = obs[keys.DONE].squeeze(-1)
        stepped = ~reset
        rows = torch.zeros_like(obs)
        if bool(stepped.any()):
            nxt = self._step(action, stepped)
            frames = nxt.get(keys.FRAMES, None)
            stats.frames = None if frames is None else int(frames[stepped].sum())
            new = {
                keys.PIXELS: nxt[keys.PIXELS][stepped],
                keys.PREV_ACTION: action[stepped].to(torch.float32),
                keys.REWARD: nxt[keys.REWARD][stepped].to(torch.float32),
                keys.IS_FIRST: torch.zeros(int(stepped.sum()), 1, dtype=torch.bool),
                keys.TERMINATED: nxt[keys.TERMINATED][stepped],
                keys.DONE: nxt[keys.DONE][stepped],
            }
            if self.context:  # the latent the agent just filtered o_t into: h_t, z_t
                new.update(self._context(stepped))
            rows[stepped] = TensorDict(new, [int(stepped.sum())])
            self.ep_return[stepped] += rows[keys.REWARD][stepped].squeeze(-1).double()
            self.ep_length[stepped] += 1
        if bool(reset.any()):
            rows[reset] = self._first_rows(self._reset(reset)[keys.PIXELS][reset])
            self.carry = self.carry.reset(reset.to(self.carry.prev_action.device))
            self.ep_return[reset] = 0.0
            self.ep_length[reset] = 0
        finished = rows[keys.DONE].squeeze(-1)
        for i in finished.nonzero().flatten().tolist():
            stats.returns.append(float(self.ep_return[i]))
            stats.lengths.append(int(self.ep_length[i]))
        self.obs = rows
        return rows.clone(), stats, int(stepped.sum())

    # --- exact resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Latest rows, policy carry, episode accumulators, RNG and — for a single env that
        supports it — the environment's own state, so the next step is exactly the same."""
        state = {
            "obs": None if self.obs is None else self.obs.to_dict(),
            "carry": None,
            "ep_return": self.ep_return,
            "ep_length": self.ep_length,
            "generator": self.generator.get_state(),
            "env": None,
        }
        if self.carry is not None:
            c = self.carry
            state["carry"] = {"h": c.state.h, "z": c.state.z, "prev_action": c.prev_action}
        if self.single and hasattr(self.env, "get_env_state"):
            state["env"] = self.env.get_env_state()
        return state

    def load_state_dict(self, state: dict) -> bool:
        """Restore; returns False when the env state could not be restored (batched envs): then
        every env is reseeded and reset on the next call, and its episode restarts."""
        from aefrl.world_model import RSSMState

        self.generator.set_state(state["generator"])
        if state["env"] is None or state["obs"] is None or not hasattr(self.env, "set_env_state"):
            if state["obs"] is not None:
                # The envs were rebuilt from the run's seeds: without a new seed every resume
                # would replay the run's first episodes' initial states. Drawn from the
                # restored generator, so the same checkpoint resumes the same way.
                self.env.set_seed(int(torch.randint(2**31, (), generator=self.generator)))
            self.obs = None
            return False
        self.env.set_env_state(state["env"])
        self.obs = TensorDict(state["obs"], [self.num_envs])
        carry = self.agent.initial_carry(self.num_envs)
        c = state["carry"]
        carry.state = RSSMState(c["h"].to(carry.state.h), c["z"].to(carry.state.z))
        carry.prev_action = c["prev_action"].to(carry.prev_action)
        self.carry = carry
        self.ep_return = state["ep_return"].clone()
        self.ep_length = state["ep_length"].clone()
        return True
