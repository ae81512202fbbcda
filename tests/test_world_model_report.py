"""scripts/world_model_report.py on a tiny checkpoint: fresh episodes, cut, scored, written."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from aefrl.world_model.evaluation import (
    filtered_reward_error,
    open_loop_prediction,
    sequence_bits_per_dim,
)
from tests.tiny_run import load_script, write_tiny_dreamer_run
from tests.world_model.conftest import random_batch, tiny_world_model


def test_report_on_fresh_episodes(tmp_path):
    write_tiny_dreamer_run(tmp_path, time_limit=0.4, frames=1234)  # 20-step episodes
    script = load_script("world_model_report")
    args = [str(tmp_path), "--episodes", "2", "--num-samples", "3", "--render", "fast"]
    assert script.main(args) == 0
    result = json.loads((tmp_path / "world_model_report.json").read_text())
    assert result["frames"] == 1234 and result["obs_model"] == "aef"
    assert result["sequences"] == 2  # episodes shorter than 50 steps make one sequence each
    # s tuned on one more episode, collected last and not among the two reported
    s = result["proposal_scale"]
    assert len(result["proposal_scale_search"]) == 9 and result["proposal_scale_tuned_on"]
    search = {float(k): v for k, v in result["proposal_scale_search"].items()}
    assert s == max(search, key=search.get)
    assert result["estimator"] == (
        f"importance sampling over u, N(Wy+b, s²I) proposal with s={s:g}, K=3 trajectories"
    )
    # an untrained model: near the 8 bits of a uniform model of the uint8 values
    assert math.isfinite(result["bits_per_dim"]) and 4 < result["bits_per_dim"] < 16
    steps = len(result["open_loop_mse"]) + script.CONTEXT
    assert 20 <= steps <= 21 and len(result["open_loop_ssim"]) == len(result["open_loop_mse"])
    assert all(m > 0 for m in result["open_loop_mse"])
    # The reward head's errors: per horizon as the frames', and over the filtered states. An
    # untrained head predicts 0 (its output layer starts at zero): each error is then the
    # recorded rewards' mean, and the bias its negative.
    error, bias = result["open_loop_reward_abs_error"], result["open_loop_reward_bias"]
    assert len(error) == len(bias) == len(result["open_loop_mse"])
    assert all(e == pytest.approx(-b, abs=1e-7) for e, b in zip(error, bias, strict=True))
    assert result["filtered_reward_abs_error"] == pytest.approx(-result["filtered_reward_bias"])
    assert result["filtered_reward_abs_error"] > 0 and max(error) > 0
    # ... whose open-loop rows have that mean: the rewards' mean over the predicted rows.
    steps = len(error)
    mean_error = sum(error) / steps  # every sequence is whole here: equal weights per horizon
    assert result["reward_mean"] == pytest.approx(mean_error, rel=1e-3)  # float32 sums
    # Predicting 0 is a constant too: the best one's error is at most the mean.
    assert 0 < result["constant_reward_abs_error"] <= result["reward_mean"]
    assert result["bits_per_dim_sem"] > 0
    by_episode = result["bits_per_dim_by_episode"]  # one sequence each here: their own values
    assert len(by_episode) == 2 and by_episode[0] != by_episode[1]
    assert math.isclose(sum(by_episode) / 2, result["bits_per_dim"], rel_tol=1e-6)
    # One sequence has no standard error: null, not NaN (which no JSON parser accepts).
    assert script.main([*args[:2], "1", *args[3:]]) == 0
    text = (tmp_path / "world_model_report.json").read_text()
    assert "NaN" not in text and json.loads(text)["bits_per_dim_sem"] is None
    # A fixed s: no tuning episode, no search.
    assert script.main([*args, "--proposal-scale", "0.5"]) == 0
    fixed = json.loads((tmp_path / "world_model_report.json").read_text())
    assert fixed["proposal_scale"] == 0.5 and "proposal_scale_search" not in fixed
    assert fixed["proposal_scale_tuned_on"] is None and fixed["sequences"] == 2
    # Tuning leaves the reported episodes and the report's draws alone: at the tuned s they
    # score exactly as in a run that tuned nothing (which episode tunes: the test below).
    # (Random actions: the deterministic policy's episodes here differ by a few pixels.)
    out = tmp_path / "world_model_report_random.json"
    assert script.main([*args, "--policy", "random"]) == 0
    tuned = json.loads(out.read_text())
    assert (
        script.main(
            [*args, "--policy", "random", "--proposal-scale", repr(tuned["proposal_scale"])]
        )
        == 0
    )
    at_s = json.loads(out.read_text())
    assert at_s["bits_per_dim_by_episode"] == tuned["bits_per_dim_by_episode"]
    assert at_s["open_loop_mse"] == tuned["open_loop_mse"]


@pytest.mark.parametrize(
    "rewards", [[0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 10.0], [0.5, 0.5, 0.2, 0.9, 0.1]]
)
def test_reward_scale_is_the_best_constants_error(rewards):
    """Against a search over constants: the median's error, not the deviation about the mean
    (sparse rewards [0, 0, 0, 1]: 0.25 against 0.375)."""
    script = load_script("world_model_report")
    r = torch.tensor(rewards, dtype=torch.float64)
    got = script.reward_scale(r.view(1, -1, 1))
    grid = torch.linspace(float(r.min()), float(r.max()), 10001, dtype=torch.float64)
    best = (r[None] - grid[:, None]).abs().mean(1).min()
    assert got["constant_reward_abs_error"] == pytest.approx(float(best), abs=1e-3)
    assert got["reward_mean"] == pytest.approx(float(r.mean()))


def test_report_numbers_are_the_evaluation_functions_in_order():
    """The report's numbers are the evaluation functions run from its seed in one order: the
    open loop, the bits/dim, the filtered reward error last (its draws, first, would move the
    bits/dim)."""
    script = load_script("world_model_report")
    torch.manual_seed(0)
    wm = tiny_world_model("vae")  # draws in the posterior too
    torch.nn.init.normal_(wm.reward_head.net[-1].weight)  # a head that reads its input
    episodes = random_batch(2, 8)
    numbers, _ = script.report_from_seed(SimpleNamespace(world_model=wm), episodes, 3, seed=9)
    torch.manual_seed(9)
    with torch.no_grad():
        pred = open_loop_prediction(wm, episodes, context=script.CONTEXT)
        bpd = torch.cat([sequence_bits_per_dim(wm, b, 3) for b in episodes.split(2)])
        filtered = filtered_reward_error(wm, episodes)
    assert numbers["bits_per_dim"] == pytest.approx(float(bpd.mean()), rel=1e-6)
    assert numbers["open_loop_reward_abs_error"] == [float(x) for x in pred["reward_abs_error"]]
    assert numbers["filtered_reward_abs_error"] == pytest.approx(filtered["abs_error"], rel=1e-6)
    assert numbers["filtered_reward_bias"] == pytest.approx(filtered["bias"], rel=1e-6)


def test_bits_per_dim_by_episode_averages_each_episodes_own_sequences(tmp_path, monkeypatch):
    """Episodes of 110 steps make two 50-step sequences each; each sequence scored by its
    position (0, 1 | 2, 3) shows the grouping: the first episode's mean is 0.5, not the
    mean of the first sequence of every episode."""
    import torch

    write_tiny_dreamer_run(tmp_path, time_limit=2.2)  # 110-step episodes
    script = load_script("world_model_report")
    scored = []

    def by_position(wm, batch, num_samples):
        start = len(scored)
        scored.extend(range(start, start + len(batch)))
        return torch.arange(start, start + len(batch), dtype=torch.float32)

    monkeypatch.setattr(script, "sequence_bits_per_dim", by_position)
    args = [str(tmp_path), "--episodes", "2", "--render", "fast", "--video", ""]
    assert script.main([*args, "--proposal-scale", "0.5"]) == 0
    result = json.loads((tmp_path / "world_model_report.json").read_text())
    assert result["sequences"] == 4 and scored == [0, 1, 2, 3]
    assert result["bits_per_dim_by_episode"] == [0.5, 2.5]


@pytest.mark.parametrize("value", ["-1", "0", "nan", "wide"])
def test_a_bad_proposal_scale_is_one_sentence(tmp_path, value, capsys):
    script = load_script("world_model_report")
    with pytest.raises(SystemExit) as info:
        script.main([str(tmp_path), "--proposal-scale", value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"expected 'tune' or a positive number, got '{value}'" in err


@pytest.mark.parametrize("flag", ["--episodes", "--num-samples", "--tune-samples"])
def test_counts_below_one_are_refused(tmp_path, flag, capsys):
    script = load_script("world_model_report")
    with pytest.raises(SystemExit) as info:
        script.main([str(tmp_path), flag, "0"])
    assert info.value.code == 2 and f"{flag} must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["world_model_report", "eval"])
def test_a_checkpoint_without_a_model_is_one_sentence(tmp_path, name, capsys):
    """A checkpoint file of another kind (format only) used to crash with KeyError."""
    from aefrl.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "checkpoint.pt", {"format": 1})
    assert load_script(name).main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lacks run_config, agent" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["vae", "aef_partition"])
@pytest.mark.parametrize("value", ["0.5", "tune"])
def test_a_proposal_scale_for_a_model_without_one_is_refused(tmp_path, kind, value, capsys):
    """--proposal-scale is the expansion AEF's; other models used to ignore it without a word."""
    write_tiny_dreamer_run(tmp_path, obs_model=kind)
    script = load_script("world_model_report")
    assert script.main([str(tmp_path), "--proposal-scale", value]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --proposal-scale applies to aef models only (their importance proposal), but "
        f"this run's obs_model is {kind}: leave it out\n"
    )
    assert not (tmp_path / "world_model_report.json").exists()


def test_ctrl_c_during_the_report_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """It had no handler: a Ctrl-C while collecting episodes was a traceback of ~25 frames."""
    script = load_script("world_model_report")

    def interrupted(args, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "write_report", interrupted)
    assert script.main([str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "interrupted: the report stopped before it finished; nothing was written"


def test_every_model_reports_from_the_same_generator_state(monkeypatch):
    """Acting draws from torch's generator for a VAE (its posterior samples) and not for an
    AEF, so the reports' dequantisation noise differed between them; they start seeded now."""
    import torch

    script = load_script("world_model_report")
    seen = []
    monkeypatch.setattr(script, "report", lambda agent, episodes, k: seen.append(torch.rand(3)))
    torch.rand(5)  # one model's acting drew this much ...
    script.report_from_seed(None, None, 1, seed=7)
    torch.rand(11)  # ... another's that much
    script.report_from_seed(None, None, 1, seed=7)
    assert torch.equal(seen[0], seen[1])


def test_the_report_writes_real_imagined_error_gif_of_its_first_sequences(tmp_path):
    """Real vs imagined rollouts from a checkpoint, offline: the GIF TensorBoard shows during
    training (one row per sequence), next to the JSON; '' writes none, a non-GIF path is
    refused before any work."""
    import numpy as np
    from PIL import Image, ImageSequence

    from aefrl.logging import CONTEXT_COLOUR, PREDICTION_COLOUR, STRIP

    write_tiny_dreamer_run(tmp_path, time_limit=0.4)  # 20-step episodes: one sequence each
    script = load_script("world_model_report")
    args = [str(tmp_path), "--episodes", "3", "--num-samples", "2", "--render", "fast"]
    assert script.main([*args, "--video-sequences", "2", "--proposal-scale", "0.5"]) == 0
    result = json.loads((tmp_path / "world_model_report.json").read_text())
    assert result["video"] == str(tmp_path / "world_model_report.gif")
    frames = [
        np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(result["video"]))
    ]
    steps = len(result["open_loop_mse"]) + script.CONTEXT
    h = 16 + STRIP  # each row: the strip that marks context and prediction, then the frame
    assert len(frames) == steps and frames[0].shape == (2 * h, 3 * 16, 3)  # 2 rows, 3 panels
    real, imagined, error = (
        frames[-1][STRIP:h, 16 * i : 16 * (i + 1)].astype(int) for i in range(3)
    )
    # the GIF's palette quantises colours: the error panel is |real - imagined| up to that
    assert np.abs(error - np.abs(real - imagined)).mean() < 8 and error.max() > 0
    # the strip is green over the 5 context frames (reconstructions), red over the prediction
    for t, colour in (
        (0, CONTEXT_COLOUR),
        (script.CONTEXT - 1, CONTEXT_COLOUR),
        (script.CONTEXT, PREDICTION_COLOUR),
        (steps - 1, PREDICTION_COLOUR),
    ):
        assert np.abs(frames[t][0, 0].astype(int) - colour).max() < 12, t

    elsewhere = tmp_path / "out" / "report.json"  # the GIF goes next to the JSON
    assert script.main([*args, "--out", str(elsewhere), "--proposal-scale", "0.5"]) == 0
    assert json.loads(elsewhere.read_text())["video"] == str(elsewhere.with_suffix(".gif"))
    assert elsewhere.with_suffix(".gif").stat().st_size > 0
    (tmp_path / "world_model_report.gif").unlink()
    assert script.main([*args, "--video", "", "--proposal-scale", "0.5"]) == 0
    assert not (tmp_path / "world_model_report.gif").exists()
    assert json.loads((tmp_path / "world_model_report.json").read_text())["video"] is None
    with pytest.raises(SystemExit) as info:
        script.main([*args, "--video", "x.mp4"])
    assert info.value.code == 2


def test_random_policy_episodes_are_the_same_frames_for_every_model(tmp_path):
    """--policy random scores every run of a task on identical frames (a fair comparison of
    world models); the agent's own policy sees states of its own."""
    import torch

    from aefrl.checkpoint import load_checkpoint
    from aefrl.cli import make_run_env
    from agents.modules import agent_from_checkpoint

    script = load_script("world_model_report")
    pixels, actions = {}, {}
    for kind in ("aef", "vae"):
        conf = write_tiny_dreamer_run(tmp_path / kind, time_limit=0.2, obs_model=kind)
        agent = agent_from_checkpoint(load_checkpoint(tmp_path / kind), 1)
        for policy, seed in (("random", 5), ("agent", None)):
            env = make_run_env(conf["env"], 3, num_envs=1)
            episodes = script.collect_episodes(agent, env, 2, 1, random_seed=seed)
            env.close()
            pixels[kind, policy] = episodes["pixels"]
            actions[kind, policy] = episodes["prev_action"][:, 1:]
    # Its own default files: the agent-policy report next to it stays.
    args = ["--policy", "random", "--episodes", "1", "--num-samples", "2", "--video", ""]
    assert script.main([str(tmp_path / "aef"), *args, "--proposal-scale", "0.5"]) == 0
    result = json.loads((tmp_path / "aef" / "world_model_report_random.json").read_text())
    assert result["policy"] == "random" and not (tmp_path / "aef/world_model_report.json").exists()
    assert torch.equal(pixels["aef", "random"], pixels["vae", "random"])
    assert torch.equal(actions["aef", "random"], actions["vae", "random"])
    random = actions["aef", "random"]  # uniform on [-1, 1], not the agent's
    assert random.abs().max() <= 1 and random.std() > 0.3
    assert not torch.equal(random, actions["aef", "agent"])
    assert script.make_parser().parse_args(["RUN"]).policy == "agent"  # the default


def test_episodes_too_short_to_predict_are_one_sentence(tmp_path, capsys):
    """Short episodes train (walker at env.time_limit=0.1: 2 steps), and the report crashed on
    them with a 32-line traceback: its 5 context frames leave nothing to predict."""
    write_tiny_dreamer_run(tmp_path, time_limit=0.04)  # cartpole: 2 steps, 3 frames
    script = load_script("world_model_report")
    assert script.main([str(tmp_path), "--episodes", "1", "--render", "fast"]) == 2
    err = capsys.readouterr().err
    assert "episodes hold 3 frames (env.time_limit=0.04)" in err and "Traceback" not in err


def test_the_proposal_is_tuned_on_one_more_episode_collected_last(tmp_path, monkeypatch):
    """The tuning episode is collected after the reported ones and is not among them: the
    reported episodes are the first --episodes of --seed, as for a model that tunes nothing."""
    import torch

    write_tiny_dreamer_run(tmp_path, time_limit=0.4)
    script = load_script("world_model_report")
    seen = {}
    tune, report = script.tune_sequence_proposal_scale, script.report_from_seed

    def tuning(world_model, batches, *a):
        seen["tuned"] = torch.cat([b["pixels"] for b in batches])
        return tune(world_model, batches, *a)

    def reporting(agent, episodes, *a):
        seen.setdefault("reported", []).append(episodes["pixels"])
        return report(agent, episodes, *a)

    monkeypatch.setattr(script, "tune_sequence_proposal_scale", tuning)
    monkeypatch.setattr(script, "report_from_seed", reporting)
    args = [str(tmp_path), "--policy", "random", "--num-samples", "2", "--video", ""]
    assert script.main([*args, "--episodes", "2", "--tune-samples", "2"]) == 0
    assert script.main([*args, "--episodes", "3", "--proposal-scale", "0.5"]) == 0
    reported, three = seen["reported"]
    assert reported.shape[0] == 2 and torch.equal(reported, three[:2])
    tuned = seen["tuned"]  # the third episode, cut into one sequence (20 steps < 50)
    assert tuned.shape[0] == 1 and torch.equal(tuned, three[2:, : tuned.shape[1]])
