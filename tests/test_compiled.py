"""agent.compile (aefrl/compiled.py): the compiled agent trains like the eager one, with the same
parameter names. Inductor's random numbers are made eager-identical (``fallback_random``), so
the two updates see the same noise and must agree to float tolerance."""

import pytest
import torch
import torch._inductor.config as inductor_config

from aefrl.bench.subjects import Sizes, random_batch
from tests.agents.test_dreamer import TINY

from agents.dreamer import DreamerAgent  # isort: skip

SIZES = Sizes(batch=2, seq=4, action_dim=2)


@pytest.mark.slow
def test_compiled_update_matches_eager_and_keeps_parameter_names(monkeypatch):
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    cfg = {k: dict(v) for k, v in TINY.items()}
    torch.manual_seed(0)
    eager = DreamerAgent((3, 64, 64), SIZES.action_dim, **cfg)
    compiled = DreamerAgent((3, 64, 64), SIZES.action_dim, compile=True, **cfg)
    assert list(compiled.state_dict()["modules"]) == list(eager.state_dict()["modules"])
    compiled.load_state_dict(eager.state_dict())
    for seed in range(2):
        batch = random_batch(SIZES, seed=seed)
        torch.manual_seed(100 + seed)
        want = eager.train_step(batch)
        torch.manual_seed(100 + seed)
        got = compiled.train_step(batch)
        for key in ("loss_obs", "loss_reward", "loss_actor", "loss_value", "grad_norm_model"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4, msg=key)
    # It did run compiled code: dynamo made graphs (RSSM steps, heads).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_planner_compiles_its_world_model_steps():
    from agents.planner import PlannerAgent

    cfg = {k: dict(v) for k, v in TINY.items() if k == "world_model"}
    agent = PlannerAgent((3, 64, 64), 2, compile=True, **cfg)
    rssm = agent.world_model.rssm
    assert hasattr(rssm.img_step, "_torchdynamo_orig_callable")  # compiled lazily, on first call
    assert agent.world_model.reward_head.net._compiled_call_impl is not None
    eager = PlannerAgent((3, 64, 64), 2, **cfg)
    assert list(agent.state_dict()["modules"]) == list(eager.state_dict()["modules"])
