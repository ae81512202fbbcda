"""TensorDict key names used across aefrl, in one place.

We follow torchrl's vocabulary where it has a word for the thing (``"pixels"``, ``"action"``,
``"state"`` for the stochastic latent z and ``"belief"`` for the recurrent state h, as in torchrl's
own ``DreamerEnv``; ``"is_init"`` as its ``InitTracker`` writes it). Predictions get their own keys
and never overwrite a data key, so losses never need to rename anything.

Replay rows use the *arrival* layout (see :mod:`aefrl.world_model.rssm` for the time-alignment
diagram): row t holds what arrived at time t — the observation ``o_t``, the action ``a_{t-1}`` that
led to it, the reward ``r_t`` received on arriving, and the flags ``is_first`` / ``terminated`` —
all at the root. torchrl's ``("next", ...)`` layout appears only where torchrl envs step: the
collector reads ``"next"`` off ``env.step``, and :class:`~aefrl.envs.ImaginationEnv` writes it.
"""

from __future__ import annotations

# --- data (environment and replay) -------------------------------------------------------------
PIXELS = "pixels"  # uint8 [..., C, H, W]
ACTION = "action"  # float [..., A] in [-1, 1]; the action taken at the current observation
PREV_ACTION = "prev_action"  # float [..., A]; a_{t-1}, zero on the first step of an episode
REWARD = "reward"  # float [..., 1]
IS_FIRST = "is_first"  # bool [..., 1]; first row of an episode (the RSSM resets here)
TERMINATED = "terminated"  # bool [..., 1]; true terminal (no bootstrap)
TRUNCATED = "truncated"  # bool [..., 1]; time limit (bootstrap)
DONE = "done"  # bool [..., 1]; terminated or truncated
# int64 [..., 1]; physics-control steps this agent step simulated: the action repeat, fewer when
# the episode ended on the way, 0 at a reset (the env's frame counter; not stored in replay)
FRAMES = "frames"
# int64 [...]; torchrl's trajectory key, for its SliceSampler (scripts/bench_replay.py times
# it against aefrl's own sampler, which needs none: a constant id per stream there)
TRAJ_ID = "traj_id"
NEXT = "next"
# bool [..., 1]; torchrl's InitTracker's episode-start flag (is_first's twin in torchrl rollouts)
IS_INIT = "is_init"

# --- model state (torchrl names) -----------------------------------------------------------------
STATE = "state"  # z_t, float [..., d]
BELIEF = "belief"  # h_t, float [..., H]

# --- replay context (``agent.replay_context``, DreamerV3's ``replay_context``) -------------------
# Row t's context: the filtered latent of the row before, (h_{t-1}, z_{t-1}), from which a window
# starting at row t begins its scan instead of zeros; zeros on a first row (the scan resets there).
# Written by the collector from the policy's carry, refreshed by every update whose window holds
# both rows (SequenceReplay.write).
CONTEXT_BELIEF = "context_belief"  # float [..., H]
CONTEXT_STATE = "context_state"  # float [..., d]
CONTEXT_KEYS = (CONTEXT_BELIEF, CONTEXT_STATE)
# int64 [...]; a sampled row's identity, step * num_envs + env (SequenceReplay.sample(ids=True)),
# which SequenceReplay.write takes back
REPLAY_ID = "replay_id"

# --- predictions (never a data key) --------------------------------------------------------------
POSTERIOR_MEAN = "posterior_mean"
POSTERIOR_STD = "posterior_std"
RECO_PIXELS = "reco_pixels"
PRED_REWARD = "pred_reward"
PRED_CONTINUE = "pred_continue"
STATE_VALUE = "state_value"
