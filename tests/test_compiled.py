"""agent.compile (aefrl/compiled.py): the compiled agent trains like the eager one, with the same
parameter names. Inductor's random numbers are made eager-identical (``fallback_random``), so
the two updates see the same noise and must agree to float tolerance."""

import logging

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn

from aefrl.bench.subjects import Sizes, random_batch
from tests.agents.test_dreamer import TINY

from agents.dreamer import DreamerAgent  # isort: skip

SIZES = Sizes(batch=2, seq=4, action_dim=2)


@pytest.mark.slow
@pytest.mark.parametrize("gradient", ["backprop", "reinforce"])  # reinforce: the actor batched
def test_compiled_update_matches_eager_and_keeps_parameter_names(monkeypatch, gradient):
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["actor_loss"]["gradient"] = gradient
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


@pytest.mark.parametrize("mode", ["none", "bf16"])
def test_the_compiled_steps_are_one_graph_each(mode):
    """dynamo traces an RSSM step and an MLP whole: the trunks' precision, read from a
    ContextVar, broke every step into seven graphs (six breaks), each run apart."""
    import torch._dynamo as dynamo

    from aefrl.nn import MLP
    from aefrl.precision import trunk_precision
    from tests.world_model.conftest import ACTIONS, random_batch, tiny_world_model

    wm = tiny_world_model("aef")
    state, action = wm.rssm.initial(4), torch.zeros(4, ACTIONS)
    batch = random_batch(4, 2)
    embed, coords = wm.obs_model.embed(wm.encode_pixels(batch["pixels"][:, 0])[0])
    weights = wm.obs_model.posterior_weights()
    projected = wm.obs_model.project_embed(embed, weights)
    first = batch["is_first"][:, 0]
    mlp = MLP(8, 4, 16, 2)
    with trunk_precision(mode):
        for fn, args in (
            (wm.rssm.img_step, (state, action)),
            (wm.rssm.filter_step, (state, action, projected, coords, first, None, weights)),
            (mlp, (torch.randn(300, 8),)),  # above MIN_ROWS: bf16 in that mode
        ):
            explained = dynamo.explain(fn)(*args)
            assert explained.graph_break_count == 0, explained.break_reasons
            assert explained.graph_count == 1


def test_compiling_raises_dynamos_recompile_limit(monkeypatch):
    """The MLPs' shared forward is compiled per owner, shape and grad mode: more variants than
    dynamo's default limit of 8, past which it would run eagerly without a word."""
    from aefrl.compiled import compile_steps
    from tests.world_model.conftest import tiny_world_model

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    compile_steps(tiny_world_model("aef"))
    assert torch._dynamo.config.recompile_limit >= 64


def test_planner_compiles_its_world_model_steps():
    from agents.planner import PlannerAgent

    cfg = {k: dict(v) for k, v in TINY.items() if k == "world_model"}
    agent = PlannerAgent((3, 64, 64), 2, compile=True, **cfg)
    rssm = agent.world_model.rssm
    assert hasattr(rssm.img_step, "_torchdynamo_orig_callable")  # compiled lazily, on first call
    assert agent.world_model.reward_head.net._compiled_call_impl is not None
    eager = PlannerAgent((3, 64, 64), 2, **cfg)
    assert list(agent.state_dict()["modules"]) == list(eager.state_dict()["modules"])


def test_compile_stats_count_graphs_and_functions_past_the_recompile_limit(monkeypatch):
    """Past dynamo's recompile limit a function runs eagerly for good, said only in a log line:
    the stats count it (once per function, from dynamo's counters) and name it by the watch's
    reading of that line, so a compiled benchmark can say its times are partly eager. The eager
    backend: dynamo's bookkeeping without inductor's compile time."""
    import torch._dynamo as dynamo

    from aefrl.compiled import RecompileLimitWatch, compile_stats

    dynamo.reset()
    monkeypatch.setattr(dynamo.config, "recompile_limit", 2)
    watch = RecompileLimitWatch.install()
    assert RecompileLimitWatch.install() is watch  # one per process
    before = compile_stats()

    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    class Shift(nn.Module):
        def forward(self, x):
            return x - 1

    double, shift = (torch.compile(m(), backend="eager", dynamic=False) for m in (Double, Shift))
    for n in (2, 3):  # two shapes: within the limit
        double(torch.ones(n))
        shift(torch.ones(2))
    mid = compile_stats()
    assert mid["unique_graphs"] - before["unique_graphs"] == 3
    assert mid["recompile_limit_hits"] == before["recompile_limit_hits"]
    for n in (4, 5, 6):  # a third shape passes the limit; later ones run eagerly, unsaid
        torch.testing.assert_close(double(torch.ones(n)), torch.full((n,), 2.0))
    after = compile_stats()
    assert after["recompile_limit_hits"] - mid["recompile_limit_hits"] == 1
    assert after["unique_graphs"] == mid["unique_graphs"]  # no graph made past the limit
    new = set(after["functions_past_limit"]) - set(mid["functions_past_limit"])
    line = Double.forward.__code__.co_firstlineno
    assert new == {f"forward (tests/test_compiled.py:{line})"}, new
    # Every module's function is called forward: a second one past the limit is named apart,
    # and counted with dynamo's warnings silenced (then it cannot be named).
    logger = logging.getLogger("torch._dynamo")
    level = logger.level
    logger.setLevel(logging.ERROR)  # as TORCH_LOGS="-dynamo" does
    try:
        for n in (3, 4, 5):
            shift(torch.ones(n))
    finally:
        logger.setLevel(level)
    silenced = compile_stats()
    assert silenced["recompile_limit_hits"] - after["recompile_limit_hits"] == 1
    assert silenced["functions_past_limit"] == after["functions_past_limit"]


def test_compile_stats_count_the_accumulated_recompile_limit(monkeypatch):
    """dynamo's second limit, on all the variants of one code object across frames, reads as a
    hit too."""
    import torch._dynamo as dynamo

    from aefrl.compiled import RecompileLimitWatch, compile_stats

    if not hasattr(dynamo.config, "accumulated_recompile_limit"):
        pytest.skip("this torch has no accumulated recompile limit")
    dynamo.reset()
    monkeypatch.setattr(dynamo.config, "accumulated_recompile_limit", 2)
    RecompileLimitWatch.install()
    before = compile_stats()

    def scale(x):
        return 3 * x

    f = torch.compile(scale, backend="eager", dynamic=False)
    for n in (2, 3, 4, 5):
        f(torch.ones(n))
    after = compile_stats()
    assert after["recompile_limit_hits"] - before["recompile_limit_hits"] == 1
    assert any(name.startswith("scale (") for name in after["functions_past_limit"])


@pytest.mark.parametrize(
    ("reason", "counted"),
    [
        ("Dynamo recompile limit exceeded\n  Explanation: ...", True),  # torch 2.13
        ("Dynamo cache limit exceeded\n  Explanation: ...", True),  # the registry's older type
        ("recompile_limit reached", True),  # older RecompileLimitExceeded messages
        ("accumulated_recompile_limit reached", True),
        ("accumulated_cache_size_limit reached", True),
        ("Data-dependent branching\n  Explanation: ...", False),  # a graph break, no limit
    ],
)
def test_compile_stats_read_the_limit_in_every_wording(monkeypatch, reason, counted):
    """The GPU machine's torch is older than this one's: dynamo's counter for a function past
    the limit has been worded three ways; other unsupported constructs are not hits. Where the
    counter is missed but the warning named the function, the names count."""
    from collections import Counter

    from torch._dynamo.utils import counters

    from aefrl.compiled import RecompileLimitWatch, compile_stats

    watch = RecompileLimitWatch.install()
    monkeypatch.setitem(counters, "unimplemented", Counter())
    monkeypatch.setattr(watch, "hits", Counter())
    counters["unimplemented"][reason] += 1
    assert compile_stats()["recompile_limit_hits"] == int(counted)
    watch.hits["forward (aefrl/nn.py:97)"] += 1
    watch.hits["forward (a (copy)/b.py:3)"] += 1
    stats = compile_stats()
    assert stats["recompile_limit_hits"] == 2  # the names, where the counter says fewer
    assert stats["functions_past_limit"] == [
        "forward (a (copy)/b.py:3)",
        "forward (aefrl/nn.py:97)",
    ]


def test_the_watch_names_a_function_in_a_folder_with_brackets():
    import logging

    from aefrl.compiled import RecompileLimitWatch

    watch = RecompileLimitWatch()
    message = (
        "torch._dynamo hit config.recompile_limit (8)\n   function: 'forward' "
        "(/home/me/proj (copy)/aefrl/nn.py:97)\n   last reason: 0/7: tensor 'x' size mismatch"
    )
    watch.emit(logging.LogRecord("torch._dynamo.convert_frame", 30, "f", 1, message, None, None))
    assert dict(watch.hits) == {"forward (aefrl/nn.py:97)": 1}
