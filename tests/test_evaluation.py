"""Evaluation episodes (aefrl.evaluation): what they record and the critic's calibration; how
scripts/eval.py shows and sums them up."""

import math
import re

import pytest
import torch

from aefrl import keys
from aefrl.envs import make_dmc_env
from aefrl.evaluation import critic_calibration, run_episodes
from agents.dreamer import DreamerAgent
from tests.agents.test_dreamer import TINY
from tests.tiny_run import load_script, write_tiny_dreamer_run


def test_episodes_record_the_value_of_each_state_acted_in_and_the_reward_after_it():
    torch.manual_seed(0)
    agent = DreamerAgent((3, 64, 64), 1, **{k: dict(v) for k, v in TINY.items()})
    torch.nn.init.normal_(agent.critic.net[-1].weight)  # a critic that is not zero everywhere
    env = make_dmc_env("cartpole-swingup", render="fast", time_limit=0.25, seed=3)
    seen = []
    out = run_episodes(
        env, agent, 1, "cpu", 2, keep_first=True, on_step=lambda o, c, e: seen.append(e)
    )
    env.close()
    assert len(out.returns) == 2 and out.lengths == [13, 13]
    assert seen[0] == 0 and seen[-1] == 1 and sorted(seen) == seen
    for v, r, ret, n in zip(out.values, out.rewards, out.returns, out.lengths):
        assert v.shape == r.shape == (n,)
        assert math.isclose(float(r.sum()), ret, rel_tol=1e-6)  # r_{t+1} of every step, no other
    first = out.first_episode
    assert first.shape == (14,) and bool(first[keys.IS_FIRST][0]) and bool(first[keys.DONE][-1])
    # values[0][0] is v(s_0), the state filtered from the first observation alone.
    pixels, is_first = first[keys.PIXELS][:1], first[keys.IS_FIRST][:1]
    with torch.no_grad():
        _, carry = agent.act(pixels, is_first, agent.initial_carry(1), "eval")
        want = float(agent.critic(carry.state.feat).mean[0])
    assert math.isclose(float(out.values[0][0]), want, rel_tol=1e-6)


def test_critic_calibration_averages_the_first_fraction_of_each_episode():
    values = [torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), torch.tensor([5.0, 6.0])]
    rewards = [torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 2.0])]
    cal = critic_calibration(values, rewards, gamma=0.5, fraction=0.5)
    # returns-to-go: episode 0 [1 + 0 + 0.25 + 0.125, 0 + 0.5 + 0.25, ...], episode 1 [3, 2]
    g00, g01, g10 = 1.375, 0.75, 3.0
    assert math.isclose(cal["value_mean"], (1 + 2 + 5) / 3)
    assert math.isclose(cal["return_to_go_mean"], (g00 + g01 + g10) / 3)
    assert cal["value_first"] == [1.0, 5.0] and cal["return_to_go_first"] == [g00, g10]
    assert math.isclose(
        cal["value_over_return_to_go"], cal["value_mean"] / cal["return_to_go_mean"]
    )


class _Bar:
    """tqdm's calls that scripts/eval.py makes, with the steps it shows recorded."""

    last = None  # the latest bar made

    def __init__(self, total, unit):
        self.n, self.steps = 0, []
        _Bar.last = self

    def update(self, n):
        self.n += n

    def set_postfix(self, step):
        self.steps.append((self.n, step))

    def __enter__(self):
        self.closed = False
        return self

    def __exit__(self, *exc):
        self.closed = True


def test_a_ctrl_c_closes_the_eval_bar(monkeypatch):
    """The "interrupted" line was printed on the bar's own line: the bar is closed first now."""
    script = load_script("eval")
    monkeypatch.setattr(script, "tqdm", _Bar)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "run_episodes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        script.evaluate(None, None, 3, 1, "cpu", record=False)
    assert _Bar.last.closed


def test_eval_bar_counts_each_episodes_steps_from_1_to_its_length(monkeypatch):
    """The call that follows an episode's last step only resets the env: it used to count as the
    next episode's first step, so the bar showed step=21 for a 20-step episode."""
    script = load_script("eval")
    monkeypatch.setattr(script, "tqdm", _Bar)
    agent = DreamerAgent((3, 64, 64), 1, **{k: dict(v) for k, v in TINY.items()}).eval()
    env = make_dmc_env("cartpole-swingup", render="fast", time_limit=0.25, seed=3)
    result, _ = script.evaluate(agent, env, 3, 1, "cpu", record=False)
    env.close()
    assert result.lengths == [13, 13, 13]
    for episode, length in enumerate(result.lengths):
        shown = [step for n, step in _Bar.last.steps if n == episode]
        assert shown == list(range(0 if episode else 1, length + 1)), episode


TINY_PLANNER = ["--agent", "planner", "--horizon", "2", "--candidates", "8", "--top-k", "2"]


@pytest.mark.parametrize(
    ("options", "line"),
    [
        (
            ["--episodes", "2"],
            r"cartpole-swingup aef dreamer: return {} over 2 episodes  ->  \S+/eval\.json",
        ),
        (
            ["--episodes", "1", *TINY_PLANNER, "--iterations", "1"],
            r"cartpole-swingup aef planner: return {} over 1 episode  ->  \S+/eval_planner\.json",
        ),
    ],
)
def test_eval_summary_names_the_agent_and_counts_episodes_in_english(
    tmp_path, options, line, capsys
):
    """It used to read "cartpole-swingup aef: ... over 1 episodes" for the actor and a planner
    on the same checkpoint alike."""
    write_tiny_dreamer_run(tmp_path)
    script = load_script("eval")
    assert script.main([str(tmp_path), "--render", "fast", "--video", "", *options]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert re.match(line.format(r"\d+\.\d ± \d+\.\d"), first), first


@pytest.mark.parametrize(
    ("script_name", "planner"), [("eval", False), ("eval", True), ("world_model_report", False)]
)
@pytest.mark.parametrize("edit", ["hidden", "latent_dim"])
def test_weights_that_do_not_fit_the_runs_configuration_are_one_sentence(
    tmp_path, script_name, planner, edit, capsys
):
    """A checkpoint whose weights do not fit its run_config (a hand-edited size) used to end in
    load_state_dict's multi-line traceback, one line per key; an edited latent size was
    refused for the task's actions (the size read off the weights: "takes 3-d actions")."""
    from aefrl.checkpoint import load_checkpoint, save_checkpoint

    write_tiny_dreamer_run(tmp_path)
    state = load_checkpoint(tmp_path)
    if edit == "hidden":
        state["run_config"]["agent"]["world_model"]["hidden"] = 24
    else:
        state["run_config"]["obs_model"]["latent_dim"] = 1
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    args = [str(tmp_path), "--episodes", "1", "--render", "fast"]
    args += ["--agent", "planner"] if planner else []
    assert load_script(script_name).main(args) == 2
    err = capsys.readouterr().err
    what = "world model" if planner else "weights"
    assert err.count("\n") == 1 and err.startswith(
        f"error: the checkpoint's {what} do{'es' if planner else ''} not match its configuration: "
    ), err


def test_a_video_path_that_is_not_a_gif_is_refused_before_anything_runs(tmp_path, capsys):
    """--video x.mp4 wrote GIF data into x.mp4 without a word."""
    write_tiny_dreamer_run(tmp_path)
    args = [str(tmp_path), "--episodes", "1", "--render", "fast", "--video", "x.mp4"]
    with pytest.raises(SystemExit) as info:
        load_script("eval").main(args)
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "error: argument --video: expected a path ending in .gif (or '' for none), got 'x.mp4'\n"
    )
    assert not (tmp_path / "eval.json").exists()


def test_evaluation_acts_by_the_policys_mode_whatever_torchs_generator_holds():
    """An evaluation that sampled its actions would pass every other test here (they check the
    critic's value of the first state, which no action changes, or use a scripted agent)."""
    torch.manual_seed(0)
    agent = DreamerAgent((3, 64, 64), 1, **{k: dict(v) for k, v in TINY.items()})  # aef
    torch.nn.init.normal_(agent.actor.net[-1].weight)  # a spread that sampling would show

    def actions(seed: int) -> torch.Tensor:
        env = make_dmc_env("cartpole-swingup", render="fast", time_limit=0.25, seed=3)
        torch.manual_seed(seed)
        out = run_episodes(env, agent, 1, "cpu", 1, keep_first=True)
        env.close()
        return out.first_episode[keys.PREV_ACTION][1:]  # a_0 .. a_{T-1}

    first, second = actions(1), actions(2)
    assert first.shape == (13, 1) and first.abs().sum() > 0
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # The same agent exploring would not repeat itself: the comparison above can fail.
    feat = torch.zeros(1, agent.world_model.feat_dim)
    with torch.no_grad():
        torch.manual_seed(1)
        a = agent.actor.act(feat, explore=True)
        torch.manual_seed(2)
        assert not torch.equal(a, agent.actor.act(feat, explore=True))


@pytest.mark.parametrize(
    ("script_name", "step"),
    # the step each script used to take after writing one of its files
    [("eval", "encode_gif"), ("world_model_report", "machine_info")],
)
def test_an_interrupt_before_the_files_are_written_leaves_the_earlier_results(
    tmp_path, script_name, step, monkeypatch, capsys
):
    """eval.py wrote its JSON, then spent seconds encoding the GIF, and a Ctrl-C there left a new
    JSON beside an old GIF while it said the evaluation had not finished; world_model_report.py
    wrote its GIF before the rest and then said "nothing was written". Both now build every
    byte first and write each file atomically."""
    write_tiny_dreamer_run(tmp_path)
    out, video = tmp_path / "r.json", tmp_path / "r.gif"
    out.write_text("earlier")
    video.write_bytes(b"earlier")
    script = load_script(script_name)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(script, step, interrupted)
    args = [str(tmp_path), "--episodes", "1", "--render", "fast", "--out", str(out)]
    args += ["--video", str(video)]
    args += ["--num-samples", "2", "--tune-samples", "2"] if script_name != "eval" else []
    assert script.main(args) == 130 and calls
    assert "interrupted" in capsys.readouterr().err
    assert out.read_text() == "earlier" and video.read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "r.gif", "r.json"]


@pytest.mark.parametrize("script_name", ["eval", "world_model_report"])
@pytest.mark.parametrize(("logger", "fps"), [({"video_fps": 7}, 7.0), (None, 15.0)])
def test_the_gifs_run_at_the_runs_frame_rate(tmp_path, monkeypatch, script_name, logger, fps):
    """eval.py wrote its GIF at 15 frames/s whatever the run's logger.video_fps; both scripts
    now play their GIFs at the run's rate (15, the logger's default, for a run config whose
    ``logger`` is empty: the report's own lookup failed on it)."""
    from aefrl.checkpoint import load_checkpoint, save_checkpoint

    write_tiny_dreamer_run(tmp_path, time_limit=0.4)
    state = load_checkpoint(tmp_path)
    state["run_config"]["logger"] = logger
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    script = load_script(script_name)
    seen = []
    real = script.encode_gif
    monkeypatch.setattr(script, "encode_gif", lambda f, fps: seen.append(fps) or real(f, fps=fps))
    args = [str(tmp_path), "--episodes", "1", "--render", "fast"]
    if script_name == "world_model_report":
        args[2:3] = ["3", "--num-samples", "2", "--proposal-scale", "0.5"]
    assert script.main(args) == 0
    assert seen == [fps]
