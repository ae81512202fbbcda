"""SequenceReplay: windows are contiguous rows of one stream, uniform, resumable (RAM and disk)."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from tensordict import TensorDict

from aefrl import keys
from aefrl.checkpoint import load_checkpoint, save_checkpoint
from aefrl.replay import STEP_STAMP, SequenceReplay

PIXEL_SHAPE = (3, 8, 8)


def make_rows(num_envs: int, step: int) -> TensorDict:
    """Arrival-layout rows whose data encode (stream, step): ``prev_action = [step, env]`` and
    pixels ``[0, 0, 0] = env``, ``[1, 0, 0] = step % 256``."""
    env = torch.arange(num_envs)
    pixels = torch.zeros(num_envs, *PIXEL_SHAPE, dtype=torch.uint8)
    pixels[:, 0, 0, 0] = env.to(torch.uint8)
    pixels[:, 1, 0, 0] = step % 256
    prev_action = torch.stack([torch.full((num_envs,), float(step)), env.float()], -1)
    is_first = torch.full((num_envs, 1), step % 7 == 0)
    return TensorDict(
        {
            keys.PIXELS: pixels,
            keys.PREV_ACTION: prev_action,
            keys.REWARD: torch.full((num_envs, 1), 0.5 * step),
            keys.IS_FIRST: is_first,
            keys.TERMINATED: torch.zeros(num_envs, 1, dtype=torch.bool),
        },
        batch_size=[num_envs],
    )


def fill(replay: SequenceReplay, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        replay.extend(make_rows(replay.num_envs, step))


def window_ids(batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, env) of every row of a ``[B, T]`` batch, checked against the pixel encoding."""
    step = batch[keys.PREV_ACTION][..., 0].long()
    env = batch[keys.PREV_ACTION][..., 1].long()
    assert torch.equal(batch[keys.PIXELS][..., 0, 0, 0].long(), env)
    assert torch.equal(batch[keys.PIXELS][..., 1, 0, 0].long(), step % 256)
    assert torch.equal(batch[keys.REWARD][..., 0], 0.5 * step.float())
    return step, env


def assert_valid_windows(batch: TensorDict, lowest: int, highest: int) -> None:
    step, env = window_ids(batch)
    assert (env == env[:, :1]).all(), "a window mixes two env streams"
    assert (step.diff(dim=1) == 1).all(), "a window is not consecutive rows"
    assert step.min() >= lowest and step.max() <= highest, "a window reaches stale rows"


def assert_same(a: TensorDict, b: TensorDict) -> None:
    assert set(a.keys()) == set(b.keys())
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_shapes_dtypes_and_keys():
    replay = SequenceReplay(40, 2, seq_len=4, batch_size=5, seed=0)
    fill(replay, 9)
    batch = replay.sample()
    assert batch.batch_size == torch.Size([5, 4])
    assert batch[keys.PIXELS].shape == (5, 4, *PIXEL_SHAPE)
    assert batch[keys.PIXELS].dtype == torch.uint8
    assert batch[keys.PREV_ACTION].shape == (5, 4, 2)
    assert batch[keys.PREV_ACTION].dtype == torch.float32
    assert batch[keys.REWARD].shape == (5, 4, 1)
    assert batch[keys.IS_FIRST].dtype == torch.bool
    assert batch[keys.TERMINATED].shape == (5, 4, 1)
    assert STEP_STAMP not in batch.keys(include_nested=True)
    assert batch.device == torch.device("cpu")
    assert len(replay) == 18 and replay.steps == 9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_on_cuda():
    replay = SequenceReplay(40, 2, seq_len=4, batch_size=5, device="cuda", seed=0)
    fill(replay, 9)
    batch = replay.sample()
    assert batch[keys.PIXELS].device.type == "cuda"
    assert batch[keys.PIXELS].dtype == torch.uint8
    assert_valid_windows(batch.cpu(), 0, 8)
    assert replay.sample(out=batch) is batch
    assert_valid_windows(batch.cpu(), 0, 8)


@pytest.mark.parametrize("storage", ["memory", "device", "disk"])
def test_windows_stay_in_one_stream_and_behind_the_cursor(storage, tmp_path):
    # 10 rows per stream and 37 writes: the ring has wrapped three times.
    path = tmp_path / "replay" if storage == "disk" else None
    replay = SequenceReplay(30, 3, seq_len=4, batch_size=16, storage=storage, path=path, seed=1)
    fill(replay, 37)
    envs = set()
    for _ in range(100):
        batch = replay.sample()
        assert_valid_windows(batch, lowest=27, highest=36)
        envs.update(window_ids(batch)[1][:, 0].tolist())
    assert envs == {0, 1, 2}


def _device_storage_matches_memory_storage(device: str) -> None:
    mem = SequenceReplay(30, 3, seq_len=4, batch_size=6, seed=2)
    dev = SequenceReplay(30, 3, seq_len=4, batch_size=6, storage="device", device=device, seed=2)
    fill(mem, 25)
    fill(dev, 25)
    assert dev._flat[keys.PIXELS].device.type == torch.device(device).type  # rows live there
    assert f"storage=device:{device}" in repr(dev)
    for _ in range(5):  # same generator, same windows, gathered where the rows live
        batch = dev.sample()
        assert batch[keys.PIXELS].device.type == torch.device(device).type
        assert_same(mem.sample(), batch.cpu())
    buffer = io.BytesIO()
    torch.save(dev.state_dict(), buffer)
    buffer.seek(0)
    resumed = SequenceReplay(
        30, 3, seq_len=4, batch_size=6, storage="device", device=device, seed=9
    )
    resumed.load_state_dict(torch.load(buffer, map_location="cpu"))  # a CPU-side checkpoint
    assert resumed._flat[keys.PIXELS].device.type == torch.device(device).type
    for step in range(25, 35):
        assert_same(mem.sample(), resumed.sample().cpu())
        mem.extend(make_rows(3, step))
        resumed.extend(make_rows(3, step))


def test_device_storage_samples_like_memory_storage_and_resumes():
    _device_storage_matches_memory_storage("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_storage_on_cuda():
    _device_storage_matches_memory_storage("cuda")


def test_valid_range_before_the_ring_is_full():
    replay = SequenceReplay(100, 2, seq_len=4, batch_size=64, seed=0)
    fill(replay, 6)
    assert len(replay) == 12 and replay.num_valid_windows == 2 * 3
    starts = set()
    for _ in range(20):
        batch = replay.sample()
        assert_valid_windows(batch, lowest=0, highest=5)
        step, env = window_ids(batch)
        starts.update(zip(env[:, 0].tolist(), step[:, 0].tolist()))
    assert starts == {(e, s) for e in range(2) for s in range(3)}


def test_uniform_over_all_valid_windows():
    replay = SequenceReplay(20, 2, seq_len=4, batch_size=100, seed=3)
    fill(replay, 23)  # steps 13..22 held, starts 13..19 in each of 2 streams
    assert replay.num_valid_windows == 14
    counts = Counter()
    for _ in range(100):
        step, env = window_ids(replay.sample())
        counts.update(zip(env[:, 0].tolist(), step[:, 0].tolist()))
    assert set(counts) == {(e, s) for e in range(2) for s in range(13, 20)}
    expected = 100 * 100 / 14
    assert all(abs(n - expected) < 0.2 * expected for n in counts.values()), counts


def test_sampling_uses_its_own_generator():
    a = SequenceReplay(40, 2, seq_len=4, batch_size=8, seed=7)
    b = SequenceReplay(40, 2, seq_len=4, batch_size=8, seed=7)
    fill(a, 15)
    fill(b, 15)
    torch.manual_seed(123)
    first = a.sample()
    global_state = torch.get_rng_state()
    torch.manual_seed(999)
    assert_same(first, b.sample())
    torch.set_rng_state(global_state)
    a.sample()
    assert torch.equal(torch.get_rng_state(), global_state)


def test_a_sample_from_a_given_generator_leaves_the_replays_own_stream_alone():
    """Reports draw their batch this way, so the training batches after one are unchanged."""
    a = SequenceReplay(40, 2, seq_len=4, batch_size=8, seed=7)
    b = SequenceReplay(40, 2, seq_len=4, batch_size=8, seed=7)
    fill(a, 15)
    fill(b, 15)
    side = a.sample(generator=torch.Generator().manual_seed(1))
    own = a.sample()
    assert_same(own, b.sample())  # b drew no side batch: a's own stream did not move
    assert not torch.equal(side["pixels"], own["pixels"])
    assert_same(side, b.sample(generator=torch.Generator().manual_seed(1)))


def test_sample_into_a_previous_batch():
    a = SequenceReplay(40, 2, seq_len=4, batch_size=8, seed=5)
    b = SequenceReplay(40, 2, seq_len=4, batch_size=8, seed=5)
    fill(a, 15)
    fill(b, 15)
    reused = a.sample()
    pixels = reused[keys.PIXELS]
    b.sample()
    assert_same(a.sample(out=reused), b.sample())
    assert reused[keys.PIXELS] is pixels  # written in place, nothing allocated
    with pytest.raises(ValueError, match="out must be a batch returned by an earlier sample"):
        a.sample(out=reused[:, :2])
    with pytest.raises(ValueError, match="out must be a batch"):
        a.sample(out=reused.exclude(keys.REWARD))


def test_device_is_kept_as_its_tensors_report_it(monkeypatch):
    """``sample(out=...)`` checks the batch's device against the replay's, and tensors report
    ``cuda:0`` (not ``cuda``) and ``cpu`` (not ``cpu:0``): a replay built with an unindexed
    CUDA device, as scripts/train.py builds it, must accept its own batches back."""
    replay = SequenceReplay(40, 2, seq_len=4, batch_size=3, device="cpu:0", seed=0)
    fill(replay, 9)
    batch = replay.sample()
    assert replay.sample(out=batch) is batch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for storage in ("memory", "device"):  # nothing touches the device before the first extend
        cuda = SequenceReplay(40, 2, seq_len=4, batch_size=3, storage=storage, device="cuda")
        assert cuda.device == torch.device("cuda", 1)


def test_not_ready_raises_a_clear_error():
    replay = SequenceReplay(40, 2, seq_len=5, batch_size=4, seed=0)
    fill(replay, 4)
    assert not replay.ready and replay.num_valid_windows == 0
    with pytest.raises(RuntimeError, match=r"cannot sample yet.*1 more"):
        replay.sample()
    fill(replay, 1, start=4)
    assert replay.ready
    replay.sample()


def test_memory_state_dict_round_trip():
    replay = SequenceReplay(30, 3, seq_len=4, batch_size=6, seed=0)
    fill(replay, 25)
    replay.sample()
    buffer = io.BytesIO()
    torch.save(replay.state_dict(), buffer)
    buffer.seek(0)
    resumed = SequenceReplay(30, 3, seq_len=4, batch_size=6, seed=99)
    resumed.load_state_dict(torch.load(buffer))
    assert len(resumed) == len(replay) and resumed.steps == replay.steps
    for step in range(25, 40):  # training goes on identically in both
        assert_same(replay.sample(), resumed.sample())
        replay.extend(make_rows(3, step))
        resumed.extend(make_rows(3, step))
    assert_valid_windows(resumed.sample(), lowest=30, highest=39)


def _through_a_checkpoint(state: dict, tmp_path) -> dict:
    """``state`` saved and read back as scripts/train.py does (atomic file, weights_only load)."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 1, "replay": state})
    return load_checkpoint(path)["replay"]


def _row_bytes(replay: SequenceReplay) -> int:
    """Bytes of one stored row of one stream, the step stamp included."""
    return sum(v[0].numel() * v.element_size() for v in replay._flat.values())


def _saved_bytes(state) -> int:
    """Bytes that torch.save writes for the tensors in ``state``: each tensor's whole storage
    (a view of a larger block writes all of the block), each storage once."""
    storages = {}

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    visit(state)
    return sum(storages.values())


def test_memory_state_dict_holds_only_the_written_rows(tmp_path):
    replay = SequenceReplay(20_000, 2, seq_len=4, batch_size=3, seed=0)
    fill(replay, 50)
    written = 50 * 2 * _row_bytes(replay)  # 21 KB; the whole block is 4.3 MB
    state = replay.state_dict()
    assert written <= _saved_bytes(state) - _saved_bytes(state["generator"]) < 2 * written
    _through_a_checkpoint(state, tmp_path)
    assert (tmp_path / "checkpoint.pt").stat().st_size < written + 64_000
    assert state["version"] == 2 and len(state["data"]["rows"][STEP_STAMP]) == 50
    # Once the ring is full (here wrapped), every row is saved, none twice.
    full = SequenceReplay(20, 2, seq_len=4, batch_size=3, seed=0)
    fill(full, 27)
    state = full.state_dict()
    assert _saved_bytes(state) - _saved_bytes(state["generator"]) == 20 * _row_bytes(full)


def _assert_continues_alike(replay: SequenceReplay, resumed: SequenceReplay, steps: int) -> None:
    """Both replays go on with the same extends and give the same samples, through a wrap."""
    assert (len(resumed), resumed.steps) == (len(replay), replay.steps)
    assert resumed._flat[keys.PIXELS].shape[0] == resumed.capacity  # a full-size block again
    for step in range(steps, steps + 2 * replay.rows_per_env + 3):
        assert_same(replay.sample(), resumed.sample())
        replay.extend(make_rows(replay.num_envs, step))
        resumed.extend(make_rows(replay.num_envs, step))
    assert_same(replay.sample(), resumed.sample())


@pytest.mark.parametrize("storage", ["memory", "device"])
@pytest.mark.parametrize("num_envs", [1, 2])
@pytest.mark.parametrize("steps", [6, 10, 27])  # part of the ring, all of it, wrapped around
def test_checkpoint_round_trip_continues_exactly(storage, num_envs, steps, tmp_path):
    settings = {"storage": storage, "device": "cpu"}
    replay = SequenceReplay(10 * num_envs, num_envs, seq_len=4, batch_size=8, seed=0, **settings)
    fill(replay, steps)
    replay.sample()
    state = _through_a_checkpoint(replay.state_dict(), tmp_path)
    assert len(state["data"]["rows"][keys.PIXELS]) == min(steps, 10)
    resumed = SequenceReplay(10 * num_envs, num_envs, seq_len=4, batch_size=8, seed=5, **settings)
    resumed.load_state_dict(state)
    _assert_continues_alike(replay, resumed, steps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("steps", [6, 27])
def test_checkpoint_round_trip_of_a_cuda_device_storage(steps, tmp_path):
    replay = SequenceReplay(20, 2, seq_len=4, batch_size=8, storage="device", device="cuda", seed=0)
    fill(replay, steps)
    state = replay.state_dict()
    if steps < 10:  # copied out of the GPU, not kept on it
        assert state["data"]["rows"][keys.PIXELS].device.type == "cpu"
    state = _through_a_checkpoint(state, tmp_path)
    resumed = SequenceReplay(20, 2, seq_len=4, batch_size=8, storage="device", device="cuda")
    resumed.load_state_dict(state)
    assert resumed._flat[keys.PIXELS].device.type == "cuda"
    _assert_continues_alike(replay, resumed, steps)


@pytest.mark.parametrize("storage", ["memory", "device"])
@pytest.mark.parametrize("steps", [6, 27])
def test_version_1_state_with_the_whole_block_still_loads(storage, steps, tmp_path):
    settings = {"storage": storage, "device": "cpu"}
    replay = SequenceReplay(20, 2, seq_len=4, batch_size=8, seed=0, **settings)
    fill(replay, steps)
    # What state_dict wrote before version 2: torchrl's state of the whole storage.
    old = replay.state_dict() | {"version": 1, "data": replay._storage.state_dict()}
    assert old["data"]["_storage"][keys.PIXELS].shape[:2] == (10, 2)
    resumed = SequenceReplay(20, 2, seq_len=4, batch_size=8, seed=5, **settings)
    resumed.load_state_dict(_through_a_checkpoint(old, tmp_path))
    _assert_continues_alike(replay, resumed, steps)


def test_load_state_dict_refuses_unknown_versions_and_mismatched_rows():
    replay = SequenceReplay(20, 2, seq_len=4, batch_size=3, seed=0)
    fill(replay, 6)
    state = replay.state_dict()
    with pytest.raises(ValueError, match=r"version 3 is not supported \(expected one of \(1, 2\)"):
        SequenceReplay(20, 2, seq_len=4, batch_size=3).load_state_dict(state | {"version": 3})
    rows = {key: value[:5] for key, value in state["data"]["rows"].items()}
    with pytest.raises(ValueError, match="stored rows do not match this replay state"):
        SequenceReplay(20, 2, seq_len=4, batch_size=3).load_state_dict(
            state | {"data": {"rows": rows}}
        )


def test_disk_reattaches_from_a_fresh_object(tmp_path):
    path = tmp_path / "replay"
    replay = SequenceReplay(30, 3, seq_len=4, batch_size=6, storage="disk", path=path, seed=0)
    fill(replay, 25)
    buffer = io.BytesIO()
    torch.save(replay.state_dict(), buffer)
    expected = [replay.sample() for _ in range(5)]
    del replay

    buffer.seek(0)
    resumed = SequenceReplay(30, 3, seq_len=4, batch_size=6, storage="disk", path=path)
    resumed.load_state_dict(torch.load(buffer))
    assert len(resumed) == 30
    for batch in expected:
        assert_same(batch, resumed.sample())
    fill(resumed, 12, start=25)
    assert_valid_windows(resumed.sample(), lowest=27, highest=36)


def test_disk_rows_are_made_durable_with_the_checkpoint(tmp_path, monkeypatch):
    """The rows a checkpoint names were left in the page cache (a power loss would keep the
    checkpoint, which is fsynced, but lose its last rows): state_dict fsyncs every file."""
    import aefrl.replay as replay_module

    path = tmp_path / "replay"
    replay = SequenceReplay(30, 3, seq_len=4, batch_size=6, storage="disk", path=path, seed=0)
    fill(replay, 10)
    synced = []
    monkeypatch.setattr(replay_module, "fsync_path", lambda file: synced.append(file.name))
    replay.state_dict()
    assert {f.name for f in path.rglob("*") if f.is_file()} <= set(synced)
    assert "pixels.memmap" in synced


def test_disk_metadata_cut_short_by_a_kill_is_restored_from_the_checkpoint(tmp_path):
    """torchrl's dumps rewrites its JSON metadata in place at every checkpoint; a kill in that
    window leaves empty files, which the checkpoint's own copy replaces on resume."""
    path = tmp_path / "replay"
    replay = SequenceReplay(30, 3, seq_len=4, batch_size=6, storage="disk", path=path, seed=0)
    fill(replay, 25)
    state = replay.state_dict()
    expected = [replay.sample() for _ in range(3)]
    del replay
    names = sorted(f.name for f in path.glob("*.json"))
    assert names == ["meta.json", "storage_metadata.json"]
    for name in names:
        (path / name).write_text("")  # truncated, as a kill between truncate and write leaves it
    resumed = SequenceReplay(30, 3, seq_len=4, batch_size=6, storage="disk", path=path)
    resumed.load_state_dict(state)
    for batch in expected:
        assert_same(batch, resumed.sample())
    assert not list(path.glob("*.tmp"))


@pytest.mark.parametrize("cut_short", [False, True])
def test_disk_excludes_rows_written_after_the_checkpoint(tmp_path, monkeypatch, cut_short):
    """The run goes on after its checkpoint, then dies: the rows it wrote since must not be
    sampled as the steps they replaced. ``cut_short``: the kill lands inside extend(), after
    the new pixels and before the row's stamp (written last), which still named the step it
    replaced, so a resume sampled those pixels as that step."""
    path = tmp_path / "replay"
    replay = SequenceReplay(30, 3, seq_len=4, batch_size=32, storage="disk", path=path, seed=0)
    fill(replay, 25)
    state = replay.state_dict()
    fill(replay, 2 if cut_short else 3, start=25)
    if cut_short:

        def killed_while_writing(index, data, *args, **kwargs):  # the pixels land, then the kill
            replay._flat[keys.PIXELS].view(replay.rows_per_env, 3, *PIXEL_SHAPE)[index] = 200
            raise KeyboardInterrupt

        monkeypatch.setattr(replay._storage, "set", killed_while_writing)
        with pytest.raises(KeyboardInterrupt):
            replay.extend(make_rows(3, 27))
    resumed = SequenceReplay(30, 3, seq_len=4, batch_size=32, storage="disk", path=path)
    with pytest.warns(UserWarning, match=r"3 rows .* written after this checkpoint"):
        resumed.load_state_dict(state)
    # Steps 15..17 were overwritten by the lost steps 25..27: 18..24 remain valid.
    assert resumed.valid_rows_per_env == 7
    for _ in range(20):
        assert_valid_windows(resumed.sample(), lowest=18, highest=24)
    fill(resumed, 3, start=25)
    assert resumed.valid_rows_per_env == 10
    assert_valid_windows(resumed.sample(), lowest=18, highest=27)


def test_disk_resumes_a_checkpoint_of_no_rows_after_a_kill(tmp_path):
    """A checkpoint taken before the first row (a run stopped before its first iteration),
    then a resumed run that wrote rows and was killed before its next checkpoint: every later
    resume was refused at its first extend ("already holds replay files"). The rows after the
    checkpoint are dropped and the replay starts afresh."""
    path = tmp_path / "replay"
    first = SequenceReplay(30, 3, 4, 6, storage="disk", path=path, seed=0)
    state = first.state_dict()
    fill(first, 7)  # killed before it checkpointed these
    resumed = SequenceReplay(30, 3, 4, 6, storage="disk", path=path)
    with pytest.warns(UserWarning, match=r"held no rows; removing the \d+ replay files"):
        resumed.load_state_dict(state)
    assert len(resumed) == 0
    fill(resumed, 9, start=50)
    assert len(resumed) == 9 * 3  # rows of the three env streams
    assert_valid_windows(resumed.sample(), lowest=50, highest=58)
    # A replay already writing (a trainer that loads an early checkpoint) keeps its open files.
    resumed.load_state_dict(state)
    fill(resumed, 6, start=80)
    resumed.state_dict()  # its files are all there
    assert_valid_windows(resumed.sample(), lowest=80, highest=85)


def test_disk_refuses_files_of_another_run(tmp_path):
    first = SequenceReplay(30, 3, 4, 6, storage="disk", path=tmp_path / "a", seed=0)
    fill(first, 20)
    state = first.state_dict()
    with pytest.raises(ValueError, match="already holds replay files"):
        fill(SequenceReplay(30, 3, 4, 6, storage="disk", path=tmp_path / "a"), 1)
    other = SequenceReplay(30, 3, 4, 6, storage="disk", path=tmp_path / "b", seed=0)
    fill(other, 5, start=100)
    other.state_dict()
    with pytest.raises(ValueError, match="do not match"):
        SequenceReplay(30, 3, 4, 6, storage="disk", path=tmp_path / "b").load_state_dict(state)
    with pytest.raises(ValueError, match="no replay files"):
        SequenceReplay(30, 3, 4, 6, storage="disk", path=tmp_path / "c").load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 0}, "capacity must be a positive int"),
        ({"num_envs": 0}, "num_envs must be a positive int"),
        ({"seq_len": 2.5}, "seq_len must be a positive int"),
        ({"seq_len": 1}, r"seq_len must be at least 2 \(a window of one step has no transition"),
        ({"batch_size": -1}, "batch_size must be a positive int"),
        ({"capacity": 10, "num_envs": 3}, "at least num_envs \\* seq_len = 12"),
        ({"storage": "gpu"}, "storage must be one of"),
        ({"storage": "disk"}, "needs path="),
        ({"path": "/tmp/x"}, "path is only used with storage='disk'"),
        ({"seed": "zero"}, "seed must be an int"),
        ({"device": "nonsense"}, "device must name a torch device"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"capacity": 40, "num_envs": 2, "seq_len": 4, "batch_size": 3} | kwargs
    with pytest.raises(ValueError, match=message):
        SequenceReplay(
            args.pop("capacity"), args.pop("num_envs"), args.pop("seq_len"), args.pop("batch_size"),
            **args,
        )  # fmt: skip


def test_the_shortest_window_is_two_steps():
    replay = SequenceReplay(40, 2, seq_len=2, batch_size=3, seed=0)
    fill(replay, 2)
    assert_valid_windows(replay.sample(), lowest=0, highest=1)


def test_capacity_rounds_down_to_whole_rows_per_stream():
    replay = SequenceReplay(31, 3, seq_len=4, batch_size=2)
    assert replay.capacity == 30 and replay.rows_per_env == 10


def test_bad_rows_raise_clear_errors():
    replay = SequenceReplay(40, 2, seq_len=4, batch_size=3)
    with pytest.raises(ValueError, match="batch_size \\[2\\]"):
        replay.extend(make_rows(3, 0))
    with pytest.raises(ValueError, match="expects a TensorDict"):
        replay.extend({"pixels": torch.zeros(2, 3, 8, 8)})
    replay.extend(make_rows(2, 0))
    with pytest.raises(ValueError, match="same keys"):
        replay.extend(make_rows(2, 1).exclude(keys.REWARD))
    rows = make_rows(2, 1)
    rows[keys.PIXELS] = rows[keys.PIXELS].float()
    with pytest.raises(ValueError, match=r"'pixels' arrived as torch\.float32"):
        replay.extend(rows)


def test_load_state_dict_rejects_other_settings():
    replay = SequenceReplay(40, 2, seq_len=4, batch_size=3, seed=0)
    fill(replay, 5)
    state = replay.state_dict()
    with pytest.raises(ValueError, match="capacity=40 but this replay has capacity=60"):
        SequenceReplay(60, 2, seq_len=4, batch_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="not a SequenceReplay state dict"):
        SequenceReplay(40, 2, seq_len=4, batch_size=3).load_state_dict({"steps": 3})
