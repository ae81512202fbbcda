"""The collector on batched envs whose episodes end at different times (partial reset / step)."""

import functools

import torch
from torchrl.envs import SerialEnv

from aefrl.collect import Collector
from aefrl.envs import DMCPixelEnv
from tests.agents.test_dreamer import TINY

from agents.dreamer import DreamerAgent  # isort: skip


def test_partial_resets_keep_one_row_per_env_and_every_terminal_row():
    # cartpole: 0.01 s control step x repeat 2 -> 0.2 s = 10 agent steps, 0.3 s = 15.
    makers = [
        functools.partial(DMCPixelEnv, "cartpole-swingup", seed=i, render="fast", time_limit=t)
        for i, t in enumerate((0.2, 0.3))
    ]
    env = SerialEnv(2, makers)
    agent = DreamerAgent((3, 64, 64), 1, **{k: dict(v) for k, v in TINY.items()})
    collector = Collector(env, agent, 1)
    rows = [collector.step("random")[0] for _ in range(40)]
    env.close()
    first = torch.stack([r["is_first"][:, 0] for r in rows])  # [40, 2]
    done = torch.stack([r["done"][:, 0] for r in rows])
    reward = torch.stack([r["reward"][:, 0] for r in rows])
    prev_action = torch.stack([r["prev_action"][:, 0] for r in rows])
    # Env 0 restarts every 11 rows (first row + 10 steps), env 1 every 16.
    assert first[:, 0].nonzero().flatten().tolist() == [0, 11, 22, 33]
    assert first[:, 1].nonzero().flatten().tolist() == [0, 16, 32]
    assert done[:, 0].nonzero().flatten().tolist() == [10, 21, 32]
    assert done[:, 1].nonzero().flatten().tolist() == [15, 31]
    # First rows carry no reward and no action; terminal rows carry the last step's reward.
    assert torch.all(reward[first] == 0) and torch.all(prev_action[first] == 0)
    assert torch.all(reward[done] != 0)
    # Each env's frames are its own: distinct pixels where only one env was reset.
    assert not torch.equal(rows[11]["pixels"][0], rows[11]["pixels"][1])


def _two_reachers():
    # reacher draws its target anywhere in the arena: initial states differ visibly.
    makers = [functools.partial(DMCPixelEnv, "reacher-easy", seed=i, render="fast",
                                image_size=16) for i in range(2)]  # fmt: skip
    return SerialEnv(2, makers)


def test_a_batched_resume_reseeds_its_envs():
    """Batched envs cannot restore their episodes, and are rebuilt from the run's seeds on
    resume: without a new seed, each resume replayed the run's first initial states."""
    agent = DreamerAgent((3, 16, 16), 2, **{k: dict(v) for k, v in TINY.items()})
    env = _two_reachers()
    collector = Collector(env, agent, 2)
    first = collector.step("random")[0]["pixels"]  # the run's first episodes
    for _ in range(5):
        collector.step("random")
    state = collector.state_dict()
    env.close()
    starts = []
    for _ in range(2):
        env = _two_reachers()
        resumed = Collector(env, agent, 2)
        assert resumed.load_state_dict(state) is False
        rows = resumed.step("random")[0]
        env.close()
        assert rows["is_first"].all()
        starts.append(rows["pixels"])
    for i in range(2):
        assert not torch.equal(starts[0][i], first[i])  # new initial states ...
    assert torch.equal(starts[0], starts[1])  # ... the same for the same checkpoint
