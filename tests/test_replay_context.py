"""``agent.replay_context`` (DreamerV3's ``replay_context``): rows carry the latent their window
starts from, the collector stores the policy's, the world-model loss starts its scan there, and
every update writes its posteriors back to the rows it filtered."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs import SerialEnv

from aefrl import keys
from aefrl.collect import Collector
from aefrl.envs import make_dmc_env
from aefrl.logging import RunLogger
from aefrl.loop import LoopConfig, Trainer, write_back_contexts
from aefrl.replay import SequenceReplay
from aefrl.world_model import RSSMState
from aefrl.world_model.evaluation import open_loop_prediction
from tests.agents.test_dreamer import TINY
from tests.test_collect import EchoAgent, EchoEnv
from tests.test_replay import fill, make_rows, window_ids

from agents.base import Carry  # isort: skip
from agents.dreamer import DreamerAgent  # isort: skip
from agents.planner import PlannerAgent  # isort: skip


# --- the replay: ids out, values back ----------------------------------------------------------
def _with_value(replay: SequenceReplay, steps: int) -> None:
    """Rows whose ``value`` entry is their own id, step * num_envs + env, as a float ``[2]``."""
    n = replay.num_envs
    for step in range(steps):
        rows = make_rows(n, step)
        rows.set("value", (step * n + torch.arange(n)).float().unsqueeze(-1).expand(n, 2))
        replay.extend(rows)


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_sampled_ids_name_the_rows_they_came_with(storage, tmp_path):
    path = tmp_path / "replay" if storage == "disk" else None
    replay = SequenceReplay(60, 3, 5, 7, storage=storage, path=path, seed=0)
    _with_value(replay, 30)
    batch = replay.sample(ids=True)
    ids = batch[keys.REPLAY_ID]
    assert ids.dtype == torch.int64 and ids.shape == (7, 5)
    step, env = window_ids(batch)
    assert torch.equal(ids, step * 3 + env)
    assert torch.equal(batch["value"][..., 0], ids.float())
    assert keys.REPLAY_ID not in replay.sample()  # only when asked
    again = replay.sample(out=batch, ids=True)  # into the same batch, ids included
    assert torch.equal(again["value"][..., 0], again[keys.REPLAY_ID].float())
    with pytest.raises(ValueError, match="'replay_id' entry"):
        replay.sample(out=replay.sample(), ids=True)
    assert torch.equal(replay.read(ids)["value"], batch["value"])


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_write_changes_exactly_the_named_rows_and_survives_a_checkpoint(storage, tmp_path):
    path = tmp_path / "replay" if storage == "disk" else None
    replay = SequenceReplay(60, 2, 4, 3, storage=storage, path=path, seed=0)
    _with_value(replay, 30)
    ids = replay.sample(ids=True)[keys.REPLAY_ID]
    written = ids[:, 1:]
    new = -written.float().unsqueeze(-1).expand(*written.shape, 2)
    assert replay.write(written, {"value": new}) == written.numel()
    every = torch.arange(60)
    stored = replay.read(every)["value"][:, 0]
    hit = torch.isin(every, written.flatten())
    assert torch.equal(stored[hit], -every[hit].float())
    assert torch.equal(stored[~hit], every[~hit].float())  # the rest untouched
    # the window's other keys too
    assert torch.equal(replay.read(every)[keys.REWARD][:, 0], 0.5 * (every // 2).float())
    state = replay.state_dict()
    resumed = SequenceReplay(60, 2, 4, 3, storage=storage, path=path, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.read(every)["value"][:, 0], stored)


def test_rows_written_over_since_the_sample_are_skipped():
    replay = SequenceReplay(20, 1, 4, 8, seed=0)  # a ring of 20 rows
    _with_value(replay, 20)
    ids = torch.tensor([[2, 3, 4], [15, 16, 17]])
    fill_rows = 5  # steps 20-24 take the ring positions of steps 0-4
    for step in range(20, 20 + fill_rows):
        rows = make_rows(1, step)
        rows.set("value", torch.full((1, 2), float(step)))
        replay.extend(rows)
    assert replay.write(ids, {"value": torch.full((2, 3, 2), -1.0)}) == 3
    assert torch.equal(
        replay.read(torch.tensor([22, 23, 24]))["value"][:, 0], torch.tensor([22.0, 23, 24])
    )
    assert torch.equal(replay.read(ids[1])["value"][:, 0], torch.full((3,), -1.0))
    with pytest.raises(ValueError, match="3 of the 6 rows asked for are no longer stored"):
        replay.read(ids)
    assert replay.write(torch.tensor([25, 99]), {"value": torch.zeros(2, 2)}) == 0  # not written


def test_a_row_named_twice_keeps_the_value_that_comes_last():
    """At an update's sizes: index_copy_ alone keeps an arbitrary one of the duplicates on
    the CPU too (here it did not keep the last)."""
    replay = SequenceReplay(64, 1, 4, 2, seed=0)
    for step in range(64):
        rows = make_rows(1, step)
        rows.set("wide", torch.zeros(1, 512))
        replay.extend(rows)
    ids = torch.randint(0, 64, (1008,), generator=torch.Generator().manual_seed(0))
    values = torch.arange(1008.0)[:, None].expand(1008, 512)
    assert replay.write(ids, {"wide": values}) == 1008
    rows = ids.unique()
    last = torch.tensor([float((ids == i).nonzero().max()) for i in rows])
    stored = replay.read(rows)["wide"]
    assert torch.equal(stored, last[:, None].expand(-1, 512))


def test_overlapping_windows_keep_the_posterior_with_the_longest_history():
    """The loop's write-back: row t+1 gets row t's posterior; where two windows of a batch
    hold the same row, the one at the later position of its window (more rows filtered before
    it) is kept, whichever window comes first in the batch."""
    replay = SequenceReplay(20, 1, 4, 2, seed=0)
    for step in range(10):
        rows = make_rows(1, step)
        rows.update({keys.CONTEXT_BELIEF: torch.zeros(1, 2), keys.CONTEXT_STATE: torch.zeros(1, 1)})
        replay.extend(rows)
    for order in ([0, 1], [1, 0]):
        ids = torch.tensor([[3, 4, 5, 6], [4, 5, 6, 7]])[order]  # windows from rows 3 and 4
        h = torch.tensor([[[1.0], [2], [3]], [[10], [20], [30]]])[order].expand(2, 3, 2)
        out = {keys.CONTEXT_BELIEF: h, keys.CONTEXT_STATE: -h[..., :1], "loss": torch.ones(())}
        assert write_back_contexts(replay, ids, out) == 6
        assert set(out) == {"loss"}  # popped: not logged as metrics
        stored = replay.read(torch.tensor([4, 5, 6, 7]))
        # row 4: window 3-6's alone; row 5: window 3-6's posterior of row 4 (its second row)
        # over window 4-7's (its first), 2 not 10; row 6: 3 not 20; row 7: window 4-7's alone
        assert stored[keys.CONTEXT_BELIEF][:, 0].tolist() == [1.0, 2.0, 3.0, 30.0], order
        assert stored[keys.CONTEXT_STATE][:, 0].tolist() == [-1.0, -2.0, -3.0, -30.0]


def test_a_disk_replay_resumed_from_before_a_write_keeps_the_written_values(tmp_path):
    """The documented exception to an exact resume: written in place, the disk files hold the
    values written after the checkpoint (and still pass its step-stamp checks)."""
    replay = SequenceReplay(20, 1, 4, 2, storage="disk", path=tmp_path, seed=0)
    _with_value(replay, 10)
    state = replay.state_dict()
    replay.write(torch.tensor([3, 4]), {"value": torch.full((2, 2), -1.0)})
    resumed = SequenceReplay(20, 1, 4, 2, storage="disk", path=tmp_path, seed=0)
    resumed.load_state_dict(state)
    assert resumed.read(torch.tensor([2, 3, 4]))["value"][:, 0].tolist() == [2.0, -1.0, -1.0]
    assert resumed.sample()[keys.PIXELS].shape[:2] == (2, 4)


def test_write_refuses_what_the_replay_does_not_store():
    replay = SequenceReplay(20, 1, 4, 2, seed=0)
    with pytest.raises(RuntimeError, match="holds no rows yet"):
        replay.write(torch.zeros(1, dtype=torch.int64), {})
    fill(replay, 10)
    ids = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="write got key 'value', which the replay does not"):
        replay.write(ids, {"value": torch.zeros(2, 2)})
    with pytest.raises(
        ValueError, match=r"of shape \[2, 3\] for ids of shape \[2\]; expected \[2, 2\]"
    ):
        replay.write(ids, {keys.PREV_ACTION: torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="ids must be int64"):
        replay.write(ids.float(), {keys.PREV_ACTION: torch.zeros(2, 2)})


# --- the collector: each row's context is the carry before it arrived -------------------------
class CountingAgent(EchoAgent):
    """Filters o_t into h = (pixel, step of the call), z = -pixel: the carry a row's context
    must come from is recognisable."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def initial_carry(self, n):
        return Carry(RSSMState(torch.zeros(n, 2), torch.zeros(n, 1)), torch.zeros(n, 1))

    def act(self, pixels, is_first, carry, mode):
        self.calls += 1
        action, _ = super().act(pixels, is_first, carry, mode)
        seen = pixels.flatten(1)[:, :1].float()
        h = torch.cat([seen, torch.full_like(seen, self.calls)], -1)
        return action, Carry(RSSMState(h, -seen), action)


@pytest.mark.parametrize("batched", [False, True])
def test_each_row_carries_the_latent_the_agent_filtered_the_row_before_into(batched):
    if batched:  # episodes of 3 and 5 steps: partial resets
        makers = [functools.partial(EchoEnv, n) for n in (3, 5)]
        env = SerialEnv(2, makers)
    else:
        env = EchoEnv(4)
    collector = Collector(env, CountingAgent(), 1, context=True)
    rows = [collector.step("explore")[0] for _ in range(20)]
    env.close()
    n = 2 if batched else 1
    for t, row in enumerate(rows):
        h, z = row[keys.CONTEXT_BELIEF], row[keys.CONTEXT_STATE]
        assert h.shape == (n, 2) and z.shape == (n, 1) and h.dtype == torch.float32
        for e in range(n):
            if row[keys.IS_FIRST][e]:
                assert torch.all(h[e] == 0) and torch.all(z[e] == 0), (t, e)
                continue
            before = float(rows[t - 1][keys.PIXELS][e].flatten()[0])  # o_{t-1}
            # the call that made row t filtered o_{t-1}: call t (call 0 only resets)
            assert h[e].tolist() == [before, float(t)] and z[e].tolist() == [-before], (t, e)
    assert keys.CONTEXT_BELIEF not in Collector(EchoEnv(4), CountingAgent(), 1).step()[0]


def test_dreamers_stored_context_is_its_own_filter_of_the_episode_so_far():
    """On a real task with a real agent (AEF: deterministic acting), filtering the stored rows
    again from zeros gives each row's context: the latent of the rows before it."""
    torch.manual_seed(0)
    agent = DreamerAgent((3, 64, 64), 1, **copy.deepcopy(TINY))
    env = make_dmc_env("cartpole-swingup", seed=0, render="fast", time_limit=0.2)  # 10 steps
    collector = Collector(env, agent, 1, context=True)
    rows = torch.stack([collector.step("random")[0] for _ in range(25)])  # [25, 1]
    env.close()
    carry = agent.initial_carry(1)
    for t in range(24):
        _, carry = agent.act(rows[t][keys.PIXELS], rows[t][keys.IS_FIRST], carry, "random")
        carry.prev_action = rows[t + 1][keys.PREV_ACTION]  # the action the collector drew
        nxt = rows[t + 1]
        if nxt[keys.IS_FIRST].item():
            assert torch.all(nxt[keys.CONTEXT_BELIEF] == 0)
            continue
        torch.testing.assert_close(nxt[keys.CONTEXT_BELIEF], carry.state.h, rtol=0, atol=0)
        torch.testing.assert_close(nxt[keys.CONTEXT_STATE], carry.state.z, rtol=0, atol=0)
    assert rows[keys.IS_FIRST].sum() == 3 and rows[keys.CONTEXT_BELIEF].abs().sum() > 0


# --- the loss and the agents ----------------------------------------------------------------------
def _batch(b=3, t=6, first_at=()):
    pixels = torch.randint(0, 256, (b, t, 3, 64, 64), dtype=torch.uint8)
    is_first = torch.zeros(b, t, 1, dtype=torch.bool)
    for row in first_at:
        is_first[row] = True  # the whole window of batch row ``row`` starts an episode
        is_first[row, 1:] = False
    return TensorDict(
        {
            keys.PIXELS: pixels,
            keys.PREV_ACTION: torch.rand(b, t, 1) * 2 - 1,
            keys.REWARD: torch.rand(b, t, 1),
            keys.IS_FIRST: is_first,
            keys.TERMINATED: torch.zeros(b, t, 1, dtype=torch.bool),
            keys.CONTEXT_BELIEF: torch.randn(b, t, 8),
            keys.CONTEXT_STATE: torch.randn(b, t, 3),
        },
        [b, t],
    )


def test_the_loss_starts_each_window_from_its_first_rows_context(kind):
    torch.manual_seed(0)
    cfg = copy.deepcopy(TINY)
    cfg["world_model"]["obs_model"] = kind
    agent = DreamerAgent((3, 64, 64), 1, **cfg)
    batch = _batch(first_at=(1,))
    start = RSSMState(batch[keys.CONTEXT_BELIEF][:, 0], batch[keys.CONTEXT_STATE][:, 0])
    torch.manual_seed(1)
    out = agent.wm_loss(batch)
    torch.manual_seed(1)
    want = agent.world_model.filter(batch, start).observed.state
    torch.testing.assert_close(out[keys.BELIEF], want.h, rtol=0, atol=0)
    torch.testing.assert_close(out[keys.STATE], want.z, rtol=0, atol=0)
    torch.manual_seed(1)
    zeros = agent.wm_loss(batch.exclude(*keys.CONTEXT_KEYS))
    # the context matters where the window does not start an episode, and only there
    assert not torch.allclose(zeros[keys.BELIEF][0], out[keys.BELIEF][0])
    torch.testing.assert_close(zeros[keys.BELIEF][1], out[keys.BELIEF][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs both context_belief and context_state"):
        agent.wm_loss(batch.exclude(keys.CONTEXT_STATE))


def test_open_loop_reports_start_from_the_stored_context():
    torch.manual_seed(0)
    wm = DreamerAgent((3, 64, 64), 1, **copy.deepcopy(TINY)).world_model
    batch = _batch(t=5)
    torch.manual_seed(1)
    report = open_loop_prediction(wm, batch, context=3)
    torch.manual_seed(1)
    seen = batch.select(keys.PIXELS, keys.PREV_ACTION, keys.IS_FIRST)[:, :3]
    start = RSSMState(batch[keys.CONTEXT_BELIEF][:, 0], batch[keys.CONTEXT_STATE][:, 0])
    want = wm.decode_pixels(wm.filter(seen, start).observed.state)
    assert torch.equal(report["pred"][:, :3], want)
    torch.manual_seed(1)
    plain = open_loop_prediction(wm, batch.exclude(*keys.CONTEXT_KEYS), context=3)
    assert not torch.equal(plain["pred"][:, 0], want[:, 0])


@pytest.mark.parametrize("agent_cls", [DreamerAgent, PlannerAgent])
def test_an_update_returns_each_rows_posterior_as_the_next_rows_context(agent_cls):
    torch.manual_seed(0)
    cfg = copy.deepcopy(TINY)
    if agent_cls is PlannerAgent:
        cfg = {"world_model": cfg["world_model"]}
    agent = agent_cls((3, 64, 64), 1, replay_context=True, **cfg)
    batch = _batch()
    batch[keys.IS_FIRST][0, 3] = True  # an episode starts inside window 0
    before = copy.deepcopy(agent)
    torch.manual_seed(1)
    posterior = before.wm_loss(batch)
    torch.manual_seed(1)
    out = agent.train_step(batch)
    h, z = out[keys.CONTEXT_BELIEF], out[keys.CONTEXT_STATE]
    assert h.shape == (3, 5, 8) and z.shape == (3, 5, 3)
    want_h, want_z = posterior[keys.BELIEF][:, :-1].clone(), posterior[keys.STATE][:, :-1].clone()
    want_h[0, 2], want_z[0, 2] = 0.0, 0.0  # row 3 is an episode's first: nothing before it
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)
    torch.testing.assert_close(z, want_z, rtol=0, atol=0)
    assert not h.requires_grad
    plain = agent_cls((3, 64, 64), 1, **cfg)
    assert keys.CONTEXT_BELIEF not in plain.train_step(batch)


def test_replay_context_must_be_a_bool():
    with pytest.raises(ValueError, match="replay_context must be true or false, got 1"):
        DreamerAgent((3, 64, 64), 1, replay_context=1, **copy.deepcopy(TINY))


# --- the loop -----------------------------------------------------------------------------------
def _trainer(run_dir, seed=0) -> Trainer:
    torch.manual_seed(seed)
    agent = DreamerAgent((3, 64, 64), 1, replay_context=True, **copy.deepcopy(TINY))
    env = make_dmc_env("cartpole-swingup", seed=seed, render="fast", time_limit=0.4)
    # on disk: its rows live in files, which the write-back changes in place
    replay = SequenceReplay(400, 1, 8, 3, storage="disk", path=run_dir / "replay", seed=seed)
    config = LoopConfig(
        total_frames=120, prefill_steps=30, train_ratio=16, batch_size=3, seq_len=8,
        log_every=1000, eval_every=0, report_every=0, checkpoint_every=0,
    )  # fmt: skip
    return Trainer(
        agent, env, replay, RunLogger("tb", log_dir=str(run_dir)), run_dir, config, seed=seed,
        action_dim=1,
    )  # fmt: skip


def test_the_loop_writes_every_updates_posteriors_back_to_the_rows_it_filtered(tmp_path):
    trainer = _trainer(tmp_path / "full")
    agent, replay = trainer.agent, trainer.replay
    writes, step = [], agent.train_step

    def spy(batch):
        out = step(batch)
        writes.append((batch[keys.REPLAY_ID].clone(), out[keys.CONTEXT_BELIEF].clone()))
        return out

    agent.train_step = spy
    trainer.run(progress=False)
    trainer.env.close()
    assert trainer.counters["updates"] == len(writes) > 5
    # The last update's rows hold what it wrote (an earlier one's may have been written over
    # by a later window); where its windows overlap, the posterior from the later position in
    # its window (the one that filtered more of the episode before the row).
    ids, h = writes[-1]
    rows_written = ids[:, 1:]
    stored = replay.read(rows_written)[keys.CONTEXT_BELIEF]
    for b, pos in torch.cartesian_prod(torch.arange(3), torch.arange(7)).tolist():
        same = (rows_written == rows_written[b, pos]).nonzero().tolist()
        b_kept, pos_kept = max(same, key=lambda bp: (bp[1], bp[0]))
        assert torch.equal(stored[b, pos], h[b_kept, pos_kept]), (b, pos)
    assert not any(k in trainer._pending for k in keys.CONTEXT_KEYS)  # not kept as metrics
    rows = replay.read(torch.arange(replay.steps))
    assert rows[keys.CONTEXT_BELIEF][rows[keys.IS_FIRST][:, 0]].abs().sum() == 0  # first rows

    # Stopped mid-training and resumed (another seed: everything must come from the
    # checkpoint), the run ends as the uninterrupted one: weights, and every stored context.
    part = _trainer(tmp_path / "part")
    part.run(progress=False, on_iteration=lambda t: t.counters["updates"] == 3 and t.request_stop())
    part.env.close()
    assert 0 < part.counters["frames"] < 120
    resumed = _trainer(tmp_path / "part", seed=1)
    resumed.load()
    resumed.run(progress=False)
    resumed.env.close()
    assert resumed.counters == trainer.counters
    again = resumed.replay.read(torch.arange(replay.steps))
    for key in (*keys.CONTEXT_KEYS, keys.PIXELS):
        assert torch.equal(again[key], rows[key]), key
    mine, theirs = trainer.agent.state_dict()["modules"], resumed.agent.state_dict()["modules"]
    assert all(torch.equal(value, theirs[key]) for key, value in mine.items())
