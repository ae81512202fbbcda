"""The Dreamer agent's narrow interface: act, train_step, report, state_dict."""

import pytest
import torch
from torch import nn

from aefrl.world_model.evaluation import open_loop_prediction, sequence_bits_per_dim
from agents.base import shared_entries
from agents.dreamer import DreamerAgent
from tests.agents.round_trip import assert_reloaded_agent_trains_identically
from tests.world_model.conftest import ACTIONS, OBS, random_batch

TINY = dict(
    world_model=dict(latent_dim=3, deter=8, hidden=16, layers=1, depth=4),
    actor=dict(hidden=16, layers=1),
    critic=dict(hidden=16, layers=1),
    actor_loss=dict(horizon=4),
)


def tiny_agent(
    kind: str, actor_dist: str = "tanh_normal", gradient: str = "backprop"
) -> DreamerAgent:
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["world_model"]["obs_model"] = kind
    cfg["actor"]["dist"] = actor_dist
    cfg["actor_loss"]["gradient"] = gradient
    return DreamerAgent(OBS, ACTIONS, **cfg)


def test_act_shapes_and_determinism(kind):
    torch.manual_seed(0)
    agent = tiny_agent(kind)
    pixels = torch.randint(0, 256, (3, *OBS), dtype=torch.uint8)
    first = torch.ones(3, 1, dtype=torch.bool)
    carry = agent.initial_carry(3)
    a1, c1 = agent.act(pixels, first, carry, "eval")
    assert a1.shape == (3, ACTIONS) and a1.abs().max() <= 1
    assert torch.equal(c1.prev_action, a1)
    torch.manual_seed(1)
    _, c_a = agent.act(pixels, first, carry, "eval")
    torch.manual_seed(2)
    _, c_b = agent.act(pixels, first, carry, "eval")
    # Filtering is deterministic for the AEF families, sampled for the VAE (SPEC §4).
    assert torch.equal(c_a.state.z, c_b.state.z) == (kind != "vae")
    e1, _ = agent.act(pixels, first, carry, "explore")
    e2, _ = agent.act(pixels, first, carry, "explore")
    assert not torch.equal(e1, e2)


def test_bounded_normal_acts_in_bounds_and_feeds_the_executed_action_back():
    """Its samples can leave [-1, 1]; the agent clips them, and the clipped action is the one
    the next filtering step sees (the one the environment executes)."""
    torch.manual_seed(0)
    agent = tiny_agent("aef", actor_dist="bounded_normal")
    with torch.no_grad():  # a mean at the bound: about half of the samples fall outside
        agent.actor.net[-1].weight.zero_()
        agent.actor.net[-1].bias[:ACTIONS] = 30.0
    pixels = torch.randint(0, 256, (64, *OBS), dtype=torch.uint8)
    first = torch.ones(64, 1, dtype=torch.bool)
    action, carry = agent.act(pixels, first, agent.initial_carry(64), "explore")
    assert action.abs().max() <= 1 and (action == 1).float().mean() > 0.3
    assert (action < 1).any() and torch.equal(carry.prev_action, action)
    eval_action, _ = agent.act(pixels, first, agent.initial_carry(64), "eval")
    torch.testing.assert_close(
        eval_action, torch.full_like(eval_action, torch.tanh(torch.tensor(30.0)).item())
    )


def test_explore_noise_adds_clipped_gaussian_noise_to_collected_actions_only():
    """``explore_noise``: the actor's sample plus N(0, σ²) from the same torch stream, clipped to
    [-1, 1] and fed back as the next step's action; evaluation takes the mode without it."""
    agent = tiny_agent("aef")
    noisy = tiny_agent("aef")
    noisy.load_state_dict(agent.state_dict())
    noisy.explore_noise = 0.5
    pixels = torch.randint(0, 256, (256, *OBS), dtype=torch.uint8)
    first = torch.ones(256, 1, dtype=torch.bool)
    torch.manual_seed(4)
    plain, _ = agent.act(pixels, first, agent.initial_carry(256), "explore")
    torch.manual_seed(4)
    action, carry = noisy.act(pixels, first, noisy.initial_carry(256), "explore")
    torch.manual_seed(4)
    agent.act(pixels, first, agent.initial_carry(256), "explore")  # the same draws consumed
    expected = (plain + 0.5 * torch.randn_like(plain)).clamp(-1, 1)
    torch.testing.assert_close(action, expected)
    assert torch.equal(carry.prev_action, action) and (action.abs() == 1).any()
    eval_noisy, _ = noisy.act(pixels, first, noisy.initial_carry(256), "eval")
    eval_plain, _ = agent.act(pixels, first, agent.initial_carry(256), "eval")
    assert torch.equal(eval_noisy, eval_plain)
    with pytest.raises(ValueError, match=r"explore_noise must be >= 0, got -0\.1"):
        DreamerAgent(OBS, ACTIONS, **TINY, explore_noise=-0.1)


def test_acting_leaves_actnorm_to_the_first_training_batch():
    """ActNorm's data-dependent init belongs to the first training batch, not to the first
    frame the agent acts on (one frame, dequantised at the bin centre); the agent stays in
    training mode while it acts, so the gradient-free acting pass must not trigger it."""
    torch.manual_seed(0)
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["world_model"]["actnorm"] = True
    agent = DreamerAgent(OBS, ACTIONS, **cfg)
    pre = agent.world_model.preprocess
    pixels = torch.randint(0, 256, (1, *OBS), dtype=torch.uint8)
    agent.act(pixels, torch.ones(1, 1, dtype=torch.bool), agent.initial_carry(1))
    assert not pre.an_initialized
    assert torch.equal(pre.an_log_scale.detach(), torch.zeros(3))
    agent.train_step(random_batch(3, 8))
    assert pre.an_initialized


@pytest.mark.parametrize("gradient", ["backprop", "reinforce"])
def test_train_step_updates_every_module_and_reports_finite_metrics(kind, gradient):
    torch.manual_seed(0)
    agent = tiny_agent(kind, gradient=gradient)
    before = {k: v.clone() for k, v in agent.state_dict()["modules"].items()}
    batch = random_batch(3, 8, first_at=(0, 5))
    for _ in range(2):  # the second step also moves the zero-initialised output layers' inputs
        metrics = agent.train_step(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    for key in (
        "loss_obs",
        "loss_latent",
        "loss_reward",
        "loss_continue",
        "loss_actor",
        "loss_value",
        "grad_norm_model",
        "imag_return",
        "sigma_q_mean",
    ):
        assert key in metrics, key
    after = agent.state_dict()["modules"]
    for prefix in (
        "world_model.obs_model",
        "world_model.rssm",
        "world_model.reward_head",
        "actor.",
        "critic.",
        "slow_critic.copy",
    ):
        moved = [k for k in after if k.startswith(prefix) and not torch.equal(after[k], before[k])]
        assert moved, prefix


def test_the_slow_critic_follows_the_critic_after_its_step():
    """θ_slow ← θ_slow + τ·(θ − θ_slow) with the critic's parameters after this step's update
    (DreamerV3's order); an update before the critic's step would lerp towards the old ones.
    τ = 0.5 makes the two orders differ by half the critic's step, far above rounding."""
    torch.manual_seed(0)
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["world_model"]["obs_model"] = "aef"
    agent = DreamerAgent(OBS, ACTIONS, **cfg, slow_critic_tau=0.5)
    slow_before = [p.detach().clone() for p in agent.slow_critic.copy.parameters()]
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    agent.train_step(random_batch(3, 8, first_at=(0, 5)))
    moved = 0.0
    for slow, fast, s0, f0 in zip(
        agent.slow_critic.copy.parameters(), agent.critic.parameters(), slow_before, critic_before
    ):
        fast = fast.detach()
        torch.testing.assert_close(slow, s0 + 0.5 * (fast - s0), rtol=0, atol=1e-7)
        moved = max(moved, float((fast - f0).abs().max()))
    assert moved > 1e-5  # the critic stepped, so the order is visible


def test_each_optimiser_clips_its_own_group_at_its_own_norm(monkeypatch):
    """model / actor / critic gradients are clipped at grad_clip's own entry, each over its
    module's parameters only."""
    torch.manual_seed(0)
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["world_model"]["obs_model"] = "aef"
    agent = DreamerAgent(OBS, ACTIONS, **cfg, grad_clip={"model": 7.0, "actor": 3.0, "critic": 5.0})
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        params = list(params)
        calls.append((max_norm, {id(p) for p in params}))
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    metrics = agent.train_step(random_batch(3, 8))
    want = [(7.0, agent.world_model), (3.0, agent.actor), (5.0, agent.critic)]
    assert [c[0] for c in calls] == [w[0] for w in want]
    for (_, ids), (_, module) in zip(calls, want):
        assert ids == {id(p) for p in module.parameters()}
    # Each update says whether it was clipped (train/grad_clipped_*: the share of updates).
    for name, clip in agent.grad_clip.items():
        clipped = float(metrics[f"grad_norm_{name}"]) > clip
        assert float(metrics[f"grad_clipped_{name}"]) == float(clipped), name
    for clip, flag in ((1e-9, 1.0), (1e9, 0.0)):
        agent.grad_clip = dict.fromkeys(agent.grad_clip, clip)
        metrics = agent.train_step(random_batch(3, 8))
        assert [float(metrics[f"grad_clipped_{n}"]) for n in agent.grad_clip] == [flag] * 3


def test_one_step_of_several_groups_zeroes_clips_and_steps_each_on_its_own():
    """``_step(("model", "critic"), loss)`` (repval_grad's joint step): one backward; each
    named group's stale gradients are dropped first and it is clipped at its own norm; other
    groups are left alone. The loss's gradient is known: a for the model, b for the critic."""
    torch.manual_seed(0)
    agent = tiny_agent("aef")
    for opt in agent.optimizers.values():
        opt.step = lambda *args, **kwargs: None  # the gradients stay as clipped
    model, critic = list(agent.world_model.parameters()), list(agent.critic.parameters())
    a = [torch.randn_like(p) for p in model]
    b = [torch.randn_like(p) for p in critic]
    norm_a = torch.cat([x.flatten() for x in a]).norm()
    norm_b = torch.cat([x.flatten() for x in b]).norm()
    agent.grad_clip.update(model=0.5 * float(norm_a), critic=2.0 * float(norm_b))
    for p in agent.parameters():
        p.grad = torch.ones_like(p)  # stale: an earlier update's
    loss = sum((x * p).sum() for x, p in zip(a, model)) + sum(
        (x * p).sum() for x, p in zip(b, critic)
    )
    metrics = agent._step(("model", "critic"), loss)
    torch.testing.assert_close(metrics["grad_norm_model"], norm_a)
    torch.testing.assert_close(metrics["grad_norm_critic"], norm_b)
    assert (
        float(metrics["grad_clipped_model"]) == 1.0 and float(metrics["grad_clipped_critic"]) == 0
    )
    for x, p in zip(a, model):  # scaled to the model's clip, by the model's norm alone
        torch.testing.assert_close(p.grad, 0.5 * x, rtol=1e-5, atol=1e-7)
    for x, p in zip(b, critic):
        torch.testing.assert_close(p.grad, x)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in agent.actor.parameters())


def test_imagination_from_terminal_rows_carries_no_actor_loss():
    """train_step hands the batch's terminated flags to the actor loss: imagination that starts
    from a terminal state has weight 0, so a batch of terminal rows gives a zero actor loss
    and leaves the actor as it was."""
    torch.manual_seed(0)
    agent = tiny_agent("aef")
    batch = random_batch(3, 8)
    batch["terminated"] = torch.ones_like(batch["terminated"])
    actor_before = [p.clone() for p in agent.actor.parameters()]
    metrics = agent.train_step(batch)
    assert float(metrics["loss_actor"]) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(actor_before, agent.actor.parameters()))


def test_state_dict_round_trip_includes_optimisers():
    torch.manual_seed(0)
    agent = tiny_agent("aef")
    agent.train_step(random_batch(2, 6))
    torch.manual_seed(9)  # the fresh agent starts from other weights
    assert_reloaded_agent_trains_identically(agent, tiny_agent("aef"))


def test_state_dict_lists_each_network_once_and_reads_the_older_layout():
    """The loss modules hold the networks they train: their entries (``wm_loss.world_model.*``
    beside ``world_model.*``, 233 entries for 84 tensors here) are left out, and a checkpoint
    of the older layout, which listed them, still loads."""
    torch.manual_seed(0)
    agent = tiny_agent("aef")
    agent.train_step(random_batch(2, 6))
    modules = agent.state_dict()["modules"]
    full = nn.Module.state_dict(agent)
    assert {k.split(".")[0] for k in modules} == {
        "world_model", "actor", "critic", "slow_critic", "return_norm"
    }  # fmt: skip
    assert len(full) > 2 * len(modules)
    held = [id(t) for t in agent.state_dict(keep_vars=True)["modules"].values()]
    every = {id(t) for t in nn.Module.state_dict(agent, keep_vars=True).values()}
    assert set(held) == every  # only aliases left out: every tensor is still there
    with torch.device("meta"):  # every meta tensor's data pointer is 0: identity is by object
        on_meta = tiny_agent("aef")
    assert shared_entries(on_meta) == shared_entries(agent)

    torch.manual_seed(9)
    older = tiny_agent("aef")
    older.load_state_dict({"modules": full, "optimizers": agent.state_dict()["optimizers"]})
    for name, value in older.state_dict()["modules"].items():
        assert torch.equal(value, modules[name]), name
    torch.manual_seed(9)
    newer = tiny_agent("aef")
    newer.load_state_dict(agent.state_dict())
    for name, value in nn.Module.state_dict(newer).items():
        assert torch.equal(value, full[name]), name


def test_report_gives_video_and_bits_per_dim(kind):
    torch.manual_seed(0)
    agent = tiny_agent(kind)
    out = agent.report(random_batch(2, 12), num_samples=2)
    assert out["video_pred"].shape == (2, 12, *OBS) and out["video_pred"].dtype == torch.uint8
    assert out["open_loop_mse"].shape == (7,)
    assert 0 < float(out["bits_per_dim"]) < 16


def test_report_scalars_are_the_evaluation_functions_results(kind):
    """``report`` against ``open_loop_prediction`` (5 context frames) and the mean of
    ``sequence_bits_per_dim`` over the batch's sequences, run in the same order from the same
    seed: fails if a scalar is taken from the wrong entry (MSE from SSIM) or the bits/dim are
    not the mean over sequences (e.g. their max)."""
    torch.manual_seed(0)
    agent = tiny_agent(kind)
    batch = random_batch(3, 9)
    torch.manual_seed(5)
    out = agent.report(batch, num_samples=2)
    torch.manual_seed(5)
    with torch.no_grad():
        pred = open_loop_prediction(agent.world_model, batch, context=5)
        bpd = sequence_bits_per_dim(agent.world_model, batch, 2)
    assert out["context"] == 5
    assert not torch.allclose(pred["mse"], pred["ssim"]) and bpd.max() > bpd.mean()
    torch.testing.assert_close(out["open_loop_mse"], pred["mse"], equal_nan=True)
    torch.testing.assert_close(out["open_loop_ssim"], pred["ssim"], equal_nan=True)
    torch.testing.assert_close(out["open_loop_sharpness"], pred["sharpness"], equal_nan=True)
    torch.testing.assert_close(out["bits_per_dim"], bpd.mean())
    error, bias = out["open_loop_reward_abs_error"], out["open_loop_reward_bias"]
    torch.testing.assert_close(error, pred["reward_abs_error"], equal_nan=True)
    torch.testing.assert_close(bias, pred["reward_bias"], equal_nan=True)
    assert (error > 0).all() and not torch.allclose(error, bias)  # rewards in [0, 1)
    assert torch.equal(out["video_real"], pred["real"])
    assert torch.equal(out["video_pred"], pred["pred"])


def test_train_step_runs_under_bf16_autocast(kind):
    """The GPU path wraps updates in bf16 autocast (scripts/bench.py --autocast bf16); on the CPU
    the same ops run, so a dtype mismatch (e.g. bf16 values scattered into float32 two-hot
    targets) shows up here."""
    torch.manual_seed(0)
    agent = tiny_agent(kind)
    batch = random_batch(3, 8, first_at=(0, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metrics = agent.train_step(batch)
    assert all(torch.isfinite(v) for v in metrics.values())


LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def _record_dtypes(modules, into: set) -> list:
    """Forward hooks adding each module's output dtype to ``into``; returns their handles."""
    return [m.register_forward_hook(lambda m, i, o: into.add(o.dtype)) for m in modules]


def test_the_autocast_option_runs_the_trunks_in_bf16_and_the_rest_in_float32(kind):
    """``autocast="bf16"``: inside the updates the layers of the MLP and conv trunks compute in
    bf16 (on enough rows), the trunks hand float32 back, and every loss term and metric is
    float32 (a CPU autocast around whole loss forwards computed the KL and entropy terms in
    bf16); acting stays float32; ``"none"`` is float32 throughout."""
    from aefrl.nn import MLP, ConvDecoder, ConvEncoder
    from agents.planner import PlannerAgent

    batch = random_batch(4, 64, first_at=(0, 5))  # 256 frames: the trunks' bf16 threshold
    seen = {}
    for mode in ("none", "bf16"):
        torch.manual_seed(0)
        cfg = {k: dict(v) for k, v in TINY.items()}
        cfg["world_model"]["obs_model"] = kind
        agent = DreamerAgent(OBS, ACTIONS, **cfg, autocast=mode)
        layers = [m for m in agent.modules() if isinstance(m, LAYERS)]
        trunks = [m for m in agent.modules() if isinstance(m, MLP | ConvEncoder | ConvDecoder)]
        seen[mode], seen[f"{mode} trunks"] = set(), set()
        hooks = _record_dtypes(layers, seen[mode]) + _record_dtypes(trunks, seen[f"{mode} trunks"])
        metrics = agent.train_step(batch)
        assert all(torch.isfinite(v) for v in metrics.values())
        assert {v.dtype for v in metrics.values()} == {torch.float32}, mode
        assert {p.grad.dtype for p in agent.parameters() if p.grad is not None} == {torch.float32}
        for h in hooks:
            h.remove()
    seen["act"] = set()
    hooks = _record_dtypes(layers, seen["act"])
    pixels = torch.randint(0, 256, (2, *OBS), dtype=torch.uint8)
    agent.act(pixels, torch.ones(2, 1, dtype=torch.bool), agent.initial_carry(2))
    for h in hooks:
        h.remove()
    assert seen["none"] == seen["none trunks"] == seen["bf16 trunks"] == {torch.float32}
    # bf16 inside the big trunks; float32 in the per-step RSSM MLPs on 4 rows
    assert seen["bf16"] == {torch.bfloat16, torch.float32} and seen["act"] == {torch.float32}
    planner = PlannerAgent(OBS, ACTIONS, world_model=TINY["world_model"], autocast="bf16")
    assert all(v.dtype == torch.float32 for v in planner.train_step(batch).values())
    with pytest.raises(ValueError, match="autocast must be one of none, bf16, got 'fp16'"):
        DreamerAgent(OBS, ACTIONS, **TINY, autocast="fp16")


def test_settings_that_would_silently_stop_learning_are_refused():
    """Each of these was accepted and either froze a module (a clip norm of 0 zeroes every
    update), made NaNs (Adam's eps 0) or changed the objective's meaning; now one sentence."""
    import pytest

    from agents.planner import PlannerAgent

    bad = [
        ({"grad_clip": {"model": 0}}, r"grad_clip\.model must be > 0, got 0"),
        ({"grad_clip": {"actor": -1}}, r"grad_clip\.actor must be > 0"),
        ({"lr": {"critic": 0}}, r"lr\.critic must be > 0"),
        ({"adam_eps": 0}, "adam_eps must be > 0"),
        ({"actor_loss": {"gamma": 1.5}}, r"gamma must lie in \(0, 1\], got 1.5"),
        ({"actor_loss": {"lmbda": 2}}, r"lmbda must lie in \[0, 1\]"),
        ({"actor_loss": {"entropy_coef": -1}}, "entropy_coef must be >= 0"),
        ({"wm_loss": {"free_nats": -1}}, "free_nats must be >= 0"),
        ({"wm_loss": {"loss_scales": {"obs": -1}}}, r"loss_scales\.obs must be >= 0"),
        ({"slow_critic_tau": 0}, r"slow_critic_tau must lie in \(0, 1\]"),
    ]
    for setting, message in bad:
        cfg = {k: dict(v) for k, v in TINY.items()}
        for group, values in setting.items():
            cfg[group] = {**cfg.get(group, {}), **values} if isinstance(values, dict) else values
        with pytest.raises(ValueError, match=message):
            DreamerAgent(OBS, ACTIONS, **cfg)
    with pytest.raises(ValueError, match=r"grad_clip\.model must be > 0"):
        PlannerAgent(OBS, ACTIONS, world_model=TINY["world_model"], grad_clip={"model": 0})


def test_a_checkpoint_taken_under_cuda_graphs_loads_with_the_eager_optimiser_settings():
    """Capture switches Adam to capturable fused steps with device step counters, and a
    checkpoint taken then holds those settings; loading it adopted them, so a resume without
    graphs (or on another device) stepped with the graph's settings. The agent's own come back,
    with CPU step counters: it trains on exactly as the same checkpoint taken eagerly does."""
    from aefrl.cuda_graph import make_capturable

    torch.manual_seed(0)
    saved = tiny_agent("aef")
    saved.train_step(random_batch(3, 8))
    eager_state = saved.state_dict()
    eager_flags = {k: saved.optimizers["model"].param_groups[0][k] for k in ("capturable", "fused")}
    for opt in saved.optimizers.values():
        make_capturable(opt)  # what a capture leaves (on the CPU the fused kernel runs too)
    state = saved.state_dict()
    assert state["optimizers"]["model"]["param_groups"][0]["capturable"] is True
    loaded, reference = tiny_agent("aef"), tiny_agent("aef")
    loaded.load_state_dict(_through_bytes(state))  # as from a file: no tensor shared with
    reference.load_state_dict(_through_bytes(eager_state))  # saved's live optimiser states
    for opt in loaded.optimizers.values():
        for group in opt.param_groups:
            assert {k: group[k] for k in eager_flags} == eager_flags
            for p in group["params"]:
                assert opt.state[p]["step"].device.type == "cpu"
    batch = random_batch(3, 8)
    for agent in (loaded, reference):
        torch.manual_seed(5)
        agent.train_step(batch)
    for a, b in zip(loaded.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _through_bytes(state: dict) -> dict:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
