"""aefrl.devices: one spelling per device."""

import pytest
import torch

from aefrl.devices import canonical_device


def test_cpu_spellings_are_one_device():
    assert canonical_device("cpu:0") == canonical_device(torch.device("cpu")) == torch.device("cpu")
    assert canonical_device("meta") == torch.device("meta")
    with pytest.raises(RuntimeError):
        canonical_device("gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_unindexed_cuda_is_the_current_device():
    assert canonical_device("cuda") == torch.zeros(1, device="cuda").device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_unindexed_cuda_without_cuda_is_left_for_the_callers_error():
    """It asked torch for the current CUDA device: an AssertionError, not the caller's message."""
    assert canonical_device("cuda") == torch.device("cuda")
