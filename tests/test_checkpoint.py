"""Atomic checkpoints: round trip, clear errors, no damage from an interrupted save."""

import random

import numpy as np
import pytest
import torch

from aefrl.checkpoint import (
    CHECKPOINT_FORMAT,
    TRAINING_KEYS,
    CheckpointError,
    check_contents,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_round_trip_with_numpy_and_rng_states(tmp_path):
    payload = {
        "format": 1,
        "weights": {"w": torch.randn(3, 4)},
        "env": {"qpos": np.arange(5.0), "step": np.int64(7), "nested": [np.ones(2, np.uint32)]},
        "rng": rng_state(),
    }
    save_checkpoint(tmp_path / "ck.pt", payload)
    back = load_checkpoint(tmp_path / "ck.pt")
    assert torch.equal(back["weights"]["w"], payload["weights"]["w"])
    assert np.array_equal(back["env"]["qpos"], np.arange(5.0)) and back["env"]["step"] == 7
    assert back["env"]["nested"][0].dtype == np.uint32
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(back["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_missing_and_corrupt_checkpoints_raise_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope")
    save_checkpoint(tmp_path / "checkpoint.pt", {"format": 1, "x": torch.zeros(1000)})
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)  # a run directory works too
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an aefrl checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    # A run's configuration given for its checkpoint: said, not "unreadable: IndexError".
    (tmp_path / "run_config.yaml").write_text("seed: 0\n")
    with pytest.raises(CheckpointError, match=r"run_config.yaml is a run's yaml file, not a"):
        load_checkpoint(tmp_path / "run_config.yaml")


def test_a_zeroed_block_inside_a_record_is_refused(tmp_path):
    """torch.load reads a record whose bytes changed (a bit flip, a zeroed disk block) without
    a word: a resume trained on with 1024 optimiser-state values silently zero."""
    path = tmp_path / "checkpoint.pt"
    weights = torch.arange(1.0, 4097.0)
    save_checkpoint(path, {"format": 1, "w": weights, "v": torch.ones(3)})
    data = bytearray(path.read_bytes())
    at = data.find(weights.numpy().tobytes())
    assert at > 0
    data[at + 4000 : at + 8096] = bytes(4096)  # inside the record, framing intact
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["w"], weights)  # torch: no error
    with pytest.raises(CheckpointError, match=r"is corrupt: its record \S+ fails its checksum"):
        load_checkpoint(path)


def test_a_flipped_bit_in_a_records_directory_entry_is_one_sentence(tmp_path):
    """A record's method read as deflate (or encryption flagged) raised zlib's error (or a
    NotImplementedError, a RuntimeError) from the check itself: a traceback, not one line."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 1, "w": torch.arange(4096.0)})
    clean = path.read_bytes()
    entry = clean.rindex(b"PK\x01\x02")  # the last record's central-directory entry
    for offset, value in ((10, 8), (10, 1), (8, 1)):  # method: deflate, shrink; flags: encrypted
        data = bytearray(clean)
        data[entry + offset] = value
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="is corrupt: its record"):
            load_checkpoint(path)


def test_a_checkpoint_saved_without_checksums_still_loads(tmp_path, monkeypatch):
    """torch can be told not to compute the records' CRC-32 (it stores 0): nothing to check."""
    from torch.utils.serialization import config

    monkeypatch.setattr(config.save, "compute_crc32", False)
    save_checkpoint(tmp_path / "checkpoint.pt", {"format": 1, "w": torch.arange(4096.0)})
    assert torch.equal(load_checkpoint(tmp_path)["w"], torch.arange(4096.0))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 1, "v": 1})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C arrived mid-write

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"format": 1, "v": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left


def test_a_full_disk_is_one_sentence_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The scripts print a CheckpointError as one line (exit 2); an OSError was a traceback."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 1, "v": 1})

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, {"format": 1, "v": 2})
    monkeypatch.undo()
    assert str(info.value) == (
        f"could not write the checkpoint {path}: No space left on device; the previous one, if "
        "any, is intact"
    )
    assert load_checkpoint(path)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    # torch's zip writer reports a disk that fills mid-write as a RuntimeError (seen on a 3 MB
    # tmpfs), which was a traceback and exit 1
    monkeypatch.setattr(torch, "save", lambda *a, **k: _raise(RuntimeError(ZIP_WRITE_FAILED)))
    with pytest.raises(CheckpointError, match=r"torch could not write it \(is the disk full\?\)"):
        save_checkpoint(path, {"format": 1, "v": 3})
    monkeypatch.undo()
    assert load_checkpoint(path)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    # any other RuntimeError keeps its own first line (a CUDA error is no full disk)
    monkeypatch.setattr(torch, "save", lambda *a, **k: _raise(RuntimeError("CUDA error: x\nmore")))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: CUDA error: x; the previous"):
        save_checkpoint(path, {"format": 1, "v": 3})
    monkeypatch.setattr(torch, "save", lambda *a, **k: _raise(RuntimeError(" ")))  # no message
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: RuntimeError; the previous"):
        save_checkpoint(path, {"format": 1, "v": 3})


ZIP_WRITE_FAILED = "[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 960"


def _raise(exc: BaseException):
    raise exc


def test_contents_are_checked_against_this_versions_format_and_keys():
    full = {key: {} for key in TRAINING_KEYS} | {"format": CHECKPOINT_FORMAT}
    check_contents(full, "ck.pt")
    with pytest.raises(CheckpointError, match=r"ck\.pt lacks run_config, agent, loop_config"):
        check_contents({"format": CHECKPOINT_FORMAT}, "ck.pt")
    with pytest.raises(CheckpointError, match="has format 99; this aefrl reads format 1"):
        check_contents(full | {"format": 99}, "ck.pt")
    check_contents({"format": CHECKPOINT_FORMAT, "run_config": {}, "agent": {}}, "ck.pt",
                   required=("run_config", "agent"))  # fmt: skip


def test_cuda_rng_states_of_more_gpus_than_this_machine_has_restore_those_it_has(monkeypatch):
    """A run saved on a 2-GPU machine resumed on a 1-GPU one: set_rng_state_all raised an
    IndexError traceback for the second GPU. Each GPU this machine has gets its own state."""
    restored, state = [], rng_state()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((s, i)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", None)  # it must not be called
    gpu0, gpu1 = torch.ByteTensor([0, 1]), torch.ByteTensor([2, 3])
    set_rng_state({**state, "cuda": [gpu0, gpu1]})
    assert restored == [(gpu0, 0)]


def test_an_atomic_write_through_a_symlink_replaces_its_target(tmp_path):
    """eval.py --out link.json turned the link into a file of its own and left the target
    as it was (os.replace renames onto the path given)."""
    from aefrl.checkpoint import write_text_atomically

    target = tmp_path / "results" / "eval.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text_atomically(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["eval.json"]  # no temp left
