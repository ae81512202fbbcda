"""Shared check of the agents' checkpoint contract (used by test_dreamer.py and test_planner.py)."""

import io

import torch

from tests.world_model.conftest import random_batch


def assert_reloaded_agent_trains_identically(agent, other) -> None:
    """Save ``agent.state_dict()`` (modules and optimisers) through bytes, load it into the fresh
    ``other``, and check both take the same next update on the same batch and noise."""
    buf = io.BytesIO()
    torch.save(agent.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    batch = random_batch(2, 6)
    torch.manual_seed(4)
    m1 = agent.train_step(batch)
    torch.manual_seed(4)
    m2 = other.train_step(batch)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
