"""aefrl.devices: one spelling per device."""

import pytest
import torch

from aefrl.devices import canonical_device, usable_device


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


def test_usable_device_names_what_is_wrong_and_lets_a_loaders_other_types_through():
    assert usable_device(torch.device("cpu")) == torch.device("cpu")
    assert usable_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"^map_location=gpu is not a device: use auto, cpu"):
        usable_device("gpu", "map_location=")
    with pytest.raises(ValueError, match=r"^device=meta is not supported"):
        usable_device("meta")
    assert usable_device("meta", other_types=True) == torch.device("meta")
    missing = f"cuda:{torch.cuda.device_count() + 1}"  # no CUDA, or not that many GPUs
    with pytest.raises(ValueError, match=f"^--device {missing} "):
        usable_device(missing, "--device ", other_types=True)
