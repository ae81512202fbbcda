"""aefrl.resume_overrides: which command-line settings would change a resumed run's configuration.

Configurations are composed by Hydra from the real configs/, as scripts/train.py composes them.
"""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from aefrl.resume_overrides import (
    CHOICES_KEY,
    command_line_conflicts,
    describe,
    group_choices,
    overridable_given,
    run_group_choices,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OVERRIDABLE = ("loop.total_frames", "loop.checkpoint_every", "threads")


def composed(overrides):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = group_choices(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def run_config(*overrides, record_choices=True) -> dict:
    """A run's configuration as train.py stores it."""
    cfg, choices = composed(overrides)
    conf = OmegaConf.to_container(cfg, resolve=True)
    if record_choices:
        conf[CHOICES_KEY] = choices
    return conf


def conflicts(run_conf, *overrides, compose=None):
    """command_line_conflicts on configurations Hydra composes from the real configs/."""
    cfg, choices = composed(overrides)
    return command_line_conflicts(
        list(overrides),
        OVERRIDABLE,
        cfg,
        compose or (lambda line: composed(line)[0]),
        choices,
        run_conf,
    )


def test_the_run_s_own_settings_pass_and_other_values_are_named():
    run = run_config("exp=smoke", "obs_model=vae", "seed=3", "loop.report_every=0")
    assert conflicts(run, "exp=smoke", "obs_model=vae", "seed=3", "loop.report_every=0") == []
    assert conflicts(run, "exp=smoke", "loop.total_frames=9000", "threads=1") == []
    assert conflicts(run, "seed=4") == [("seed", 4, 3)]
    assert conflicts(run, "agent.lr.model=0.001") == [("agent.lr.model", 0.001, 3e-4)]


def test_a_group_set_back_to_its_default_is_caught():
    """Composed with and without the override alike, so a comparison of the two missed it."""
    run = run_config("exp=smoke", "obs_model=vae")
    assert conflicts(run, "obs_model=aef") == [("obs_model", "aef", "vae")]
    assert conflicts(run, "exp=default") == [("exp", "default", "smoke")]
    assert "obs_model=aef (the run's: vae)" in describe(conflicts(run, "obs_model=aef", "seed=1"))
    assert "seed=1 (the run's: 0)" in describe(conflicts(run, "obs_model=aef", "seed=1"))


def test_a_key_set_back_to_its_default_is_caught():
    run = run_config("exp=smoke", "seed=3")
    assert conflicts(run, "seed=0") == [("seed", 0, 3)]


@pytest.mark.parametrize("record_choices", [True, False])
def test_a_group_option_setting_a_resumable_key_is_not_a_conflict(record_choices):
    """exp=cpu sets loop.checkpoint_every; a resume may have changed it since."""
    run = run_config("exp=cpu", record_choices=record_choices)
    assert run["loop"]["checkpoint_every"] != 12345
    run["loop"]["checkpoint_every"] = 12345
    assert conflicts(run, "exp=cpu") == []


def test_a_dict_value_is_compared_on_the_keys_it_names():
    run = run_config("exp=smoke")
    assert conflicts(run, "agent.world_model={deter: 32, hidden: 32}") == []
    assert conflicts(run, "agent.world_model={deter: 64}") == [("agent.world_model.deter", 64, 32)]
    # a resumable key inside a dict is given (and applied by train.py), not a conflict
    assert conflicts(run, "loop={total_frames: 600, eval_every: 0}") == [
        ("loop.eval_every", 0, run["loop"]["eval_every"])
    ]
    assert overridable_given(["loop={total_frames: 600}", "threads=1"], OVERRIDABLE) == [
        "loop.total_frames",
        "threads",
    ]
    assert overridable_given(["loop={eval_every: 0}"], OVERRIDABLE) == []


def test_values_are_spelled_as_on_the_command_line():
    text = describe([("a", None, 1.0), ("b", True, False), ("c", [1, 2], "x")])
    assert text == "a=null (the run's: 1.0), b=true (the run's: false), c=[1, 2] (the run's: x)"


def test_runs_from_before_the_recorded_choices():
    run = run_config("exp=smoke", "obs_model=vae", record_choices=False)
    assert run_group_choices(run) == {"obs_model": "vae", "agent": "dreamer"}
    assert conflicts(run, "obs_model=vae") == []
    assert conflicts(run, "obs_model=aef") == [("obs_model", "aef", "vae")]
    # exp was not recorded: the keys exp=cpu changes are compared (not the resumable ones)
    found = {k: v for k, v, old in conflicts(run, "exp=cpu")}
    assert found["agent.world_model.deter"] == 200 and "loop.checkpoint_every" not in found
    # ... and only those: the other overrides' keys are theirs (agent=planner matched by name)
    planner = run_config("agent=planner", "exp=smoke", record_choices=False)
    planner["agent"]["explore_noise"] = 0.2  # a default that changed since the run
    assert conflicts(planner, "agent=planner", "exp=smoke") == []
    # a key the run does not have passes at its default, and is named otherwise
    del run["agent"]["world_model"]["rssm_hidden"]
    assert conflicts(run, "agent.world_model.rssm_hidden=null") == []
    (clash,) = conflicts(run, "agent.world_model.rssm_hidden=8")
    assert clash[:2] == ("agent.world_model.rssm_hidden", 8)
    assert "(the run's: not set)" in describe([clash])


@pytest.mark.parametrize("given", ["runs/x/", "./runs/x", "runs/x"])
def test_run_dir_is_compared_as_a_path(given):
    run = run_config("run_dir=runs/x")
    assert conflicts(run, f"run_dir={given}") == []
    assert conflicts(run, "run_dir=runs/y") == [("run_dir", "runs/y", "runs/x")]


def test_a_dict_on_a_group_node_sets_keys_in_it():
    """obs_model={kind: vae} merges into the chosen option like any dict; taken for a group
    choice (obs_model, unchanged) it passed and the run went on as an AEF."""
    run = run_config("exp=smoke")
    assert conflicts(run, "obs_model={kind: vae}") == [("obs_model.kind", "vae", "aef")]
    assert conflicts(run, "loop={}") == []  # an empty dict names nothing


def test_an_override_that_cannot_be_left_out_alone_falls_back_to_all_of_them():
    """The keys an unrecorded group changes come from composing without it; when another
    override needs it (a key only its option has), Hydra cannot, and every checked override's
    changes are compared instead of a Hydra traceback."""
    from hydra.errors import ConfigCompositionException

    run = run_config("exp=smoke", record_choices=False)

    def compose(line):
        if "exp=cpu" not in line and "agent.world_model.depth=16" in line:
            raise ConfigCompositionException("Could not override 'agent.world_model.depth'")
        return composed(line)[0]

    found = {
        k for k, _, _ in conflicts(run, "exp=cpu", "agent.world_model.depth=16", compose=compose)
    }
    assert {"agent.world_model.deter", "agent.world_model.depth"} <= found


def test_non_finite_values_are_spelled_as_typed():
    assert describe([("loop.train_ratio", float("inf"), 512)]) == (
        "loop.train_ratio=inf (the run's: 512)"
    )
