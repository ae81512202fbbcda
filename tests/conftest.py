"""Test-wide settings: passive OpenMP waits, CPU, seeded."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["vae", "aef", "aef_partition"])
def kind(request):
    """Every observation model, for tests that must hold for all three."""
    return request.param
