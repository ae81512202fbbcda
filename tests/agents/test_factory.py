"""agents.factory: bad settings in the agent and obs_model configs are refused by their key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agents.factory import build_agent, name_keys

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def config(*overrides):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        preset = [] if any(o.startswith("exp=") for o in overrides) else ["exp=smoke"]
        cfg = compose("config", overrides=[*preset, *overrides])
    return OmegaConf.to_container(cfg.agent), OmegaConf.to_container(cfg.obs_model)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["agent.actor.hidden=0"], "agent.actor.hidden must be an integer >= 1, got 0"),
        (["agent.world_model.deter=-3"], "agent.world_model.deter must be an integer >= 1"),
        (["agent.critic.layers=2.5"], "agent.critic.layers must be an integer >= 0, got 2.5"),
        (["agent.world_model.reward_bins=1"], "reward_bins must be an integer >= 2"),
        (["agent.actor_loss.horizon=0"], "agent.actor_loss.horizon must be an integer >= 1"),
        (["agent=planner", "agent.planner.candidates=0"], "agent.planner.candidates must be"),
        # 4.5 used to build 4 latents (int() in the obs model) while the run recorded 4.5
        (["obs_model.latent_dim=4.5"], "obs_model.latent_dim must be an integer >= 1, got 4.5"),
        (["obs_model.latent_dim=true"], "obs_model.latent_dim must be an integer >= 1, got True"),
        (["agent=planner", "agent.planner.horizon=2.5"], "agent.planner.horizon must be an int"),
        (["agent.world_model.depth=8.5"], "agent.world_model.depth must be an integer >= 1"),
        (["+obs_model.options.hidden=1.5"], "obs_model.options.hidden must be an integer >= 1"),
        (["agent.world_model.rssm_hidden=0"], "agent.world_model.rssm_hidden must be an integer"),
        (["agent.world_model.rssm_hidden=2.5"], "agent.world_model.rssm_hidden must be an int"),
        (["agent.critic.twohot=real"], "agent.critic.twohot must be one of symlog, symexp"),
        (["agent.world_model.reward_twohot=x"], "agent.world_model.reward_twohot must be one of"),
        (["agent.value_loss.repval=-1"], "agent.value_loss.repval must be >= 0, got -1"),
        (["+agent.wm_loss.state_grad=true"], "agent.wm_loss.state_grad is not a setting"),
        (
            ["agent=planner", "+agent.wm_loss.state_grad=true"],
            "agent.wm_loss.state_grad is not a setting",
        ),
        (
            ["agent.value_loss.repval_grad=true"],
            "agent.value_loss.repval_grad=true trains the world model through the replay value "
            r"loss, which agent.value_loss.repval=0 turns off; set repval > 0 \(DreamerV3: 0.3\)",
        ),
    ],
)
def test_bad_sizes_name_their_key(overrides, message):
    agent, obs_model = config(*overrides)
    with pytest.raises(ValueError, match=message):
        build_agent(agent, obs_model, (3, 64, 64), 1)


def test_the_presets_pass():
    for exp in ("smoke", "cpu", "default"):
        for name in ("dreamer", "planner"):
            agent, obs_model = config(f"exp={exp}", f"agent={name}")
            built = build_agent(agent, obs_model, (3, 64, 64), 2)
            assert type(built).__name__.lower().startswith(name)


def test_rssm_hidden_null_is_hidden_and_a_number_sets_the_rssm():
    agent, obs_model = config("agent.world_model.hidden=24")
    assert agent["world_model"]["rssm_hidden"] is None
    assert build_agent(agent, obs_model, (3, 64, 64), 2).world_model.rssm.gru.input_size == 24
    agent, obs_model = config("agent.world_model.hidden=24", "agent.world_model.rssm_hidden=12")
    model = build_agent(agent, obs_model, (3, 64, 64), 2).world_model
    assert model.rssm.gru.input_size == 12 and model.reward_head.net[0].out_features == 24


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # the components name their arguments; the factory names the key the user typed
        (["agent.lr.model=-1"], "agent.lr.model must be > 0, got -1"),
        (["agent.grad_clip.actor=0"], "agent.grad_clip.actor must be > 0, got 0"),
        (["agent.actor_loss.gamma=2"], r"agent.actor_loss.gamma must lie in \(0, 1\], got 2"),
        (["agent.wm_loss.free_nats=-1"], "agent.wm_loss.free_nats must be >= 0, got -1"),
        (["agent.wm_loss.loss_scales.obs=-1"], "agent.wm_loss.loss_scales.obs must be >= 0"),
        (["agent.slow_critic_tau=0"], "agent.slow_critic_tau must lie in"),
        (["agent.world_model.alpha=0.7"], "agent.world_model.alpha must lie in"),
        (["agent.world_model.prior_std_min=0"], "agent.world_model.prior_std_min must be > 0"),
        (["agent.actor.dist=normal"], "agent.actor.dist must be one of tanh_normal, bounded_n"),
        (
            ["agent.actor.min_std=2"],
            "need 0 < agent.actor.min_std < agent.actor.max_std, got 2 and 1.0",
        ),
        (
            ["obs_model.options.sigma_x=foo"],
            "obs_model.options.sigma_x must be one of learned, head, fixed, got 'foo'",
        ),
        (
            ["obs_model.options.sigma_q_min=2"],
            "need 0 < obs_model.options.sigma_q_min < obs_model.options.sigma_q_max",
        ),
        (
            ["obs_model.options.projection=pca"],
            "obs_model.options.projection must be one of learned, random, got 'pca'",
        ),
        (
            ["agent.world_model.conv_style=v2"],
            "agent.world_model.conv_style must be one of v3, v1, got 'v2'",
        ),
        (
            ["agent=planner", "agent.planner.top_k=50", "agent.planner.candidates=10"],
            r"agent.planner.top_k \(50\) must not exceed agent.planner.candidates \(10\)",
        ),
        (["agent=planner", "agent.planner.method=grid"], "agent.planner.method must be one of"),
        (["agent=planner", "agent.explore_noise=-1"], "agent.explore_noise must be >= 0"),
        (["agent.explore_noise=-1"], "agent.explore_noise must be >= 0"),
        # a group of settings given a value: was "'int' object is not a mapping"
        (["agent.world_model=5"], "agent.world_model is a group of settings, not a value"),
        (["agent.lr=0.1"], r"agent.lr is a group of settings, not a value: set its keys"),
        (["obs_model.options=3"], "obs_model.options is a group of settings, not a value"),
        # an option of another observation model
        (
            ["obs_model=vae", "+obs_model.options.proposal_scale=0.5"],
            "obs_model.options.proposal_scale is an option of obs_model=aef only, not of vae",
        ),
        (
            ["obs_model=aef_partition", "+obs_model.options.projection=random"],
            "obs_model.options.projection is an option of obs_model=aef only, not of aef_part",
        ),
        (["+obs_model.options.colour=1"], "obs_model.options.colour is not an option of any"),
    ],
)
def test_bad_settings_name_their_full_key(overrides, message):
    agent, obs_model = config(*overrides)
    with pytest.raises(ValueError, match=message):
        build_agent(agent, obs_model, (3, 64, 64), 1)


def test_name_keys_leaves_values_ambiguous_words_and_accepted_lists_alone():
    sections = {
        "agent": {"world_model": {"hidden": 8, "alpha": 0.1}, "actor": {"hidden": 8}},
        "obs_model": {"kind": "aef", "options": {"sigma_x": "fixed"}},
    }
    assert name_keys("alpha must lie in (0, 0.5), got 0.7", sections).startswith(
        "agent.world_model.alpha must"
    )
    for message in [
        "hidden must be >= 1",  # two keys end in hidden: which one is unknown
        "image size 48x48 is not supported",
        "the observation model's context_dim (3) must equal the RSSM's deter (4)",
        "mode must be one of explore, eval, got 'sigma_x'",  # quoted: a value
        "unknown option(s) ['x'] for obs model 'aef'; accepted: sigma_x, hidden",
    ]:
        assert name_keys(message, sections) == message


@pytest.mark.parametrize("agent", ["dreamer", "planner"])
@pytest.mark.parametrize("kind", ["aef", "aef_partition", "vae"])
@pytest.mark.parametrize("exp", ["exp=smoke", "exp=default"])
def test_every_agent_builds_on_the_meta_device_as_it_builds_for_real(agent, kind, exp):
    """train.py checks every job's networks on the meta device (no memory) before the first
    job starts: a constructor that needs real values there (aef_partition's index checks did)
    would stop every run. The meta agent has the real one's parameters and buffers, shape for
    shape, all on the meta device."""
    import torch

    agent_conf, obs_conf = config(f"agent={agent}", f"obs_model={kind}", exp)
    with torch.device("meta"):
        meta = build_agent(agent_conf, obs_conf, (3, 64, 64), 6)
    real = build_agent(agent_conf, obs_conf, (3, 64, 64), 6)

    def shapes(module):
        return {k: t.shape for k, t in [*module.named_parameters(), *module.named_buffers()]}

    assert shapes(meta) == shapes(real)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])


def test_twohot_sets_the_reward_heads_and_the_critics_bins_apart():
    agent, obs_model = config("agent.world_model.reward_twohot=symexp")
    built = build_agent(agent, obs_model, (3, 64, 64), 2)
    assert built.world_model.reward_head.twohot == "symexp" and built.critic.twohot == "symlog"
    assert built.world_model.reward_head.bins[-1] > 4e8 and built.critic.bins[-1] == 20
    agent, obs_model = config("agent.critic.twohot=symexp")
    built = build_agent(agent, obs_model, (3, 64, 64), 2)
    assert built.critic.twohot == built.slow_critic.copy.twohot == "symexp"
    assert built.world_model.reward_head.twohot == "symlog"
