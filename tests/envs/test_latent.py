"""LatentObservation: a world model's filtered latents as a real torchrl env's observations."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torchrl.envs import CatTensors, Compose, InitTracker, SerialEnv, TransformedEnv
from torchrl.envs.transforms import Transform
from torchrl.envs.utils import check_env_specs, step_mdp
from torchrl.objectives import SoftUpdate

from aefrl import keys
from aefrl.envs import LatentObservation, make_dmc_env
from aefrl.world_model import RSSMState, WorldModel
from aefrl.world_model.modules import filter_step

IS_INIT = "is_init"


def tiny_model(kind="aef", seed=0) -> WorldModel:
    torch.manual_seed(seed)
    wm = WorldModel((3, 64, 64), 1, kind, latent_dim=3, deter=8, hidden=16, layers=1, depth=4)
    for p in wm.parameters():  # away from the initialisation, so that h and z vary with inputs
        p.data.add_(0.1 * torch.randn_like(p))
    return wm


def make(limit):
    return lambda: make_dmc_env("cartpole-swingup", render="fast", time_limit=limit)


def latent_env(wm, num_envs=1):
    base = make(0.1)() if num_envs == 1 else SerialEnv(2, [make(0.1), make(0.16)])
    return TransformedEnv(base, Compose(InitTracker(init_key=IS_INIT), LatentObservation(wm)))


@pytest.mark.parametrize("num_envs", [1, 2])
def test_latents_are_the_acting_agents_filtered_states_across_resets(num_envs):
    """Each row holds h_t, z_t of its own frame, filtered from the previous row's state with the
    action executed there (zeros at a start), as the Dreamer agent filters when it acts
    (filter_step); "next" holds the next frame's. Two envs whose episodes end at different
    steps reset one at a time, and the other keeps its carry."""
    wm = tiny_model()
    env = latent_env(wm, num_envs)
    torch.manual_seed(1)
    rollout = env.rollout(13, break_when_any_done=False)  # uniform random actions
    env.close()
    rows = rollout if num_envs > 1 else rollout.unsqueeze(0)  # [N, T]
    starts = [r.flatten().nonzero().flatten().tolist() for r in rows[IS_INIT]]
    assert starts[0] == [0, 5, 10]
    assert num_envs == 1 or starts[1] == [0, 8]  # a partial reset
    state = wm.rssm.initial(num_envs)
    prev_action = torch.zeros(num_envs, 1)
    with torch.no_grad():
        for t in range(rows.shape[1]):
            step = rows[:, t]
            first = step[IS_INIT]
            state, _, _ = filter_step(wm, state, prev_action, step[keys.PIXELS], first)
            assert torch.equal(step[keys.BELIEF], state.h), t
            assert torch.equal(step[keys.STATE], state.z), t
            following, _, _ = filter_step(
                wm, state, step[keys.ACTION], step["next", keys.PIXELS], torch.zeros_like(first)
            )
            assert torch.equal(step["next", keys.BELIEF], following.h), t
            assert torch.equal(step["next", keys.STATE], following.z), t
            prev_action = step[keys.ACTION]
    assert rows[keys.STATE].std(dim=(0, 1)).min() > 0  # the states follow the frames
    assert not rows[keys.BELIEF].requires_grad


def test_a_partial_reset_called_directly_keeps_the_other_envs_carry():
    env = latent_env(tiny_model(), 2)
    td = env.reset()
    for _ in range(3):
        td = step_mdp(env.step(env.rand_action(td)))
    before = td.select(keys.BELIEF, keys.STATE).clone()
    out = env.reset(td.set("_reset", torch.tensor([[False], [True]])))
    env.close()
    assert out[IS_INIT].flatten().tolist() == [False, True]
    for key in (keys.BELIEF, keys.STATE):
        assert torch.equal(out[key][0], before[key][0]), key
    assert not torch.equal(out[keys.STATE][1], before[keys.STATE][1])


@pytest.mark.parametrize("kind", ["aef", "vae"])
def test_specs_hold_and_torchrls_sac_learns_on_the_latents(kind):
    """check_env_specs passes for one env and for a SerialEnv; torchrl's SACLoss, with actor
    and Q-networks on the concatenated latents, gives finite losses whose gradients reach its
    networks and not the frozen world model."""
    wm = tiny_model(kind)
    for num_envs in (1, 2):
        env = latent_env(wm, num_envs)
        check_env_specs(env, seed=0)
        env.close()
    env = latent_env(wm)
    env.append_transform(CatTensors([keys.BELIEF, keys.STATE], "observation", del_keys=False))
    features = env.observation_spec["observation"].shape[-1]
    assert features == wm.rssm.deter + wm.rssm.latent_dim
    actor, loss = _latent_sac_example().sac(features, env, hidden=32)  # the example's SAC
    rollout = env.rollout(8, actor, break_when_any_done=False)
    env.close()
    SoftUpdate(loss, eps=0.995)  # the target networks' updater, as a SAC script makes one
    out = loss(rollout)
    total = out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in actor.parameters())
    transform = next(t for t in env.transform if isinstance(t, LatentObservation))
    assert all(p.grad is None for p in transform.world_model.parameters())  # the copy it runs


def _latent_sac_example():
    """docs/examples/latent_sac.py as a module (its SAC networks and loss)."""
    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "latent_sac.py"
    spec = importlib.util.spec_from_file_location("latent_sac", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_input_is_one_sentence():
    with pytest.raises(TypeError, match=r"takes an aefrl WorldModel .* got Linear"):
        LatentObservation(torch.nn.Linear(2, 2))
    transform = LatentObservation(tiny_model())
    with pytest.raises(RuntimeError, match=r"inside an env .* posterior_module"):
        transform(latent_env(tiny_model()).reset())
    small = TransformedEnv(
        make_dmc_env("cartpole-swingup", image_size=32, render="fast"), transform
    )
    with pytest.raises(ValueError, match=r"pixels are \[3, 32, 32\], the world model's \[3, 64"):
        small.reset()
    with pytest.raises(ValueError, match=r"build the env with its run's env\.image_size"):
        small.observation_spec  # noqa: B018 (the spec is what is checked)
    small.close()
    # The carry is the transform's own observation: a transform that drops it is named.
    env = latent_env(tiny_model())
    env.append_transform(CatTensors([keys.BELIEF, keys.STATE], "observation"))  # del_keys
    with pytest.raises(KeyError, match=r"a later transform removed them"):
        env.rollout(2)
    env.close()


def test_the_transform_freezes_a_copy_and_leaves_the_model_given_trainable():
    """agent.world_model handed over goes on training (it used to be frozen in place, and the
    agent's next update failed); the transform's copy stays as it was."""
    wm = tiny_model()
    transform = LatentObservation(wm)
    assert all(p.requires_grad for p in wm.parameters()) and wm.training
    assert not any(p.requires_grad for p in transform.world_model.parameters())
    with torch.no_grad():
        next(wm.parameters()).add_(1.0)
    assert not torch.equal(next(wm.parameters()), next(transform.world_model.parameters()))


def test_the_copy_of_a_compiled_model_runs_its_own_weights():
    """compile_steps replaces the RSSM's steps and the heads' calls with compiled callables
    bound to the original: a plain deepcopy ran the original's weights (and followed them)."""
    import copy

    from aefrl.compiled import compile_steps

    wm = tiny_model()
    reference = copy.deepcopy(wm)  # the weights the transform is given, uncompiled
    compile_steps(wm, backend="eager")
    env = latent_env(wm)
    transform = next(t for t in env.transform if isinstance(t, LatentObservation))
    assert transform.world_model.rssm.filter_step.__self__ is transform.world_model.rssm
    with torch.no_grad():
        wm.rssm.gru.bias_ih.add_(1.0)  # the original trains on
    rollout = env.rollout(7, break_when_any_done=False)
    env.close()
    state, prev_action = reference.rssm.initial(1), torch.zeros(1, 1)
    with torch.no_grad():
        for t in range(rollout.shape[0]):
            step = rollout[t : t + 1]
            first = step[IS_INIT]
            state, _, _ = filter_step(reference, state, prev_action, step[keys.PIXELS], first)
            assert torch.equal(step[keys.BELIEF], state.h), t
            prev_action = step[keys.ACTION]


class _Halve(Transform):
    """An action rescaling: the policy's a becomes a / 2 for the env below."""

    def __init__(self):
        super().__init__(in_keys_inv=[keys.ACTION], out_keys_inv=[keys.ACTION])

    def _inv_apply_transform(self, action):
        return action * 0.5

    def transform_input_spec(self, input_spec):
        return input_spec


@pytest.mark.parametrize("nested", [False, True])
def test_an_action_rescaling_is_undone_before_the_model_reads_the_action(nested):
    """torchrl hands a transform's step the action after its TransformedEnv's inverse
    transforms (nested envs are merged): the frame is filtered with the action the DMC env
    executed, in the same env's Compose or in an env below."""
    wm = tiny_model()
    base = make(0.1)()
    if nested:
        env = TransformedEnv(TransformedEnv(base, _Halve()), LatentObservation(wm))
    else:
        env = TransformedEnv(base, Compose(LatentObservation(wm), _Halve()))
    td = env.reset()
    out = env.step(td.set(keys.ACTION, torch.full((1,), 0.8)))
    env.close()
    start = RSSMState(td[keys.BELIEF][None], td[keys.STATE][None])
    nxt = out["next"]
    filtered = {}
    with torch.no_grad():
        for a in (0.8, 0.4):
            first = torch.zeros(1, 1, dtype=torch.bool)
            s, _, _ = filter_step(wm, start, torch.full((1, 1), a), nxt[keys.PIXELS][None], first)
            filtered[a] = torch.equal(s.h[0], nxt[keys.BELIEF])
    assert filtered == {0.8: False, 0.4: True}
