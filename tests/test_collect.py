"""The collector on batched envs whose episodes end at different times (partial reset / step)."""

import functools

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase, SerialEnv

from aefrl.collect import Collector
from aefrl.envs import DMCPixelEnv
from aefrl.world_model import RSSMState
from tests.agents.test_dreamer import TINY

from agents.base import Carry  # isort: skip
from agents.dreamer import DreamerAgent  # isort: skip


class EchoEnv(EnvBase):
    """A fake env whose reward is the action it received (A = 1) and whose pixels count the
    steps of the episode; an episode ends after ``length`` steps, terminated (``terminate``) or
    truncated. It refuses to be stepped after its episode ended, and logs every action it
    received in ``received`` (a list the caller may pass in, to see inside a batched env)."""

    def __init__(self, length: int, terminate: bool = False, received: list | None = None):
        super().__init__(batch_size=[])
        self.length, self.terminate = length, terminate
        self.received = [] if received is None else received
        self.action_spec = Bounded(-1.0, 1.0, shape=(1,))
        self.observation_spec = Composite(
            pixels=Bounded(0, 255, shape=(1, 2, 2), dtype=torch.uint8),
            frames=Unbounded(shape=(1,), dtype=torch.int64),
        )
        self.reward_spec = Unbounded(shape=(1,))
        flag = Categorical(2, shape=(1,), dtype=torch.bool)
        self.done_spec = Composite(done=flag.clone(), terminated=flag.clone(), truncated=flag)
        self.t = None  # steps into the episode; None before the first reset

    def _row(self, end: bool = False) -> dict:
        return {
            "pixels": torch.full((1, 2, 2), self.t, dtype=torch.uint8),
            "done": torch.tensor([end]),
            "terminated": torch.tensor([end and self.terminate]),
            "truncated": torch.tensor([end and not self.terminate]),
        }

    def _reset(self, tensordict=None, **kwargs):
        self.t = 0
        return TensorDict({**self._row(), "frames": torch.zeros(1, dtype=torch.int64)}, [])

    def _step(self, tensordict):
        if self.t is None or self.t >= self.length:
            raise RuntimeError("EchoEnv stepped before a reset or after its episode ended")
        action = tensordict["action"].clone()
        self.received.append(action)
        self.t += 1
        row = self._row(end=self.t == self.length)
        return TensorDict({**row, "reward": action, "frames": torch.tensor([2])}, [])

    def _set_seed(self, seed):
        return seed


class EchoAgent:
    """Draws a fresh uniform action on every call (so a_t and a_{t-1} always differ); counts
    ``train_step`` calls; keeps no state."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0

    def initial_carry(self, n: int) -> Carry:
        return Carry(RSSMState(torch.zeros(n, 2), torch.zeros(n, 2)), torch.zeros(n, 1))

    def act(self, pixels, is_first, carry, mode):
        action = torch.rand(pixels.shape[0], 1, generator=self.generator) * 2 - 1
        return action, Carry(carry.state, action)

    def train_step(self, batch) -> dict:
        self.updates += 1
        return {}

    def state_dict(self) -> dict:
        return {}


def _check_arrival_rows(rows, logs, lengths):
    """Every env's rows against what that env received: each stepped row holds, as
    ``prev_action``, the action the env was stepped with to arrive there (its reward echoes it),
    in the order the env received them; reset rows hold a zero action and reward."""
    for e, (received, length) in enumerate(zip(logs, lengths)):
        stored = []
        for i, row in enumerate(rows):
            step = int(row["pixels"][e].flatten()[0])
            action, reward = row["prev_action"][e], row["reward"][e]
            if row["is_first"][e]:
                assert step == 0 and torch.all(action == 0) and torch.all(reward == 0), (e, i)
                continue
            assert step == int(rows[i - 1]["pixels"][e].flatten()[0]) + 1, (e, i)
            assert torch.equal(action, reward), (e, i, action, reward)
            assert bool(row["done"][e]) == (step == length), (e, i)
            stored.append(action)
        assert len(stored) == len(received) > 2 * length
        assert torch.equal(torch.stack(stored), torch.stack(received)), e


@pytest.mark.parametrize("mode", ["explore", "random"])
def test_single_env_rows_hold_the_action_the_env_received(mode):
    """Arrival layout: the row written on arriving at o_{t+1} holds a_t, the action that env
    step received (in "random" mode the collector draws it, in "explore" the agent)."""
    env = EchoEnv(4)
    collector = Collector(env, EchoAgent(), 1)
    rows = [collector.step(mode)[0] for _ in range(17)]  # three episodes and a bit
    assert [i for i, r in enumerate(rows) if r["is_first"].item()] == [0, 5, 10, 15]
    _check_arrival_rows(rows, [env.received], [4])


@pytest.mark.parametrize("mode", ["explore", "random"])
def test_batched_env_rows_hold_the_action_each_env_received(mode):
    """The same on a SerialEnv whose envs end their episodes at different times: the env being
    reset is not stepped (EchoEnv would refuse), and the others' rows keep their own actions."""
    lengths = (3, 5)
    logs = [[], []]
    makers = [functools.partial(EchoEnv, n, received=log) for n, log in zip(lengths, logs)]
    env = SerialEnv(2, makers)
    collector = Collector(env, EchoAgent(), 1)
    rows = [collector.step(mode)[0] for _ in range(20)]
    env.close()
    first = torch.stack([r["is_first"][:, 0] for r in rows])
    assert first[:, 0].nonzero().flatten().tolist() == [0, 4, 8, 12, 16]
    assert first[:, 1].nonzero().flatten().tolist() == [0, 6, 12, 18]
    _check_arrival_rows(rows, logs, lengths)


class PlaceholderAgent(EchoAgent):
    """Returns Dreamer's zero placeholder in "random" mode and records the a_{t-1} of the
    carry it was handed at every call (what the policy filters o_t with)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def act(self, pixels, is_first, carry, mode):
        self.seen.append(carry.prev_action.clone())
        action, carry = super().act(pixels, is_first, carry, mode)
        if mode == "random":
            action = torch.zeros_like(action)
        return action, Carry(carry.state, action)


def test_prefill_actions_are_uniform_on_the_bounds_and_reach_the_agents_carry():
    """The prefill draws a_t uniformly on [-1, 1] and writes it into the agent's carry, so the
    next filtering step sees the a_{t-1} the env executed and the replay stores (with the
    placeholder left there, acting and training disagreed; actions on [0, 1] passed too)."""
    env, agent = EchoEnv(6), PlaceholderAgent()
    collector = Collector(env, agent, 1)
    rows = [collector.step("random")[0] for _ in range(3001)]
    received = torch.cat(env.received)  # [N, 1]
    assert received.min() >= -1 and received.max() <= 1
    assert received.min() < -0.99 and received.max() > 0.99
    n = received.numel()
    assert abs(received.mean()) < 5 * (1 / 3 / n) ** 0.5  # Var of U[-1, 1] is 1/3
    assert abs((received < 0).double().mean() - 0.5) < 5 * (0.25 / n) ** 0.5
    # agent.seen[k] is the carry of call k + 1 (call 0 only resets); its a_{t-1} is the action
    # stored in that call's observed row: zero at an episode start, else what the env received.
    for k, seen in enumerate(agent.seen):
        observed = rows[k]
        expected = observed["prev_action"] if not observed["is_first"].item() else torch.zeros(1)
        assert torch.equal(seen.flatten(), expected.flatten()), k


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
