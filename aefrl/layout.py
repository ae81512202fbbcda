"""torchrl's step layout to aefrl's arrival layout, for training on data torchrl collected.

torchrl's rollouts keep a transition per row: o_t and a_t at the root, o_{t+1}, r_{t+1} and the
end flags under ``"next"``. aefrl's replay, world-model loss and posterior read rows as they
arrive (:mod:`aefrl.world_model.rssm`): o_t with the action a_{t-1} and reward r_t that led to
it, ``is_first`` on an episode's first frame (whose action and reward are zeros).

    from aefrl.layout import arrival_rows

    rollout = env.rollout(1000, policy, break_when_any_done=False)  # [T], any torchrl policy
    rows = arrival_rows(rollout)                                    # [T + episodes started]
    out = WorldModelLoss(wm)(rows.unsqueeze(0))                     # a [1, T'] training batch

One env's rollout ``[T]`` gives ``[T + E]`` rows, E the episodes started in it: each start adds
its first frame. A batched rollout ``[N, T]`` gives one such sequence per env (a list): their
lengths differ where their episodes end at different steps.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase

from aefrl import keys


def arrival_rows(rollout: TensorDictBase) -> TensorDict | list[TensorDict]:
    """``rollout`` ``[T]`` (one env) in torchrl's step layout as arrival rows ``[T + E]`` with
    ``pixels``, ``prev_action``, ``reward`` ``[·, 1]``, ``is_first`` and ``terminated``
    (aefrl's replay keys); ``[N, T]`` (a batched env's) as a list of N such sequences.

    An episode starts at the rollout's first row and after every row whose ``("next",
    "done")`` is set (a time limit's truncation or a termination: torchrl resets there when it
    rolls on). The frame that ends an episode is kept, with its flags; its successor row is the
    next episode's first frame, as aefrl's own collector stores them.
    """
    if rollout.batch_dims == 2:
        return [arrival_rows(env_rollout) for env_rollout in rollout.unbind(0)]
    if rollout.batch_dims != 1:
        raise ValueError(
            "arrival_rows takes one env's rollout [T] or a batched env's [N, T], got batch "
            f"shape {list(rollout.batch_size)}"
        )
    pairs, keep = interleaved_rows(rollout)
    return pairs[keep]


def interleaved_rows(rollout: TensorDictBase) -> tuple[TensorDict, torch.Tensor]:
    """One env's ``rollout`` ``[T]`` as ``[2T]`` candidate rows, each transition's first-frame
    row before its arrival row, and the bool mask ``[2T]`` of those :func:`arrival_rows` keeps
    (a first frame only where an episode starts), on the rollout's device: selecting them is the
    one step whose output size depends on the data."""
    missing = [
        str(k)
        for k in (keys.PIXELS, keys.ACTION, ("next", keys.PIXELS), ("next", keys.REWARD))
        if k not in rollout.keys(True)
    ]
    if missing:
        raise KeyError(
            f"arrival_rows needs a rollout in torchrl's step layout with {', '.join(missing)} "
            "(a Collector with compact_obs=True drops ('next', 'pixels'))"
        )
    nxt = rollout["next"]
    length = rollout.shape[0]
    action = rollout[keys.ACTION].to(torch.float32)
    device = action.device  # a Collector(device="cuda") rollout's: every constant goes there
    flags = {"dtype": torch.bool, "device": device}
    done = nxt.get(keys.DONE, torch.zeros(length, 1, **flags)).reshape(length)
    starts = torch.cat([torch.ones(1, **flags), done[:-1]])  # [T]
    terminated = nxt.get(keys.TERMINATED, torch.zeros(length, 1, **flags))
    arrived = TensorDict(  # the row each transition arrives at
        {
            keys.PIXELS: nxt[keys.PIXELS],
            keys.PREV_ACTION: action,
            keys.REWARD: nxt[keys.REWARD].to(torch.float32).reshape(length, 1),
            keys.IS_FIRST: torch.zeros(length, 1, **flags),
            keys.TERMINATED: terminated.reshape(length, 1).bool(),
        },
        [length],
        device=device,
    )
    first = TensorDict(  # an episode's first frame, before any action
        {
            keys.PIXELS: rollout[keys.PIXELS],
            keys.PREV_ACTION: torch.zeros_like(action),
            keys.REWARD: torch.zeros(length, 1, device=device),
            keys.IS_FIRST: torch.ones(length, 1, **flags),
            keys.TERMINATED: torch.zeros(length, 1, **flags),
        },
        [length],
        device=device,
    )
    # Interleave: row t's first frame (where an episode starts) before its arrival row.
    pairs = torch.stack([first, arrived], 1).reshape(2 * length)  # [first_0, arrived_0, ...]
    keep = torch.stack([starts, torch.ones_like(starts)], 1).reshape(2 * length)
    return pairs, keep
