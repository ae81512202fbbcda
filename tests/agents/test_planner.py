"""The PlaNet-style planner agent: torchrl's planners over the imagination env, the agent
interface, configuration, and planning with a Dreamer checkpoint's world model."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from aefrl.envs import make_dmc_env
from aefrl.world_model import RSSMState
from aefrl.world_model.modules import filter_step
from agents.dreamer import DreamerAgent
from agents.factory import build_agent
from agents.planner import PlannerAgent
from tests.agents.round_trip import assert_reloaded_agent_trains_identically
from tests.tiny_run import load_script, write_tiny_dreamer_run
from tests.world_model.conftest import ACTIONS, OBS, random_batch

ROOT = Path(__file__).resolve().parents[2]
TINY_WM = dict(latent_dim=3, deter=8, hidden=16, layers=1, depth=4)
TINY_PLAN = dict(horizon=3, candidates=64, top_k=8, iterations=3)


def tiny_planner(kind="aef", action_dim=ACTIONS, **planner) -> PlannerAgent:
    return PlannerAgent(
        OBS, action_dim, world_model=dict(TINY_WM, obs_model=kind), planner={**TINY_PLAN, **planner}
    )


@pytest.fixture(scope="module")
def cartpole_frame():
    """A real observation: cartpole-swingup's first frame at the tiny models' 16x16."""
    env = make_dmc_env("cartpole-swingup", image_size=OBS[-1], render="fast", seed=0)
    pixels = env.reset()["pixels"]
    env.close()
    return pixels.unsqueeze(0)  # [N=1, 3, 16, 16]


class LinearReward(nn.Module):
    """Stands in for the reward head: ``r = w·h`` on the belief part of feat."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, feat):
        return SimpleNamespace(mean=feat[..., : len(self.w)] @ self.w)


class OffsetReward(nn.Module):
    """Wraps a reward head and adds a constant to every predicted reward."""

    def __init__(self, head: nn.Module, offset: float) -> None:
        super().__init__()
        self.head, self.offset = head, offset

    def forward(self, feat):
        return SimpleNamespace(mean=self.head(feat).mean + self.offset)


@pytest.mark.parametrize("method", ["cem", "mppi"])
def test_planned_action_from_a_real_frame_follows_the_reward_head(method, cartpole_frame):
    """A reward head that pays for the belief a positive action leads to makes the planner
    choose a positive action, and the mirrored head a negative one."""
    first = torch.ones(1, 1, dtype=torch.bool)
    actions = {}
    for sign in (1.0, -1.0):
        torch.manual_seed(0)
        agent = tiny_planner(action_dim=1, method=method)
        wm = agent.world_model
        carry = agent.initial_carry(1)
        state, _, _ = filter_step(wm, carry.state, carry.prev_action, cartpole_frame, first)
        up = wm.rssm.recurrent(state, torch.ones(1, 1))
        down = wm.rssm.recurrent(state, -torch.ones(1, 1))
        wm.reward_head = LinearReward(sign * (up - down)[0])
        action, new_carry = agent.act(cartpole_frame, first, carry, "eval")
        assert action.shape == (1, 1) and action.abs().max() <= 1
        torch.testing.assert_close(new_carry.state.h, state.h)  # filtered the same frame
        assert torch.equal(new_carry.prev_action, action)
        actions[sign] = float(action)
    assert actions[1.0] > 0.3 and actions[-1.0] < -0.3, actions


def test_act_filters_with_the_carry_and_plans_from_the_new_state(cartpole_frame):
    """A step inside an episode: o_t is filtered from the carried (h, z) and a_{t-1} (not from
    zeros, not as an episode start), and the plan starts from that filtered state, not the
    carried one."""
    torch.manual_seed(0)
    agent = tiny_planner(action_dim=1)
    wm = agent.world_model
    carry = agent.initial_carry(1)
    carry.state = type(carry.state)(torch.randn(1, 8), torch.randn(1, 3))
    carry.prev_action = torch.full((1, 1), 0.7)
    not_first = torch.zeros(1, 1, dtype=torch.bool)
    planned_from = []
    agent.plan = lambda h, z: planned_from.append((h, z)) or torch.zeros(1, 1)
    _, new_carry = agent.act(cartpole_frame, not_first, carry, "eval")
    expected, _, _ = filter_step(wm, carry.state, carry.prev_action, cartpole_frame, not_first)
    torch.testing.assert_close(new_carry.state.h, expected.h)
    torch.testing.assert_close(new_carry.state.z, expected.z)
    ((h, z),) = planned_from
    assert torch.equal(h, new_carry.state.h) and torch.equal(z, new_carry.state.z)
    # Each input matters: these are what a zeroed a_{t-1} or an episode start would give.
    zero_action, _, _ = filter_step(wm, carry.state, torch.zeros(1, 1), cartpole_frame, not_first)
    start, _, _ = filter_step(
        wm, carry.state, carry.prev_action, cartpole_frame, torch.ones(1, 1, dtype=torch.bool)
    )
    assert not torch.allclose(expected.h, zero_action.h)
    assert not torch.allclose(expected.h, start.h)


@pytest.mark.parametrize("agent_kind", ["planner", "dreamer"])
def test_random_mode_filters_without_running_the_policy(agent_kind, cartpole_frame):
    """The prefill ("random" mode) keeps the carry filtered but makes no plan (it would be
    thrown away: ~1 s per step at PlaNet's settings) and runs no actor."""
    torch.manual_seed(0)
    if agent_kind == "planner":
        agent = tiny_planner(action_dim=1)
        agent.plan = lambda h, z: pytest.fail("planned in random mode")
    else:
        cfg = {"world_model": dict(TINY_WM), "actor": {"hidden": 16, "layers": 1},
               "critic": {"hidden": 16, "layers": 1}}  # fmt: skip
        cfg["world_model"].pop("latent_dim")
        agent = DreamerAgent(OBS, 1, **cfg)
        agent.actor.forward = lambda feat: pytest.fail("ran the actor in random mode")
    carry = agent.initial_carry(1)
    first = torch.ones(1, 1, dtype=torch.bool)
    action, new_carry = agent.act(cartpole_frame, first, carry, "random")
    assert torch.equal(action, torch.zeros(1, 1))
    expected, _, _ = filter_step(agent.world_model, carry.state, carry.prev_action,
                                 cartpole_frame, first)  # fmt: skip
    torch.testing.assert_close(new_carry.state.h, expected.h)
    torch.testing.assert_close(new_carry.state.z, expected.z)


# One CEM iteration returns the best candidate; torchrl still computes the unused NaN std.
@pytest.mark.filterwarnings("ignore:std\\(\\). degrees of freedom:UserWarning")
def test_plan_hands_the_planner_a_tensordict_on_the_states_device(monkeypatch):
    """torchrl's CEM / MPPI allocate the plan's mean and std on the input tensordict's device:
    a device-less one put them on the CPU next to CUDA rollouts (a crash on a GPU)."""
    agent = tiny_planner()
    seen = []

    def spy(td):
        seen.append(td.device)
        return td.set("action", torch.zeros(*td.batch_size, ACTIONS))

    monkeypatch.setattr(PlannerAgent, "planner", property(lambda self: spy))
    agent.plan(torch.zeros(2, agent.world_model.rssm.deter), torch.zeros(2, 4))
    assert seen == [torch.device("cpu")]


def test_cem_refuses_a_single_elite_over_several_iterations():
    """torchrl's CEM refits the elites' (unbiased) std: NaN from one elite, NaN actions next."""
    with pytest.raises(ValueError, match="cem needs top_k >= 2"):
        tiny_planner(method="cem", top_k=1, iterations=2)
    h, z = torch.randn(2, 8), torch.randn(2, 3)
    for options in (dict(method="cem", top_k=1, iterations=1),
                    dict(method="mppi", top_k=1, iterations=2)):  # fmt: skip
        assert torch.isfinite(tiny_planner(**options).plan(h, z)).all(), options


def test_mppi_is_unchanged_by_large_returns():
    """torchrl's MPPI weights exp(temperature * advantage) overflow for large returns (NaN
    actions); with the shifted advantage a constant reward offset changes nothing."""
    agent = tiny_planner(method="mppi", horizon=12, temperature=5.0)
    nn.init.normal_(agent.world_model.reward_head.net[-1].weight)
    h, z = torch.randn(2, 8), torch.randn(2, 3)
    torch.manual_seed(2)
    small = agent.plan(h, z)
    agent.world_model.reward_head = OffsetReward(agent.world_model.reward_head, 100.0)
    agent._planner_cache.clear()  # rebuild the env on the new head
    torch.manual_seed(2)
    large = agent.plan(h, z)
    assert torch.isfinite(large).all()
    torch.testing.assert_close(large, small, atol=1e-4, rtol=0)


def test_act_plans_for_every_env_and_explores_with_noise():
    agent = tiny_planner("vae")
    pixels = torch.randint(0, 256, (3, *OBS), dtype=torch.uint8)
    first = torch.ones(3, 1, dtype=torch.bool)
    carry = agent.initial_carry(3)
    torch.manual_seed(1)
    a_eval, _ = agent.act(pixels, first, carry, "eval")
    torch.manual_seed(1)
    a_explore, explored = agent.act(pixels, first, carry, "explore")
    assert a_eval.shape == a_explore.shape == (3, ACTIONS)
    assert a_explore.abs().max() <= 1 and not torch.equal(a_eval, a_explore)
    assert torch.equal(explored.prev_action, a_explore)  # the noisy action the env executes
    assert not torch.allclose(a_eval[0], a_eval[1])  # each env planned on its own
    with pytest.raises(ValueError, match="mode must be one of"):
        agent.act(pixels, first, carry, "greedy")


def _plain_planner(agent, h, z, method, temperature=1.0):
    """PlaNet's CEM (and MPPI's weighted refit) written out in plain torch: candidates from
    N(mean, std) clipped to [-1, 1], imagined with the prior, scored by the undiscounted sum of
    the reward head's means over s_1..s_H, top-k per env, refit, and the refitted mean's first
    action. The draws are torchrl's, in its order."""
    wm, c = agent.world_model, agent.planning
    n, k, horizon, a = h.shape[0], c.candidates, c.horizon, wm.rssm.action_dim
    mean, std = torch.zeros(n, 1, horizon, a), torch.ones(n, 1, horizon, a)
    for _ in range(c.iterations):
        actions = (mean + std * torch.randn(n, k, horizon, a)).clamp(-1, 1)
        state = RSSMState(
            h[:, None].expand(n, k, -1).reshape(n * k, -1),
            z[:, None].expand(n, k, -1).reshape(n * k, -1),
        )
        returns = torch.zeros(n * k)
        for t in range(horizon):
            state = wm.rssm.img_step(state, actions[:, :, t].reshape(n * k, a))
            returns = returns + wm.reward_head(state.feat).mean.reshape(-1)
        returns = returns.view(n, k)
        best, index = returns.topk(c.top_k, dim=1)
        elites = actions.gather(1, index[:, :, None, None].expand(n, c.top_k, horizon, a))
        if method == "cem":
            mean, std = elites.mean(1, keepdim=True), elites.std(1, keepdim=True)
        else:
            w = torch.exp(temperature * (best - returns.amax(1, keepdim=True)))[..., None, None]
            mean = (w * elites).sum(1, keepdim=True) / w.sum(1, keepdim=True)
            std = ((w * (elites - mean) ** 2).sum(1, keepdim=True) / w.sum(1, keepdim=True)).sqrt()
    return mean[:, 0, 0].clamp(-1, 1)


@pytest.mark.parametrize("method", ["cem", "mppi"])
def test_plans_are_planets_written_out_for_each_env(method):
    """The same draws give the same actions as the plain-torch planner above, for three envs
    at once with a horizon unlike the iteration count (a swap of the two, a discount, or one
    env's plan for all went unnoticed by the other tests)."""
    torch.manual_seed(0)
    options = dict(horizon=4, candidates=50, top_k=7, iterations=3, temperature=2.0)
    agent = tiny_planner(method=method, **options)
    nn.init.normal_(agent.world_model.reward_head.net[-1].weight)  # rewards that differ
    h, z = torch.randn(3, 8), torch.randn(3, 3)
    with torch.no_grad():
        torch.manual_seed(11)
        planned = agent.plan(h, z)
        torch.manual_seed(11)
        written_out = _plain_planner(agent, h, z, method, temperature=2.0)
    torch.testing.assert_close(planned, written_out, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(planned[0], planned[1])  # each env its own plan


def test_a_temperature_beyond_float32_is_refused():
    """torchrl keeps the temperature in float32: 1e39 became inf there and the actions NaN."""
    with pytest.raises(ValueError, match=r"in float32: 1\.18e-38 to 3\.4e38\), got 1e\+39"):
        tiny_planner(method="mppi", temperature=1e39)
    with pytest.raises(ValueError, match=r"got 1e-50"):  # 0 in float32: returns ignored
        tiny_planner(method="mppi", temperature=1e-50)
    with pytest.raises(ValueError, match=r"got 1e-40"):  # subnormal in float32
        tiny_planner(method="mppi", temperature=1e-40)
    assert tiny_planner(method="mppi", temperature=1e38).planning.temperature == 1e38
    assert tiny_planner(method="mppi", temperature=1.18e-38).planning.temperature == 1.18e-38
    # cem does not read it: a cem run that stored any value still loads
    assert tiny_planner(method="cem", temperature=1e-40).planning.method == "cem"


def test_train_step_trains_only_the_world_model_and_round_trips():
    torch.manual_seed(0)
    agent = tiny_planner()
    before = {k: v.clone() for k, v in agent.state_dict()["modules"].items()}
    metrics = agent.train_step(random_batch(2, 6))
    assert all(torch.isfinite(v) for v in metrics.values())
    assert {"loss_obs", "loss_latent", "loss_reward", "grad_norm_model"} <= set(metrics)
    after = agent.state_dict()["modules"]
    assert all(k.startswith(("world_model.", "wm_loss.world_model.")) for k in after)
    assert any(not torch.equal(after[k], before[k]) for k in after)
    assert_reloaded_agent_trains_identically(agent, tiny_planner())
    assert agent.report(random_batch(1, 8), num_samples=2)["video_pred"].shape == (1, 8, *OBS)


def test_plans_with_a_dreamer_agents_world_model():
    torch.manual_seed(0)
    dreamer = DreamerAgent(OBS, ACTIONS, world_model=dict(TINY_WM, obs_model="aef"))
    nn.init.normal_(dreamer.world_model.reward_head.net[-1].weight)
    planner = tiny_planner()
    planner.load_world_model_state(dreamer.state_dict()["modules"])
    h, z = torch.randn(2, 8), torch.randn(2, 3)
    torch.manual_seed(5)
    a1 = planner.plan(h, z)
    torch.manual_seed(5)
    a2 = PlannerAgent(OBS, ACTIONS, world_model=dreamer.world_model, planner=TINY_PLAN).plan(h, z)
    assert torch.equal(a1, a2)


def _compose(*overrides):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_agent_planner_config_builds_with_every_exp_preset():
    for overrides, expected in [
        (["agent=planner"], dict(horizon=12, candidates=1000, top_k=100, iterations=10)),
        (["agent=planner", "exp=smoke"], dict(horizon=4, candidates=32, top_k=4, iterations=2)),
        (["agent=planner", "exp=cpu"], dict(horizon=12, candidates=300, top_k=30, iterations=5)),
    ]:
        cfg = _compose(*overrides)
        agent = build_agent(dict(cfg.agent), dict(cfg.obs_model), (3, 64, 64), 1)
        assert isinstance(agent, PlannerAgent)
        assert agent.world_model.rssm.deter == cfg.agent.world_model.deter
        for key, value in expected.items():
            assert getattr(agent.planning, key) == value, (overrides, key)
    cfg = _compose("exp=smoke")  # Dreamer is untouched by the planner's presets
    assert "planner" not in cfg.agent
    assert isinstance(
        build_agent(dict(cfg.agent), dict(cfg.obs_model), (3, 64, 64), 1), DreamerAgent
    )
    with pytest.raises(
        ValueError,
        match=r"agent\.planner\.top_k \(50\) must not exceed agent\.planner\.candidates \(10\)",
    ):
        build_agent({"name": "planner", "planner": {"candidates": 10, "top_k": 50}},
                    {"kind": "aef", "latent_dim": 3}, OBS, 1)  # fmt: skip


def test_eval_script_plans_with_a_dreamer_checkpoint(tmp_path):
    """scripts/eval.py RUN --agent planner on a Dreamer run: the planner's own result files."""
    write_tiny_dreamer_run(tmp_path)
    script = load_script("eval")
    planning = ["--horizon", "2", "--candidates", "16", "--top-k", "4", "--iterations", "2"]
    args = [str(tmp_path), "--agent", "planner", "--episodes", "1", "--render", "fast", *planning]
    assert script.main(args) == 0
    result = json.loads((tmp_path / "eval_planner.json").read_text())
    assert result["agent"] == "planner" and result["trained_by"] == "dreamer"
    assert result["planner"]["candidates"] == 16 and len(result["returns"]) == 1
    assert (tmp_path / "eval_planner.gif").stat().st_size > 0
    assert not (tmp_path / "eval.json").exists()  # the actor's results are not overwritten
    assert (
        script.main([str(tmp_path), "--agent", "planner", "--top-k", "99", "--candidates", "9"])
        == 2
    )


def test_eval_video_pairs_each_frame_with_its_own_reconstruction(tmp_path):
    """Every GIF frame is o_t next to the decoded posterior of o_t (filtered from the episode's
    earlier frames and actions), recomputed here step by step with the agent's own act."""
    write_tiny_dreamer_run(tmp_path)
    script = load_script("eval")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    conf = state["run_config"]
    agent = build_agent(conf["agent"], conf["obs_model"], OBS, 1)
    agent.load_state_dict(state["agent"])
    agent.eval()
    env_conf = {k: v for k, v in conf["env"].items() if k not in ("task", "num_envs")}
    env = make_dmc_env("cartpole-swingup", seed=3, **env_conf)
    _, frames = script.evaluate(agent, env, 1, 1, "cpu", record=True)
    env.close()
    assert len(frames) >= 3
    width = OBS[-1]
    carry = agent.initial_carry(1)
    with torch.no_grad():
        for t, frame in enumerate(frames):
            view, recon = frame[..., :width], frame[..., width:]
            first = torch.full((1, 1), t == 0)
            _, carry = agent.act(view.unsqueeze(0), first, carry, "eval")
            assert torch.equal(recon, agent.world_model.decode_pixels(carry.state)[0]), t


def test_eval_same_seed_gives_the_same_planner_returns(tmp_path):
    """--seed fixes torch's draws too (the planner's candidates), not only the env's episodes."""
    write_tiny_dreamer_run(tmp_path, time_limit=0.2)
    script = load_script("eval")
    planning = ["--horizon", "2", "--candidates", "16", "--top-k", "4", "--iterations", "2"]
    returns = []
    for _ in range(2):
        out = tmp_path / f"eval_{len(returns)}.json"
        args = [str(tmp_path), "--agent", "planner", "--episodes", "1", "--seed", "5",
                "--video", "", "--out", str(out), *planning]  # fmt: skip
        assert script.main(args) == 0
        returns.append(json.loads(out.read_text())["returns"])
    assert returns[0] == returns[1]


def test_eval_planner_takes_the_checkpoints_weights_and_the_runs_settings(tmp_path):
    """build_planner_agent plans with the checkpoint's world-model weights, a planner run's own
    settings, and the command line's overrides on top."""
    write_tiny_dreamer_run(tmp_path)
    script = load_script("eval")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    modules = state["agent"]["modules"]
    for key, value in modules.items():  # weights no fresh model could have (the two-hot
        # bins are the head's fixed support, checked on load, not weights)
        if key.startswith("world_model.") and value.is_floating_point() and "bins" not in key:
            modules[key] = value + 0.5
    saved = {k.removeprefix("world_model."): v for k, v in modules.items()
             if k.startswith("world_model.")}  # fmt: skip
    state["run_config"]["agent"] = dict(
        state["run_config"]["agent"], name="planner", planner=dict(horizon=5, candidates=40)
    )
    args = script.parse_args([str(tmp_path), "--agent", "planner", "--top-k", "6"])
    agent = script.build_planner_agent(state, args, 1)
    for name, value in agent.world_model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    options = agent.planning_options()
    assert (options["horizon"], options["candidates"], options["top_k"]) == (5, 40, 6)
    assert options["iterations"] == 10  # untouched by run and command line: PlaNet's default


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--candidates", "10"],
            "--candidates is a planner option, but the checkpoint's dreamer agent acts here: "
            "add --agent planner to plan with its world model, or leave it out",
        ),
        (
            ["--agent", "dreamer", "--planner", "mppi", "--top-k", "3"],
            "--planner, --top-k are planner options, but the checkpoint's dreamer agent acts "
            "here: add --agent planner to plan with its world model, or leave them out",
        ),
    ],
)
def test_eval_refuses_planner_options_when_the_planner_does_not_act(
    tmp_path, args, message, capsys
):
    """They used to be ignored without a word: the actor was evaluated instead."""
    write_tiny_dreamer_run(tmp_path)
    assert load_script("eval").main([str(tmp_path), *args]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "eval.json").exists()


def test_eval_refuses_a_temperature_the_planner_does_not_use(tmp_path, capsys):
    """--temperature with the default cem planner changed nothing, and the result file
    recorded it as if it had planned with it."""
    write_tiny_dreamer_run(tmp_path)
    args = [str(tmp_path), "--agent", "planner", "--episodes", "1", "--temperature", "0.01"]
    assert load_script("eval").main(args) == 2
    assert capsys.readouterr().err == (
        "error: --temperature is MPPI's inverse temperature, and the planner here is cem: add "
        "--planner mppi, or leave --temperature out\n"
    )
    assert not (tmp_path / "eval_planner.json").exists()
    # One out of MPPI's range too: what is wrong first is that cem does not use it.
    assert load_script("eval").main([*args[:-1], "1e39"]) == 2
    assert "the planner here is cem" in capsys.readouterr().err
    planning = ["--horizon", "2", "--candidates", "8", "--top-k", "2", "--iterations", "1"]
    mppi = [*args, "--planner", "mppi", "--render", "fast", "--video", "", *planning]
    assert load_script("eval").main(mppi) == 0
    result = json.loads((tmp_path / "eval_planner.json").read_text())
    assert result["planner"]["temperature"] == 0.01 and result["planner"]["method"] == "mppi"
    assert "explore_noise" not in result["planner"]  # evaluation adds none


def test_eval_names_bad_planner_settings_by_their_options(tmp_path, capsys):
    write_tiny_dreamer_run(tmp_path)
    args = [str(tmp_path), "--agent", "planner", "--top-k", "99", "--candidates", "9"]
    assert load_script("eval").main(args) == 2
    err = capsys.readouterr().err
    assert err == "error: --top-k (99) must not exceed --candidates (9)\n"
    # --top-k not given: the message says whose 100 it is (it read as if --top-k were given)
    assert load_script("eval").main([*args[:3], "--candidates", "5"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --top-k (100) must not exceed --candidates (5) "
        "(--top-k: the run's or the default value; set it too)\n"
    )


def test_eval_planner_options_apply_to_a_planner_runs_own_agent(tmp_path):
    """A planner run evaluated without --agent: its agent plans, with the options given."""
    from aefrl.checkpoint import load_checkpoint, save_checkpoint

    write_tiny_dreamer_run(tmp_path)
    state = load_checkpoint(tmp_path)
    state["run_config"]["agent"] = dict(state["run_config"]["agent"], name="planner")
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    planning = ["--horizon", "2", "--candidates", "16", "--top-k", "4", "--iterations", "2"]
    args = [str(tmp_path), "--episodes", "1", "--render", "fast", "--video", "", *planning]
    assert load_script("eval").main(args) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["agent"] == "planner" and result["planner"]["candidates"] == 16
