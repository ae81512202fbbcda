"""aefrl.seeding: a run's streams are distinct, in range and reproducible."""

import pytest
import torch

from aefrl.seeding import STREAMS, forked_torch_rng, stream_seed


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


def test_forked_torch_rng_seeds_the_body_and_restores_the_cpu_generator():
    torch.manual_seed(5)
    outside = torch.rand(3)
    torch.manual_seed(5)
    with forked_torch_rng(11):
        first = torch.rand(4)
    torch.testing.assert_close(torch.rand(3), outside)  # as if the body had not drawn
    with forked_torch_rng(11):
        torch.testing.assert_close(torch.rand(4), first)
    with forked_torch_rng(12):
        assert not torch.equal(torch.rand(4), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forked_torch_rng_leaves_unforked_cuda_generators_alone():
    torch.cuda.manual_seed(3)
    state = torch.cuda.get_rng_state(0)
    with forked_torch_rng(11):  # CPU only: CUDA device 0 is neither seeded nor restored
        torch.rand(2)
    assert torch.equal(torch.cuda.get_rng_state(0), state)
    with forked_torch_rng(11, [0]):
        first = torch.rand(2, device="cuda:0")
    assert torch.equal(torch.cuda.get_rng_state(0), state)
    with forked_torch_rng(11, [0]):
        assert torch.equal(torch.rand(2, device="cuda:0"), first)
