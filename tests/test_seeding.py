"""aefrl.seeding: a run's streams are distinct, in range and reproducible."""

import pytest

from aefrl.seeding import STREAMS, stream_seed


def test_streams_of_nearby_seeds_do_not_overlap():
    seeds = {
        (seed, stream, i): stream_seed(seed, stream, i)
        for seed in range(4)
        for stream in STREAMS
        for i in range(8)
    }
    assert len(set(seeds.values())) == len(seeds)  # seed + i made (0, 1) and (1, 0) collide
    assert all(0 <= s < 2**32 for s in seeds.values())
    assert stream_seed(2**32 - 1, "eval_env", 10**6) < 2**32  # no offset can leave the range
    assert stream_seed(3, "replay") == stream_seed(3, "replay")  # a function of its arguments
    assert stream_seed(3, "eval") != stream_seed(3, "eval", 0)  # SeedSequence pads with zeros


def test_an_unknown_stream_is_refused():
    with pytest.raises(ValueError, match="stream must be one of env, env_worker, eval_env"):
        stream_seed(0, "evaluation")
