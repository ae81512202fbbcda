"""The world model as tensordict modules, its loading, and the imagination env on torchrl."""

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs.utils import check_env_specs
from torchrl.objectives.value import TDLambdaEstimator

from aefrl import keys
from aefrl.checkpoint import CheckpointError, save_checkpoint
from aefrl.envs import ImaginationEnv
from aefrl.world_model import RSSMState
from aefrl.world_model import modules as wm_modules
from aefrl.world_model.modules import filter_step, load_world_model, world_model_modules
from agents.dreamer import DreamerAgent
from tests.world_model.conftest import ACTIONS, OBS, tiny_world_model

H, D = 8, 3  # deter and latent_dim of the tiny world model


def _trained_heads(wm):
    """Random output layers: the zero-initialised heads would predict exactly 0 everywhere."""
    torch.manual_seed(3)
    for head in (wm.reward_head, wm.continue_head):
        nn.init.normal_(head.net[-1].weight, std=0.5)
    return wm


def _latent(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, z = torch.randn(*shape, H, generator=g), torch.randn(*shape, D, generator=g)
    return TensorDict({keys.BELIEF: h, keys.STATE: z}, list(shape))


@pytest.mark.parametrize("predict_continue", [False, True])
def test_env_passes_check_env_specs_for_any_batch(kind, predict_continue):
    env = ImaginationEnv(tiny_world_model(kind), predict_continue=predict_continue)
    assert not env.batch_locked
    check_env_specs(env)  # reset from the RSSM's initial state, batch []
    for shape in ([5], [2, 3]):  # reset from given filtered states, any batch shape
        check_env_specs(env, tensordict=env.reset(_latent(*shape), set_state=True))


def test_step_is_the_prior_step_and_reward_the_reward_heads_mean(kind):
    wm = _trained_heads(tiny_world_model(kind))
    env = ImaginationEnv(wm, predict_continue=True)
    start = _latent(4)
    td = env.reset(start.clone(), set_state=True)
    assert torch.equal(td[keys.BELIEF], start[keys.BELIEF])
    assert torch.equal(td[keys.STATE], start[keys.STATE])
    action = torch.rand(4, ACTIONS) * 2 - 1
    torch.manual_seed(7)
    out = env.step(td.set(keys.ACTION, action))["next"]
    torch.manual_seed(7)  # the same prior noise
    expected = wm.rssm.img_step(RSSMState(start[keys.BELIEF], start[keys.STATE]), action)
    torch.testing.assert_close(out[keys.BELIEF], expected.h)
    torch.testing.assert_close(out[keys.STATE], expected.z)
    reward = wm.reward_head(expected.feat).mean.unsqueeze(-1)
    assert reward.abs().min() > 0
    torch.testing.assert_close(out[keys.REWARD], reward)
    torch.testing.assert_close(
        out[keys.PRED_CONTINUE], wm.continue_head(expected.feat).probs.unsqueeze(-1)
    )
    assert not out[keys.DONE].any() and not out[keys.TERMINATED].any()
    # env.world_model, the TensorDictSequential torchrl code may call itself, agrees.
    torch.manual_seed(7)
    module_out = env.world_model(td.clone())
    for key in (keys.BELIEF, keys.STATE, keys.REWARD, keys.PRED_CONTINUE):
        torch.testing.assert_close(module_out[key], out[key])
    # The transition samples the prior: another draw gives another z but the same h.
    again = env.step(td.set(keys.ACTION, action))["next"]
    assert torch.equal(again[keys.BELIEF], out[keys.BELIEF])
    assert not torch.equal(again[keys.STATE], out[keys.STATE])


def test_reset_observes_the_continue_probability_of_the_start_state(kind):
    """``pred_continue`` after a reset is the continue head's probability at the state reset
    to, given or the RSSM's initial one, as after a step; fails if reset writes a constant."""
    wm = _trained_heads(tiny_world_model(kind))
    env = ImaginationEnv(wm, predict_continue=True)
    start = _latent(4, seed=2)
    td = env.reset(start.clone(), set_state=True)
    with torch.no_grad():
        given = torch.cat([start[keys.BELIEF], start[keys.STATE]], -1)
        want = wm.continue_head(given).probs.unsqueeze(-1)
        zeros = wm.continue_head(torch.zeros(3, H + D)).probs.unsqueeze(-1)
    assert (want < 0.95).all() and want.std() > 0.01  # neither 1 nor one value
    torch.testing.assert_close(td[keys.PRED_CONTINUE], want)
    torch.testing.assert_close(env.reset(TensorDict({}, [3]))[keys.PRED_CONTINUE], zeros)


def test_states_from_a_rollout_with_a_time_dimension_start_a_rollout():
    """Start states selected from a rollout keep its "time" dimension name; a rollout from
    them stacked a second "time" and torchrl refused it. The caller's tensordict keeps its
    names."""
    env = ImaginationEnv(tiny_world_model("aef"))
    start = _latent(5)
    start.names = ["time"]
    rollout = env.rollout(3, auto_reset=False, tensordict=env.reset(start, set_state=True))
    assert rollout.shape == (5, 3) and rollout.names == [None, "time"]
    assert start.names == ["time"]


def test_reset_without_state_starts_from_zeros_and_refuses_missing_state():
    env = ImaginationEnv(tiny_world_model("aef"))
    td = env.reset(TensorDict({}, [2, 3]))
    assert td[keys.BELIEF].shape == (2, 3, H) and not td[keys.BELIEF].any()
    assert not td[keys.STATE].any()
    given = env.reset(_latent(2), set_state=False)  # the state is ignored unless asked for
    assert not given[keys.BELIEF].any()
    with pytest.raises(ValueError, match="needs \\['state'\\]"):
        env.reset(TensorDict({keys.BELIEF: torch.zeros(2, H)}, [2]), set_state=True)
    with pytest.raises(ValueError, match="needs \\['belief', 'state'\\]"):  # was a TypeError
        env.reset(set_state=True)


def test_an_env_on_another_device_than_its_model_is_refused():
    """torchrl's ModelBasedEnvBase moves the world model to its device in place, and only the
    modules it holds: the user's model ended up split across devices."""
    wm = tiny_world_model("aef")
    with pytest.raises(ValueError, match="device meta is not the world model's \\(cpu\\)"):
        ImaginationEnv(wm, device="meta")
    assert all(p.device.type == "cpu" for p in wm.parameters())
    assert ImaginationEnv(wm, device="cpu").device == torch.device("cpu")


def test_moving_the_env_or_a_planner_holding_it_is_refused_and_moves_nothing():
    """torch's module moves (env.to, planner.to, .double()) would move only the world-model
    pieces the env holds (its continue head, the specs and env.device stayed behind)."""
    from torchrl.modules import CEMPlanner

    wm = tiny_world_model("aef")
    env = ImaginationEnv(wm, predict_continue=True)
    planner = CEMPlanner(env, 3, optim_steps=1, num_candidates=4, top_k=2)
    for move in (lambda: env.to("meta"), lambda: planner.to("meta"), planner.double):
        with pytest.raises(ValueError, match="shares its world model and cannot move it"):
            move()
        assert {p.device.type for p in wm.parameters()} == {"cpu"}
        assert {p.dtype for p in wm.parameters()} == {torch.float32}
        assert env.device == torch.device("cpu") and env.action_spec.device.type == "cpu"
    assert env.to("cpu") is env and planner.to("cpu") is planner  # where it is: fine
    start = _latent(2).set(keys.ACTION, torch.zeros(2, ACTIONS))
    assert planner(env.reset(start, set_state=True))[keys.ACTION].shape == (2, ACTIONS)


def test_torchrl_td_lambda_runs_on_imagined_rollouts():
    """γ = λ = 1 and V = 0 make TD(λ)'s advantage the reward-to-go: torchrl reads our rewards,
    done flags and time axis as we mean them."""
    env = ImaginationEnv(_trained_heads(tiny_world_model("aef")))
    rollout = env.rollout(6, auto_reset=False, tensordict=env.reset(_latent(4), set_state=True))
    assert rollout.shape == (4, 6)

    class ZeroValue(nn.Module):
        def forward(self, belief, state):
            return belief.new_zeros(*belief.shape[:-1], 1)

    value = TensorDictModule(ZeroValue(), [keys.BELIEF, keys.STATE], [keys.STATE_VALUE])
    TDLambdaEstimator(gamma=1.0, lmbda=1.0, value_network=value)(rollout)
    reward = rollout["next", keys.REWARD]
    to_go = reward.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(rollout["advantage"], to_go)


def test_modules_match_the_world_model_on_any_batch_shape(kind):
    wm = _trained_heads(tiny_world_model(kind))
    m = world_model_modules(wm)
    td = _latent(2, 3)
    td[keys.PIXELS] = torch.randint(0, 256, (2, 3, *OBS), dtype=torch.uint8)
    td[keys.PREV_ACTION] = torch.rand(2, 3, ACTIONS) * 2 - 1
    td[keys.IS_FIRST] = torch.tensor([[True, False, False]] * 2).unsqueeze(-1)
    flat = td.reshape(6)
    torch.manual_seed(1)
    out = m["posterior"](td.clone())
    torch.manual_seed(1)
    state, mu_q, _ = filter_step(
        wm,
        RSSMState(flat[keys.BELIEF], flat[keys.STATE]),
        flat[keys.PREV_ACTION],
        flat[keys.PIXELS],
        flat[keys.IS_FIRST],
    )
    torch.testing.assert_close(out[keys.BELIEF].reshape(6, H), state.h)
    torch.testing.assert_close(out[keys.STATE].reshape(6, D), state.z)
    torch.testing.assert_close(out[keys.POSTERIOR_MEAN].reshape(6, D), mu_q)
    # The prior module takes its noise as an argument, like RSSM.img_step.
    noise = torch.randn(2, 3, D)
    action = torch.rand(2, 3, ACTIONS)
    h, z = m["prior"].module(out[keys.BELIEF], out[keys.STATE], action, noise)
    expected = wm.rssm.img_step(state, action.reshape(6, ACTIONS), noise.reshape(6, D))
    torch.testing.assert_close(h.reshape(6, H), expected.h)
    torch.testing.assert_close(z.reshape(6, D), expected.z)
    out = m["decoder"](m["continue"](m["reward"](out)))
    assert out[keys.PRED_REWARD].shape == (2, 3, 1)
    assert out[keys.PRED_CONTINUE].shape == (2, 3, 1)
    assert out[keys.RECO_PIXELS].shape == (2, 3, *OBS)
    assert out[keys.RECO_PIXELS].dtype == torch.uint8


def test_posterior_reads_torchrl_init_trackers_key_when_asked():
    """torchrl's InitTracker writes the episode-start flag as ``is_init``; the posterior reads it
    under that name with ``is_first_key``, with the same result as under ``is_first``."""
    from torchrl.envs.transforms import InitTracker

    wm = tiny_world_model("aef")
    td = _latent(4)
    td[keys.PIXELS] = torch.randint(0, 256, (4, *OBS), dtype=torch.uint8)
    td[keys.PREV_ACTION] = torch.rand(4, ACTIONS) * 2 - 1
    td[keys.IS_FIRST] = torch.tensor([True, False, True, False]).unsqueeze(-1)
    want = world_model_modules(wm)["posterior"](td.clone())
    init_key = InitTracker().init_key
    torchrl_td = td.clone().rename_key_(keys.IS_FIRST, init_key)
    got = world_model_modules(wm, is_first_key=init_key)["posterior"](torchrl_td)
    torch.testing.assert_close(got[keys.BELIEF], want[keys.BELIEF])
    torch.testing.assert_close(got[keys.STATE], want[keys.STATE])


def _run_config(kind):
    world_model = {"deter": H, "hidden": 16, "layers": 1, "depth": 4}
    return {
        "env": {"task": "cartpole-swingup", "image_size": OBS[-1]},
        "agent": {"name": "dreamer", "world_model": world_model},
        "obs_model": {"kind": kind, "latent_dim": D, "options": {}},
    }


def test_load_world_model_from_a_dreamer_checkpoint(tmp_path, kind):
    conf = _run_config(kind)
    wm_kwargs = dict(conf["agent"]["world_model"], obs_model=kind, latent_dim=D)
    agent = DreamerAgent(OBS, ACTIONS, world_model=wm_kwargs, actor={"hidden": 16, "layers": 1})
    _trained_heads(agent.world_model)
    state = {"format": 1, "run_config": conf, "agent": agent.state_dict()}
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    wm = load_world_model(tmp_path)
    assert wm.kind == kind and wm.action_dim == ACTIONS and not wm.training
    expected = agent.world_model.state_dict()
    for name, value in wm.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_world_model_builds_the_model_on_the_device_asked_for(tmp_path):
    """The model was built on the CPU and the weights copied into it, whatever map_location."""
    conf = _run_config("aef")
    wm_kwargs = dict(conf["agent"]["world_model"], obs_model="aef", latent_dim=D)
    agent = DreamerAgent(OBS, ACTIONS, world_model=wm_kwargs, actor={"hidden": 16, "layers": 1})
    save_checkpoint(
        tmp_path / "checkpoint.pt", {"format": 1, "run_config": conf, "agent": agent.state_dict()}
    )
    wm = load_world_model(tmp_path, map_location="cuda")
    assert all(p.is_cuda for p in wm.parameters()) and all(b.is_cuda for b in wm.buffers())


def test_load_world_model_says_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_world_model(tmp_path)
    no_model = {"format": 1, "run_config": _run_config("aef"), "agent": {"modules": {}}}
    save_checkpoint(tmp_path / "checkpoint.pt", no_model)
    with pytest.raises(CheckpointError, match="holds no world model"):
        load_world_model(tmp_path)
    save_checkpoint(tmp_path / "checkpoint.pt", {"format": 1, "weights": {}})
    with pytest.raises(CheckpointError, match="not an aefrl training checkpoint"):
        load_world_model(tmp_path / "checkpoint.pt")


def test_inputs_the_model_cannot_take_are_named_in_one_sentence():
    """They failed deep in torch (the GRU's "inconsistent hidden_size", a dtype mismatch in a
    matmul, an AttributeError on a missing action), or at the step after a reset took them."""
    wm = tiny_world_model("aef")
    env = ImaginationEnv(wm)
    wide = TensorDict({keys.BELIEF: torch.zeros(2, H + 1), keys.STATE: torch.zeros(2, D)}, [2])
    with pytest.raises(ValueError, match=f"belief must be \\[\\*B, {H}\\], got shape \\[2, 9\\]"):
        env.reset(wide, set_state=True)
    double = _latent(2).update({keys.STATE: torch.zeros(2, D, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"state must be torch.float32 .*got torch.float64"):
        env.reset(double, set_state=True)
    td = env.reset(_latent(2), set_state=True)
    with pytest.raises(KeyError, match=r"the step needs \['action'\]"):
        env.step(td.clone())
    td[keys.ACTION] = torch.zeros(2, ACTIONS + 1)
    with pytest.raises(ValueError, match=f"action must be \\[\\*B, {ACTIONS}\\], got shape"):
        env.step(td.clone())
    td[keys.ACTION] = torch.zeros(2, ACTIONS)
    assert env.step(td)["next", keys.BELIEF].shape == (2, H)
    prior = world_model_modules(wm)["prior"].module  # plain tensors: no tensordict to check
    with pytest.raises(ValueError, match=r"action has batch shape \[3\], belief \[2\]"):
        prior(torch.zeros(2, H), torch.zeros(2, D), torch.zeros(3, ACTIONS))
    # A torchrl pipeline's tensordict holds "is_init", not "is_first": the error says which
    # key reads it.
    td_init = _latent(6).update(
        {
            keys.PIXELS: torch.zeros(6, *OBS, dtype=torch.uint8),
            keys.PREV_ACTION: torch.zeros(6, ACTIONS),
        }
    )
    td_init[keys.IS_INIT] = torch.ones(6, 1, dtype=torch.bool)
    with pytest.raises(KeyError, match=r"is_first_key=\"is_init\" reads it"):
        world_model_modules(wm)["posterior"](td_init)
    # The posterior compares the frames' batch shape too: [3] frames for [2] states failed in
    # a reshape, and [2, 3] frames for [6] states were flattened into them without a word.
    posterior = world_model_modules(wm)["posterior"].module
    frames = torch.zeros(6, *OBS, dtype=torch.uint8)
    carry = (torch.zeros(6, ACTIONS), torch.zeros(6, 1, dtype=torch.bool), *_latent(6).values())
    assert posterior(frames, *carry)[0].shape == (6, H)
    for bad in (frames[:3], frames.view(2, 3, *OBS)):
        with pytest.raises(ValueError, match=r"pixels must be \[\*B, C, H, W\] with belief's"):
            posterior(bad, *carry)
    # Under autocast the step hands back a bf16 state, which the next step must take.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout = env.rollout(3, auto_reset=False, tensordict=td.clone())
        # ... and no other: a float64 state is still refused in one sentence.
        with pytest.raises(ValueError, match=r"state must be torch.float32 .*got torch.float64"):
            prior(torch.zeros(2, H), torch.zeros(2, D, dtype=torch.float64), td[keys.ACTION])
    assert rollout["next", keys.STATE].dtype == torch.bfloat16


def test_the_heads_and_the_decoder_name_a_latent_they_cannot_take():
    """The reward, continue and decoder modules check belief and state as the steps do (a
    wrong size was an error from a matmul deep in the head, a float64 state a dtype error)."""
    wm = tiny_world_model("aef")
    mods = world_model_modules(wm)
    for name in ("reward", "continue", "decoder"):
        module = mods[name].module
        assert module(torch.zeros(2, H), torch.zeros(2, D)).shape[0] == 2
        with pytest.raises(ValueError, match=rf"belief must be \[\*B, {H}\], got shape \[2, 5\]"):
            module(torch.zeros(2, 5), torch.zeros(2, D))
        with pytest.raises(ValueError, match=r"state has batch shape \[3\], belief \[2\]"):
            module(torch.zeros(2, H), torch.zeros(3, D))
        with pytest.raises(ValueError, match=r"state must be torch.float32 .*got torch.float64"):
            module(torch.zeros(2, H), torch.zeros(2, D, dtype=torch.float64))
    # The check keeps the world model out of the heads' own parameters.
    assert len(list(mods["reward"].module.parameters())) == len(list(wm.reward_head.parameters()))


def test_a_head_converted_on_its_own_checks_against_its_own_dtype():
    """``reward_module.double()`` converts the head, not the RSSM it reads sizes from: it takes
    float64 states (the check compared with the RSSM's float32 and refused them) and computes
    in float64, and refuses the float32 states it can no longer take."""
    wm = _trained_heads(tiny_world_model("aef"))
    mods = world_model_modules(wm)
    for name, head, stat in (
        ("reward", wm.reward_head, "mean"),
        ("continue", wm.continue_head, "probs"),
    ):
        module = mods[name].module.double()
        h, z = torch.randn(2, H, dtype=torch.float64), torch.randn(2, D, dtype=torch.float64)
        out = module(h, z)
        assert out.dtype == torch.float64
        expected = getattr(head(torch.cat([h, z], -1)), stat).unsqueeze(-1)
        torch.testing.assert_close(out, expected)
        with pytest.raises(ValueError, match=r"belief must be torch.float64 .*got torch.float32"):
            module(h.float(), z.float())
    assert wm.rssm.gru.weight_hh.dtype == torch.float32


def test_imagined_steps_check_their_inputs_once_not_again_in_the_heads(monkeypatch):
    """A step checks the state it is given (in the prior); the reward and continue heads read
    what the prior returned and skip the check, on the planner's hot path."""
    env = ImaginationEnv(_trained_heads(tiny_world_model("aef")), predict_continue=True)
    td = env.reset(_latent(4), set_state=True)
    calls = []
    real = wm_modules.check_step_inputs
    monkeypatch.setattr(wm_modules, "check_step_inputs", lambda *a: calls.append(a) or real(*a))
    env.rollout(3, auto_reset=False, tensordict=td)
    assert len(calls) == 3  # one per step: the prior's
    assert all(keys.ACTION in inputs for _, inputs, *_ in calls)


def test_posterior_refuses_an_episode_start_flag_without_its_last_axis():
    wm = tiny_world_model("aef")
    posterior = world_model_modules(wm)["posterior"]
    td = _latent(4).update(
        {
            keys.PIXELS: torch.zeros(4, *OBS, dtype=torch.uint8),
            keys.PREV_ACTION: torch.zeros(4, ACTIONS),
            keys.IS_FIRST: torch.ones(4, dtype=torch.bool),
        }
    )
    with pytest.raises(ValueError, match="is_first must be \\[\\*B, 1\\], got shape \\[4\\]"):
        posterior(td.clone())
    td[keys.IS_FIRST] = td[keys.IS_FIRST].unsqueeze(-1)
    assert posterior(td.clone())[keys.BELIEF].shape == (4, H)
    # Read under torchrl's key, the messages name that key; every missing input is named.
    with pytest.raises(KeyError, match=r"the step needs \['prev_action', 'is_init'\]"):
        world_model_modules(wm, is_first_key="is_init")["posterior"](td.exclude("prev_action"))


def test_load_world_model_says_what_is_wrong_with_the_configuration_or_the_device(
    tmp_path, monkeypatch
):
    """A configuration option another version wrote (TypeError) or a kind this one lacks
    (ValueError) escaped as such, past the example script and scripts/eval.py's handlers; a
    device this machine lacks was found only after reading the whole checkpoint."""
    conf = _run_config("aef")
    wm_kwargs = dict(conf["agent"]["world_model"], obs_model="aef", latent_dim=D)
    agent = DreamerAgent(OBS, ACTIONS, world_model=wm_kwargs, actor={"hidden": 16, "layers": 1})
    weights = agent.state_dict()

    def save():
        save_checkpoint(
            tmp_path / "checkpoint.pt", {"format": 1, "run_config": conf, "agent": weights}
        )

    conf["agent"]["world_model"]["new_option"] = 1
    save()
    with pytest.raises(CheckpointError, match=r"configuration is not valid: .*new_option"):
        load_world_model(tmp_path)
    del conf["agent"]["world_model"]["new_option"]
    conf["obs_model"]["kind"] = "flow"
    save()
    with pytest.raises(CheckpointError, match=r"configuration is not valid: .*'flow'"):
        load_world_model(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the device was checked")

    monkeypatch.setattr(wm_modules, "load_checkpoint", never)
    with pytest.raises(ValueError, match="map_location=gpu is not a device: use auto, cpu, cuda"):
        load_world_model(tmp_path, map_location="gpu")
    with pytest.raises(ValueError, match="map_location=cuda:99 "):  # no CUDA, or no 100th GPU
        load_world_model(tmp_path, map_location=torch.device("cuda", 99))
