"""aefrl.layout.arrival_rows: torchrl's step layout to the replay's arrival layout."""

import pytest
import torch
from torchrl.envs import SerialEnv

from aefrl import keys
from aefrl.collect import Collector
from aefrl.envs import make_dmc_env
from aefrl.layout import arrival_rows, interleaved_rows
from tests.test_collect import EchoAgent

REPLAY_KEYS = (keys.PIXELS, keys.PREV_ACTION, keys.REWARD, keys.IS_FIRST, keys.TERMINATED)


def env(seed=0, limit=0.1):  # cartpole: 5 agent steps per episode
    return make_dmc_env("cartpole-swingup", render="fast", time_limit=limit, seed=seed)


def replayed(actions):
    """A torchrl policy that plays ``actions`` [S, ...] in order."""
    step = iter(actions)
    return lambda td: td.set(keys.ACTION, next(step))


def test_a_torchrl_rollout_converts_to_the_rows_aefrls_collector_stores():
    """The same env (seed) and actions: aefrl's Collector's rows (first frames at episode
    starts, the frame that ends an episode kept) and arrival_rows of torchrl's rollout, which
    resets on its own after a time limit, are equal key by key."""
    collector = Collector(env(), EchoAgent(seed=3), action_dim=1)
    rows = [collector.step("explore")[0] for _ in range(15)]
    collector.env.close()
    stored = torch.cat(rows).select(*REPLAY_KEYS)  # [15]: 3 starts, 12 steps
    starts = stored[keys.IS_FIRST].flatten().nonzero().flatten().tolist()
    assert starts == [0, 6, 12]
    actions = stored[keys.PREV_ACTION][~stored[keys.IS_FIRST].flatten()]  # as executed
    real = env()
    rollout = real.rollout(12, replayed(actions), break_when_any_done=False)
    real.close()
    converted = arrival_rows(rollout)
    assert converted.shape == stored.shape
    for key in REPLAY_KEYS:
        assert torch.equal(converted[key], stored[key]), key
    assert converted[keys.REWARD].abs().sum() > 0 and converted[keys.PIXELS].float().std() > 0


def test_a_batched_rollout_gives_one_sequence_per_env_and_bad_input_is_named():
    """Envs whose episodes end at different steps: sequences of different lengths, each the
    conversion of that env's own rollout."""
    batched = SerialEnv(2, [lambda: env(limit=0.1), lambda: env(limit=0.16)])
    rollout = batched.rollout(13, break_when_any_done=False)
    batched.close()
    first, second = arrival_rows(rollout)
    assert first.shape == (13 + 3,) and second.shape == (13 + 2,)  # starts at 0, 5, 10 / 0, 8
    for part, one in zip((first, second), rollout.unbind(0), strict=True):
        alone = arrival_rows(one)
        assert all(torch.equal(part[k], alone[k]) for k in REPLAY_KEYS)
    with pytest.raises(ValueError, match=r"one env's rollout \[T\] or a batched env's"):
        arrival_rows(rollout[0, 0])
    with pytest.raises(KeyError, match=r"compact_obs=True drops"):
        arrival_rows(rollout[0].exclude(("next", keys.PIXELS)))


def test_a_rollout_off_the_cpu_converts_on_its_own_device():
    """A Collector(device="cuda") rollout: the defaults and the episode-start flags are made
    on the rollout's device (they were the CPU's, and torch refused to mix them). "meta"
    stands in for a GPU up to the selection of the rows, which needs the flags' values."""
    real = env()
    rollout = real.rollout(7, break_when_any_done=False)
    real.close()
    del rollout["next", keys.TERMINATED]  # a default of arrival_rows' own
    pairs, keep = interleaved_rows(rollout)
    rows = arrival_rows(rollout)
    assert all(torch.equal(pairs[keep][k], rows[k]) for k in REPLAY_KEYS)
    for flags in ([], [keys.DONE]):  # with done, and with its default too
        meta = rollout.exclude(*[("next", f) for f in flags]).to("meta")
        pairs, keep = interleaved_rows(meta)
        assert keep.device.type == "meta" and keep.shape == (14,)
        assert all(pairs[k].device.type == "meta" for k in REPLAY_KEYS)
