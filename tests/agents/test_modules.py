"""A trained agent from torchrl code: load_agent, the actor / critic modules, and the whole policy
in torchrl's env.rollout (agents/modules.py)."""

import copy
import pickle

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import InitTracker, TensorDictPrimer, TransformedEnv
from torchrl.modules.utils import get_env_transforms_from_module
from torchrl.objectives.value import TDLambdaEstimator

from aefrl import keys
from aefrl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from aefrl.envs import ImaginationEnv, make_dmc_env
from aefrl.world_model import modules as wm_modules
from agents import modules as modules_module
from agents.dreamer import DreamerAgent
from agents.factory import build_agent
from agents.modules import (
    IS_INIT,
    ActorAction,
    actor_module,
    agent_from_checkpoint,
    check_latent,
    critic_module,
    load_agent,
    policy_module,
    policy_transforms,
    value_module,
)
from agents.planner import PlannerAgent
from tests.tiny_run import write_tiny_dreamer_run
from tests.world_model.conftest import OBS


def _randomise(module: nn.Module, seed: int) -> None:
    """Random weights everywhere: the untrained heads' zero-initialised output layers would make
    every action, value and reward the same."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture
def tiny_run(tmp_path):
    """A tiny aef Dreamer checkpoint with random weights; episodes of 5 agent steps."""
    conf = write_tiny_dreamer_run(tmp_path, time_limit=0.1)
    state = load_checkpoint(tmp_path)
    agent = build_agent(conf["agent"], conf["obs_model"], OBS, 1)
    _randomise(agent, seed=1)
    state["agent"] = agent.state_dict()
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    return tmp_path, agent


def test_load_agent_builds_the_runs_agent_with_its_weights_in_eval_mode(tiny_run):
    run_dir, saved = tiny_run
    agent = load_agent(run_dir)
    assert isinstance(agent, DreamerAgent) and not agent.training
    loaded, expected = agent.state_dict()["modules"], saved.state_dict()["modules"]
    assert loaded.keys() == expected.keys()
    for name, value in loaded.items():
        assert torch.equal(value, expected[name]), name
    assert agent.action_dim == 1  # read off the weights: cartpole has one actuator
    placed = load_agent(run_dir, map_location={"cpu": "cpu"})  # torch.load's other forms too
    assert torch.equal(placed.actor.net[0].weight, agent.actor.net[0].weight)


def test_load_agent_gives_a_planner_runs_planner(tmp_path):
    conf = write_tiny_dreamer_run(tmp_path)
    state = load_checkpoint(tmp_path)
    state["run_config"]["agent"] = dict(conf["agent"], name="planner")
    planner = build_agent(state["run_config"]["agent"], conf["obs_model"], OBS, 1)
    state["agent"] = planner.state_dict()
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    planner = load_agent(tmp_path / "checkpoint.pt")
    assert isinstance(planner, PlannerAgent)
    with pytest.raises(TypeError, match="got PlannerAgent"):
        policy_module(planner)


def test_load_agent_says_in_one_line_what_does_not_fit(tmp_path):
    conf = write_tiny_dreamer_run(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_agent(tmp_path / "nowhere")
    state = load_checkpoint(tmp_path)
    state["run_config"]["agent"]["world_model"] = dict(conf["agent"]["world_model"], hidden=24)
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CheckpointError) as info:
        load_agent(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("the checkpoint's weights do not match its configuration: ")
    assert "is [16, " in message and "in the checkpoint, [24, " in message
    assert "more shapes differ" in message

    state = load_checkpoint(tmp_path)
    state["run_config"] = conf
    message = r"\(trained on 'cartpole-swingup'\) takes 1-d actions, the environment given has 6"
    with pytest.raises(CheckpointError, match=message):
        agent_from_checkpoint(state, action_dim=6)
    # Weights that are not the configuration's read a wrong action size off the RSSM's input
    # layer; they were refused for the task's actions ("takes 3-d actions").
    edited = {**state, "run_config": {**conf, "obs_model": {**conf["obs_model"], "latent_dim": 1}}}
    for action_dim in (1, None):
        with pytest.raises(CheckpointError, match="weights do not match its configuration: "):
            agent_from_checkpoint(edited, action_dim=action_dim)
    edited["run_config"]["obs_model"]["latent_dim"] = 9
    with pytest.raises(CheckpointError, match=r"img_in.0.weight reads 4 inputs, fewer than obs_"):
        agent_from_checkpoint(edited, action_dim=1)
    del state["agent"]["modules"]["world_model.rssm.img_in.0.weight"]
    with pytest.raises(CheckpointError, match=r"holds no world model \(no world_model\.\*\)"):
        agent_from_checkpoint(state)


def test_load_world_model_reads_the_checkpoint_onto_the_cpu_whatever_the_device(
    tiny_run, monkeypatch
):
    """The checkpoint's replay and optimiser states stay on the CPU; only the model moves."""
    run_dir, _ = tiny_run
    seen = []

    def spy(path, map_location="cpu"):
        seen.append(map_location)
        return load_checkpoint(path, map_location=map_location)

    monkeypatch.setattr(wm_modules, "load_checkpoint", spy)
    wm = wm_modules.load_world_model(run_dir, map_location="meta")
    assert seen == ["cpu"]
    assert next(wm.parameters()).device.type == "meta"


@pytest.mark.parametrize(
    ("obs_model", "explore", "num_envs"), [("aef", False, 1), ("vae", True, 1), ("aef", True, 2)]
)
def test_policy_rollout_acts_exactly_as_the_agent_across_episode_ends(
    tmp_path, obs_model, explore, num_envs
):
    """torchrl's env.rollout with policy_module / policy_transforms takes the actions and
    filters the states DreamerAgent.act takes on the same frames, resets included: for the
    deterministic and the sampling posterior, acting by the mode or by samples with the run's
    explore_noise (the same draws), on one env and on a batch of two whose episodes end at
    different steps (partial resets); rows keep the carry they were filtered with (zeros at a
    start) and the new one is under "next"; and it builds no autograd graph."""
    from torchrl.envs import SerialEnv

    write_tiny_dreamer_run(tmp_path, time_limit=0.1, obs_model=obs_model)
    state = load_checkpoint(tmp_path)
    conf = state["run_config"]
    agent = build_agent(conf["agent"], conf["obs_model"], OBS, 1)
    _randomise(agent, seed=1)
    state["agent"] = agent.state_dict()
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    agent = load_agent(tmp_path)
    agent.explore_noise = 0.3 if explore else 0.0  # collected as DreamerAgent.act collects

    def make(limit):
        return lambda: make_dmc_env(
            "cartpole-swingup", image_size=OBS[-1], render="fast", time_limit=limit
        )

    base = make(0.1)() if num_envs == 1 else SerialEnv(2, [make(0.1), make(0.16)])
    env = TransformedEnv(base, policy_transforms(agent))
    torch.manual_seed(3)
    rollout = env.rollout(13, policy_module(agent, explore=explore), break_when_any_done=False)
    env.close()
    assert not rollout["next", keys.BELIEF].requires_grad and not rollout[keys.ACTION].requires_grad
    rows = rollout if num_envs > 1 else rollout.unsqueeze(0)  # [N, T]
    starts = [r.flatten().nonzero().flatten().tolist() for r in rows[IS_INIT]]
    assert starts[0] == [0, 5, 10]  # three episodes: the carry is reset twice on the way
    assert num_envs == 1 or starts[1] == [0, 8]  # the second env's reset is a partial one
    torch.manual_seed(3)
    carry = agent.initial_carry(num_envs)
    mode = "explore" if explore else "eval"
    for t in range(rows.shape[1]):
        step = rows[:, t]
        first = step[IS_INIT]  # [N, 1]
        # The row keeps the carry it was filtered with: the last step's, the primer's zeros at
        # a start (torchrl's recurrent layout) ...
        assert torch.equal(step[keys.BELIEF], torch.where(first, 0.0, carry.state.h)), t
        assert torch.equal(step[keys.STATE], torch.where(first, 0.0, carry.state.z)), t
        assert torch.equal(step[keys.PREV_ACTION], torch.where(first, 0.0, carry.prev_action)), t
        action, carry = agent.act(step[keys.PIXELS], first, carry, mode)
        assert torch.equal(action, step[keys.ACTION]), t
        # ... and the new one is under "next", where torchrl takes the next row's from.
        assert torch.equal(carry.state.h, step["next", keys.BELIEF]), t
        assert torch.equal(carry.state.z, step["next", keys.STATE]), t
        assert torch.equal(action, step["next", keys.PREV_ACTION]), t
    for t in range(rows.shape[1] - 1):  # within episodes, "next" is the next row
        goes_on = ~rows[IS_INIT][:, t + 1].squeeze(-1)
        for key in (keys.BELIEF, keys.STATE, keys.PREV_ACTION):
            assert torch.equal(rows["next", key][goes_on, t], rows[key][goes_on, t + 1]), (key, t)
    assert rows[keys.ACTION].std() > 0  # the actions depend on the frames


def test_value_module_gives_torchrl_td_lambda_the_values_of_the_filtered_frames(tmp_path):
    """On a real rollout of policy_module, TDLambdaEstimator with value_module gives the
    λ-returns of an independent recursion on V(s_t) = critic(h_t, z_t), the states
    DreamerAgent.act filters frame by frame (the last bootstrap from the final next frame);
    value_module writes nothing but the value. Under vmap (the estimator's default) it says
    what to change."""
    write_tiny_dreamer_run(tmp_path, time_limit=0.1)
    state = load_checkpoint(tmp_path)
    conf = state["run_config"]
    agent = build_agent(conf["agent"], conf["obs_model"], OBS, 1)
    _randomise(agent, seed=2)
    agent.eval()
    env = TransformedEnv(
        make_dmc_env("cartpole-swingup", image_size=OBS[-1], render="fast", time_limit=1.0),
        policy_transforms(agent),
    )
    rollout = env.rollout(9, policy_module(agent, explore=False))
    env.close()
    before = set(rollout.keys(True))
    gamma, lmbda = 0.9, 0.8
    with torch.no_grad():
        value = value_module(agent)
        estimator = TDLambdaEstimator(
            gamma=gamma, lmbda=lmbda, value_network=value, deactivate_vmap=True
        )
        estimated = estimator(rollout.clone())
        target = estimated["value_target"].squeeze(-1).double()  # [T]
        advantage = estimated["advantage"].squeeze(-1).double()
        with pytest.raises(RuntimeError, match="build torchrl's value estimator with deactivate"):
            TDLambdaEstimator(gamma=gamma, lmbda=lmbda, value_network=value)(rollout.clone())
        frames = torch.cat([rollout[keys.PIXELS], rollout["next", keys.PIXELS][-1:]])
        carry, values = agent.initial_carry(1), []
        for t, frame in enumerate(frames):
            _, carry = agent.act(frame[None], torch.tensor([[t == 0]]), carry, "eval")
            feat = torch.cat([carry.state.h, carry.state.z], -1)
            values.append(agent.critic(feat).mean.double().squeeze(0))
    values = torch.stack(values)  # V(s_0) .. V(s_T)
    assert values.std() > 0
    reward = rollout["next", keys.REWARD].squeeze(-1).double()
    assert not rollout["next", keys.DONE].any()
    expected, ret = torch.empty_like(reward), values[-1]
    for t in reversed(range(len(reward))):
        ret = reward[t] + gamma * ((1 - lmbda) * values[t + 1] + lmbda * ret)
        expected[t] = ret
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)
    # The advantage reads the root's values: V(s_t), frame t filtered with the row's carry.
    torch.testing.assert_close(advantage, expected - values[:-1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = value_module(agent)(rollout.clone())
    assert set(out.keys(True)) == before | {keys.STATE_VALUE}


def test_critic_module_gives_torchrl_td_lambda_the_critics_values(tiny_run):
    """TDLambdaEstimator over an imagined rollout with critic_module as its value network gives
    the λ-returns of an independent float64 recursion on the critic's own values."""
    _, agent = tiny_run
    agent.eval()
    wm, gamma, lmbda, n, horizon = agent.world_model, 0.9, 0.8, 4, 6
    env = ImaginationEnv(wm)
    g = torch.Generator().manual_seed(0)
    start = TensorDict(
        {
            keys.BELIEF: torch.randn(n, wm.rssm.deter, generator=g),
            keys.STATE: torch.randn(n, wm.rssm.latent_dim, generator=g),
        },
        [n],
    )
    with torch.no_grad():
        td = env.reset(start, set_state=True)
        rollout = env.rollout(horizon, actor_module(agent.actor), auto_reset=False, tensordict=td)
        value = critic_module(agent.critic)
        target = TDLambdaEstimator(gamma=gamma, lmbda=lmbda, value_network=value)(rollout)[
            "value_target"
        ]  # [n, horizon, 1]
        feat = torch.cat([rollout["next", keys.BELIEF], rollout["next", keys.STATE]], -1)
        v_next = agent.critic(feat).mean.double()  # v(s_{k+1}), [n, horizon]
    assert v_next.std() > 0
    reward = rollout["next", keys.REWARD].squeeze(-1).double()
    expected = torch.empty_like(reward)
    ret = v_next[:, -1]
    for k in reversed(range(horizon)):
        ret = reward[:, k] + gamma * ((1 - lmbda) * v_next[:, k] + lmbda * ret)
        expected[:, k] = ret
    torch.testing.assert_close(target.squeeze(-1).double(), expected, rtol=1e-5, atol=1e-5)


def test_actor_module_explores_by_sampling_and_otherwise_takes_the_mode(tiny_run):
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    _, agent = tiny_run
    td = TensorDict(
        {keys.BELIEF: torch.randn(64, agent.world_model.rssm.deter),
         keys.STATE: torch.randn(64, agent.world_model.rssm.latent_dim)},
        [64],
    )  # fmt: skip
    feat = torch.cat([td[keys.BELIEF], td[keys.STATE]], -1)
    with torch.no_grad():
        mode = actor_module(agent.actor)(td.clone())[keys.ACTION]
        torch.testing.assert_close(mode, agent.actor(feat).deterministic_sample.clamp(-1, 1))
        sample = actor_module(agent.actor, explore=True)(td.clone())[keys.ACTION]
        # By default it follows torchrl's exploration type: collectors set RANDOM.
        follows = actor_module(agent.actor)
        for kind, expected in (
            (ExplorationType.RANDOM, None),
            (ExplorationType.DETERMINISTIC, mode),
        ):
            with set_exploration_type(kind):
                torch.manual_seed(3)
                action = follows(td.clone())[keys.ACTION]
            if expected is None:  # the same draw as explore=True's from the same seed
                torch.manual_seed(3)
                expected = actor_module(agent.actor, explore=True)(td.clone())[keys.ACTION]
                assert not torch.allclose(action, mode)
            torch.testing.assert_close(action, expected, rtol=0, atol=0)
        with set_exploration_type(ExplorationType.RANDOM):  # an explicit choice wins
            fixed = actor_module(agent.actor, explore=False)(td.clone())[keys.ACTION]
        torch.testing.assert_close(fixed, mode, rtol=0, atol=0)
    assert sample.shape == (64, 1) and sample.abs().max() <= 1
    assert not torch.allclose(sample, mode)


def test_actor_action_takes_its_noise_as_an_argument(tiny_run):
    """Given the draw, the plain-tensor actor module is deterministic and acts as
    ``Actor.act`` does on that draw."""
    _, agent = tiny_run
    belief = torch.randn(16, agent.world_model.rssm.deter)
    state = torch.randn(16, agent.world_model.rssm.latent_dim)
    noise = torch.randn(16, 1)
    module = modules_module.ActorAction(agent.actor, explore=True)
    with torch.no_grad():
        torch.manual_seed(0)
        a = module(belief, state, noise)
        torch.manual_seed(1)
        b = module(belief, state, noise)
        want = agent.actor.act(torch.cat([belief, state], -1), explore=True, noise=noise)
    assert torch.equal(a, b) and torch.equal(a, want)
    assert not torch.equal(a, module(belief, state, -noise))


def test_torchrl_dreamer_actor_loss_trains_the_actor_module(tiny_run):
    """torchrl's DreamerActorLoss samples under RANDOM and backpropagates its returns through
    the actions: the actor's samples were drawn without a gradient (``sample``), and its
    backward failed with "element 0 of tensors does not require grad"."""
    from torchrl.objectives import DreamerActorLoss

    _, agent = tiny_run
    rssm = agent.world_model.rssm
    start = TensorDict(
        {
            keys.BELIEF: torch.randn(4, rssm.deter),
            keys.STATE: torch.randn(4, rssm.latent_dim),
            keys.REWARD: torch.zeros(4, 1),
            keys.DONE: torch.zeros(4, 1, dtype=torch.bool),
            keys.TERMINATED: torch.zeros(4, 1, dtype=torch.bool),
        },
        [4],
    )
    loss = DreamerActorLoss(
        actor_module(agent.actor),
        critic_module(agent.critic),
        ImaginationEnv(agent.world_model),
        imagination_horizon=3,
    )
    torch.manual_seed(0)
    out, _ = loss(start)
    out["loss_actor"].backward()
    grads = [p.grad for p in agent.actor.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    with torch.no_grad():  # acting draws as before, without a graph
        action = actor_module(agent.actor, explore=True)(start.clone())[keys.ACTION]
    assert not action.requires_grad


def test_load_agent_compiles_only_when_asked_and_checks_the_device_first(tiny_run, monkeypatch):
    """A run trained with agent.compile=true was compiled whenever it was loaded (13 s before a
    6-step CPU rollout's first action), with no way to turn it off; a device this machine lacks
    was a deep torch error after the whole checkpoint had been read."""
    run_dir, _ = tiny_run
    state = load_checkpoint(run_dir)
    state["run_config"]["agent"]["compile"] = True
    save_checkpoint(run_dir / "checkpoint.pt", state)
    eager, compiled = load_agent(run_dir), load_agent(run_dir, compile=True)
    # compile_steps replaces the RSSM's step methods on the instance (aefrl/compiled.py)
    assert "filter_step" not in vars(eager.world_model.rssm)
    assert "filter_step" in vars(compiled.world_model.rssm)

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the device was checked")

    monkeypatch.setattr(modules_module, "load_checkpoint", never)
    with pytest.raises(ValueError, match="map_location=gpu is not a device: use auto, cpu, cuda"):
        load_agent(run_dir, map_location="gpu")


def test_the_actor_and_critic_modules_name_a_latent_they_cannot_take(tiny_run):
    """A wrong size, batch shape or dtype is one sentence (it was a matmul error from deep in
    the MLP); a valid pair passes."""
    _, agent = tiny_run
    rssm = agent.world_model.rssm
    h, z = torch.zeros(2, rssm.deter), torch.zeros(2, rssm.latent_dim)
    features = rssm.deter + rssm.latent_dim
    for name, module in (
        ("actor", actor_module(agent.actor)),
        ("critic", critic_module(agent.critic)),
    ):
        plain = module.module
        assert plain(h, z).shape[0] == 2
        size = rf"the {name} reads belief and state of {features} features together"
        with pytest.raises(
            ValueError, match=size + rf".*got {rssm.deter + 1} \+ {rssm.latent_dim}"
        ):
            plain(torch.zeros(2, rssm.deter + 1), z)
        with pytest.raises(ValueError, match=r"share their batch shape, got \[2\] and \[3\]"):
            plain(h, torch.zeros(3, rssm.latent_dim))
        with pytest.raises(
            ValueError, match=rf"state must be torch.float32 \(the {name}'s dtype\)"
        ):
            plain(h, z.double())
    # The collection noise is for acting: a loss would differentiate through clipped actions.
    noisy = ActorAction(agent.actor, explore=True, collect_noise=0.3)
    with pytest.raises(RuntimeError, match="collect_noise is for acting"):
        noisy(h, z)
    with torch.no_grad():
        many = noisy(torch.zeros(512, rssm.deter), torch.zeros(512, rssm.latent_dim))
    assert many.abs().max() == 1  # clipped, and some at the bounds
    # The slow critic is a critic too (bootstrap: slow reads it).
    assert critic_module(agent.slow_critic).module(h, z).shape == (2, 1)
    with pytest.raises(ValueError, match="the slow critic reads belief and state"):
        check_latent(torch.zeros(2, rssm.deter + 1), z, agent.slow_critic, "slow critic")
    # Checks read shapes and dtypes only: meta tensors (shape inference) pass.
    meta = critic_module(copy.deepcopy(agent.critic).to("meta")).module
    assert meta(h.to("meta"), z.to("meta")).shape == (2, 1)


def test_torchrls_collector_finds_the_policys_carry_primer_itself():
    """torchrl's hook for recurrent policies: get_env_transforms_from_module finds
    make_tensordict_primer on the policy, and a Collector on a bare env registers InitTracker
    and the primer itself (auto_register_policy_transforms), collecting what env.rollout with
    policy_transforms collects on the same episodes (mode actions, aef: deterministic)."""
    torch.manual_seed(0)
    agent = DreamerAgent(
        OBS, 1, world_model=dict(latent_dim=3, deter=8, hidden=16, layers=1, depth=4)
    )
    _randomise(agent, seed=4)
    policy = policy_module(agent, explore=False)
    tracker, primer = get_env_transforms_from_module(policy)
    assert isinstance(tracker, InitTracker) and isinstance(primer, TensorDictPrimer)
    assert set(primer.primers.keys()) == {keys.BELIEF, keys.STATE, keys.PREV_ACTION}
    # It pickles (torchrl's multi-process collectors send the policy to their workers), and a
    # copy in float64 makes a float64 carry.
    assert pickle.loads(pickle.dumps(policy)).make_tensordict_primer().primers.shape == ()
    double = copy.deepcopy(policy).double().make_tensordict_primer()
    assert double.primers[keys.BELIEF].dtype == torch.float64
    assert primer.primers[keys.BELIEF].dtype == torch.float32

    def env():
        return make_dmc_env(
            "cartpole-swingup", image_size=OBS[-1], render="fast", time_limit=0.1, seed=3
        )

    collector = Collector(
        env(), policy, frames_per_batch=13, total_frames=13, auto_register_policy_transforms=True
    )
    collected = next(iter(collector))
    collector.shutdown()
    rollout = TransformedEnv(env(), policy_transforms(agent)).rollout(
        13, policy, break_when_any_done=False
    )
    assert collected[IS_INIT].flatten().nonzero().flatten().tolist() == [0, 5, 10]
    for key in (keys.PIXELS, keys.ACTION, keys.BELIEF, ("next", keys.BELIEF), ("next", keys.STATE)):
        assert torch.equal(collected[key], rollout[key]), key
