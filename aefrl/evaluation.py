"""Evaluation episodes with the deterministic policy, and the critic's calibration on them.

Shared by the training loop (``eval/*`` in TensorBoard) and ``scripts/eval.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict
from torchrl.objectives.value.functional import reward2go

from aefrl.collect import Collector


@dataclass
class Evaluation:
    """What :func:`run_episodes` saw.

    ``values[i]`` and ``rewards[i]`` (``[L_i]``, float64) are, for episode i, the critic's
    ``v(s_t)`` of each state the policy acted in and the reward ``r_{t+1}`` that followed (empty
    lists for an agent without a critic or a batched env). ``first_episode`` holds the rows of
    the first episode, its first to its terminal row (``[L_0 + 1]``), when asked for.
    """

    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    rewards: list[torch.Tensor] = field(default_factory=list)
    first_episode: TensorDict | None = None


@torch.no_grad()
def run_episodes(
    env,
    agent,
    action_dim: int,
    device,
    episodes: int,
    keep_first: bool = False,
    on_step: Callable[[TensorDict, Collector, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Evaluation | None:
    """Run ``episodes`` episodes of ``agent``'s deterministic policy on ``env``.

    ``on_step(observed, collector, episode)`` is called after every step with the rows the
    agent just filtered (o_t, ``[N]``), the collector (whose carry now holds s_t) and the index
    of the episode under way. ``should_stop()`` is asked after every step: when it says so the
    episodes are dropped and None is returned (the training loop's stop request: a signal does
    not wait for the evaluation, which the resumed run makes).
    """
    collector = Collector(env, agent, action_dim, device)
    rows, _, _ = collector.step("eval")
    out = Evaluation()
    kept = [rows] if keep_first else None
    critic = getattr(agent, "critic", None) if collector.num_envs == 1 else None
    values, rewards = [], []
    while len(out.returns) < episodes:
        observed = rows
        rows, stats, stepped = collector.step("eval")  # filters o_t, acts, receives o_{t+1}
        if should_stop is not None and should_stop():
            return None
        if on_step is not None:
            on_step(observed, collector, len(out.returns))
        if kept is not None and not out.returns:
            # The call that finishes the first episode returns its terminal row: kept too.
            kept.append(rows)
        if critic is not None and stepped:  # the carry holds s_t, the rows r_{t+1}
            values.append(float(critic(collector.carry.state.feat).mean[0]))
            rewards.append(float(rows["reward"][0]))
        if stats.returns and critic is not None:
            out.values.append(torch.tensor(values, dtype=torch.float64))
            out.rewards.append(torch.tensor(rewards, dtype=torch.float64))
            values, rewards = [], []
        out.returns.extend(stats.returns)
        out.lengths.extend(stats.lengths)
    out.returns, out.lengths = out.returns[:episodes], out.lengths[:episodes]
    out.values, out.rewards = out.values[:episodes], out.rewards[:episodes]
    if kept is not None:
        out.first_episode = torch.cat(kept, 0)
    return out


def critic_calibration(values, rewards, gamma: float, fraction: float = 0.25) -> dict:
    """The critic's value of the states an evaluation visited against the discounted return the
    policy then collected, ``G_t = Σ_k γ^k·r_{t+1+k}`` to the episode's end (torchrl's
    ``reward2go``), averaged over the first ``fraction`` of each episode, where the time limit
    cuts the least off the return (the steps past it are missing, γ^(L−t) of the weight).

    A critic well below the return-to-go is behind the policy (it does not yet foresee rewards
    the policy collects). The return-to-go is a lower bound for a time-limited episode, so a
    ratio near 1 or above is no evidence of overestimation. ``values`` and ``rewards``: lists of
    ``[L_i]`` tensors, as in :class:`Evaluation`.
    """
    v_all, g_all, v_first, g_first = [], [], [], []
    for v, r in zip(values, rewards):
        end = torch.zeros(len(r), 1, dtype=torch.bool)
        end[-1] = True
        g = reward2go(r.unsqueeze(-1), end, gamma).squeeze(-1)
        n = max(1, int(len(v) * fraction))
        v_all.append(v[:n])
        g_all.append(g[:n])
        v_first.append(float(v[0]))
        g_first.append(float(g[0]))
    v_mean, g_mean = float(torch.cat(v_all).mean()), float(torch.cat(g_all).mean())
    return {
        "gamma": gamma,
        "fraction": fraction,
        "value_mean": v_mean,
        "return_to_go_mean": g_mean,
        "value_over_return_to_go": v_mean / g_mean if g_mean else None,
        "value_first": v_first,
        "return_to_go_first": g_first,
    }
