"""Command-line overrides checked against configs/ (aefrl/overrides.py)."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from aefrl.overrides import OverrideError, check_overrides, config_groups
from agents.factory import check_read_settings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def check(*args):
    check_overrides(CONFIGS, "config", list(args), check_read_settings)


def test_groups_are_the_config_directories():
    groups = config_groups(CONFIGS)
    assert groups["obs_model"] == ["aef", "aef_partition", "vae"]
    assert {"agent", "env", "exp", "logger"} <= set(groups)


@pytest.mark.parametrize(
    "args",
    [
        ("obs_model=vae", "exp=cpu", "env.task=cartpole-swingup", "seed=3"),
        ("loop.total_frames=1e6", "agent.lr.model=3e-4", "loop.train_ratio=0.5"),
        ("agent=planner", "agent.planner.candidates=300"),  # a key only that group choice has
        ("env.time_limit=5", "resume=runs/x", "device=cuda:1", "loop.cuda_graph=false"),
        ("hydra.run.dir=elsewhere", "++seed=3"),  # Hydra's keys, force-set
        ("loop={total_frames: 100}",),  # a group given as a mapping
        ("agent.world_model={deter: 32, hidden: 32}", "agent={lr: {model: 1e-4}}"),
        ("--cfg", "job", "whatever=1"),  # Hydra flags: the whole line is Hydra's
        ("-m", "seed=0,1,2", "obs_model=vae,aef", "loop.train_ratio=range(8,64,8)"),
        ("seed=0,1", "--multirun", "agent.compile=false,true"),
        ("-m", "obs_model=glob(*)"),  # expanded against configs/obs_model/
        ("-m", "resume=runs/a,runs/b"),  # each job its own run
        ("-m", "seed=tag(a,range(0,3))", "loop.train_ratio=shuffle(8,16)"),
        # a sweeper plugin's own sweep is left to it (interval: Optuna's)
        ("-m", "hydra/sweeper=optuna", "loop.train_ratio=interval(1,64)"),
    ],
)
def test_valid_overrides_pass(args):
    check(*args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("obs_model=flow",), "obs_model is one of aef, aef_partition, vae"),
        (("exp=fast",), "exp is one of cpu, default, smoke (configs/exp/)"),
        (
            ("exp=smok",),
            "exp is one of cpu, default, smoke (configs/exp/); did you mean exp=smoke?",
        ),
        (("agent=plannr",), "did you mean agent=planner?"),
        (("loop.total_frame=5",), "did you mean loop.total_frames?"),
        (("agent.actor.hiden=3",), "did you mean agent.actor.hidden?"),
        (
            ("obs_modle=vae",),
            "obs_modle is not a setting: no such key in configs/; did you mean obs_model?",
        ),
        (("nonsense=1",), "nonsense is not a setting"),
        (("agent/planner_exp=cpu",), "agent/planner_exp is chosen by the presets (configs/exp/)"),
        (("loop.total_frames=abc",), "total_frames takes a number (default 1000000), got 'abc'"),
        (("agent.actor.hidden=wide",), "agent.actor.hidden takes a number"),
        (("seed=null",), "seed takes a number"),
        (("logger.log_every=true",), "logger.log_every takes a number"),
        # planner keys exist only under agent=planner: a Dreamer run refuses them
        (("agent.planner.candidates=300",), "only agent=planner takes it"),
        # an option of one observation model, set for another: say whose it is
        (
            ("obs_model=vae", "obs_model.options.proposal_scale=0.5"),
            "obs_model.options.proposal_scale is not a setting of obs_model=vae: only "
            "obs_model=aef takes it",
        ),
        (("agent=planner", "agent.planner.candidates=many"), "takes a number"),
        (("x=[1",), "cannot parse the command line"),
        # "+" adds a key: none that configs/ lacks is read by anything
        (("+loop.total_frame=100",), "did you mean loop.total_frames?"),
        (("+extra=1",), "extra is not a setting"),
        (("+seed=3",), "seed is already a setting: write seed=..., without the +"),
        # a value for a whole group: Hydra passed it on and the run failed on it with a TypeError
        (("loop=5",), "loop is a group of settings, not a value: set its keys"),
        (("replay=abc",), "replay is a group of settings"),
        (("agent.lr=0.1",), "agent.lr is a group of settings"),
        # deleting a key the run reads: a KeyError traceback
        (("~seed",), "~seed deletes a setting, which the run needs; set it instead (seed=<value>)"),
        # several values without -m: Hydra's multi-line "Ambiguous value" report
        (("env.task=walker-walk,cartpole-swingup",), "gives several values: a sweep needs -m"),
        # inside a mapping, key by key (Hydra: a multi-line "not in struct" report)
        (
            ("loop={total_framez: 600}",),
            "loop.total_framez is not a setting: no such key in "
            "configs/; did you mean loop.total_frames?",
        ),
        (("agent={lr: {modle: 1}}",), "did you mean agent.lr.model?"),
        (("loop={total_frames: abc}",), "loop.total_frames takes a number"),
        (("agent={lr: 0.1}",), "agent.lr is a group of settings, not a value"),
        # run_config.yaml shows hydra_choices; it is a record, not one of Hydra's own settings
        (("hydra_choices.exp=cpu",), "hydra_choices.exp is not a setting: no such key"),
    ],
)
def test_bad_overrides_are_one_sentence(args, message):
    with pytest.raises(OverrideError) as info:
        check(*args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_boolean_keys_take_booleans():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config"), resolve=False)

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    key, default = next((k, v) for k, v in leaves(cfg) if isinstance(v, bool))
    check(f"{key}={str(not default).lower()}")
    with pytest.raises(OverrideError, match="takes true or false"):
        check(f"{key}=3")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("-m", "agent.compile=no,yes"),
            "agent.compile takes true or false (default False), got 'no'",
        ),
        (("-m", "seed=0,1", "obs_model=vae,aeff"), "obs_model=aeff is not a choice"),
        (("-m", "loop.total_frames=abc"), "loop.total_frames takes a number"),
        (("--multirun", "loop.total_frame=400,800"), "did you mean loop.total_frames?"),
        (("-m", "exp=smoke", "loop=5"), "loop is a group of settings, not a value"),
        # job 0 resumed and trained, then job 1 was refused the run job 0 held
        (("-m", "seed=0,1", "resume=runs/x"), "resumes the same run in several of its jobs"),
        (("-m", "resume=runs/a,runs/b", "seed=0,1"), "resumes the same run in several"),
        # Hydra's basic sweeper runs no interval: its traceback came after the checks passed
        (("-m", "loop.train_ratio=interval(1,64)"), "loop.train_ratio=interval(1,64): Hydra's"),
        (("-m", "hydra/sweeper=basic", "seed=interval(0,3)"), "basic sweeper, the one config"),
        (("-m", "hydra.sweeper.max_batch_size=2", "seed=interval(0,3)"), "cannot run this sw"),
        # over a setting, not a group: Hydra launched no job at all
        (("-m", "seed=glob(*)"), "seed=glob(*): glob(...) picks among a config group's options"),
        (("-m", "hydra/job_logging=glob(*)"), "a sweep over Hydra's own configuration is not"),
        # the other sweeps at their first value: agent=planner's own key is checked under it
        (("-m", "agent=dreamer,planner", "agent.planner.candidates=5"), "only agent=planner"),
    ],
)
def test_a_sweep_checks_every_value_of_every_sweep(args, message):
    """-m skipped every check: mistyped keys and choices ended in Hydra's multi-line reports or
    tracebacks, and agent.compile=no trained a compiled agent (a non-empty string is true)."""
    with pytest.raises(OverrideError, match=re.escape(message)):
        check(*args)


@pytest.mark.parametrize(
    ("agent", "kind", "overrides", "message"),
    [
        ("planner", "aef", ["agent=planner", "agent.actor_loss.gamma=5"], "agent=planner does"),
        ("planner", "aef", ["agent={critic: {hidden: 3}}"], "agent.critic.hidden is a setting"),
        ("dreamer", "aef", ["agent.wm_loss.free_nats=50"], "applies to obs_model=vae only"),
        ("planner", "vae", ["agent.lr.actor=1e-3"], "agent.lr.actor is a setting of the Dreamer"),
        ("planner", "vae", ["agent={grad_clip: {critic: 5}}"], "agent.grad_clip.critic is a"),
        ("dreamer", "aef_partition", ["agent.wm_loss={kl_rep_scale: 1}"], "is aef_partition"),
        ("planner", "aef", ["agent.name=planner"], "choose the agent with agent=dreamer or"),
        # read by these runs: accepted
        ("dreamer", "vae", ["agent.wm_loss.free_nats=2", "agent.actor_loss.gamma=0.99"], None),
        ("planner", "vae", ["agent=planner", "agent.wm_loss.kl_dyn_scale=0.4", "seed=1"], None),
        ("planner", "aef", ["agent.lr.model=1e-4", "agent={grad_clip: {model: 10}}"], None),
    ],
)
def test_settings_the_run_never_reads_are_refused(agent, kind, overrides, message):
    """They were accepted, recorded in run_config.yaml, and did nothing."""
    conf = {"agent": {"name": agent}, "obs_model": {"kind": kind}}
    if message is None:
        check_read_settings(conf, overrides)
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        check_read_settings(conf, overrides)


def test_a_sweep_refuses_a_setting_one_of_its_jobs_never_reads():
    """Checked in each job only, the sweep's first job (the VAE) trained to the end before the
    second (the AEF) refused the VAE's free_nats."""
    with pytest.raises(OverrideError, match="this run's obs_model is aef"):
        check("-m", "obs_model=vae,aef", "agent.wm_loss.free_nats=2")
    with pytest.raises(OverrideError, match="agent=planner does not have"):
        check("-m", "agent=dreamer,planner", "agent.actor_loss.horizon=5")
    with pytest.raises(OverrideError, match="this run's obs_model is aef"):  # glob(*): aef first
        check("-m", "obs_model=glob(*)", "agent.wm_loss.free_nats=2")
    check("-m", "obs_model=glob(vae)", "agent.wm_loss.free_nats=2")
    check("-m", "seed=0,1", "obs_model=vae", "agent.wm_loss.free_nats=2")
    # A resume repeating its (vae) run's own value: the defaults' obs_model is not the run's.
    check("resume=runs/x", "agent.wm_loss.free_nats=2")


def test_the_sweeps_progress_bar_stays_out_of_logs(capsys):
    """The per-job checks show a bar on a terminal only: in a log (here, captured output) its
    lines would stay above an error's one sentence."""
    jobs = []
    check_overrides(CONFIGS, "config", ["-m", "seed=0,1,2"], lambda conf, o: jobs.append(o))
    assert len(jobs) == 3 and capsys.readouterr().err == ""
