"""scripts/likelihood_study.py end to end on a tiny grid: files written, reruns skip or retrain."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def study(tmp_path, *extra):
    cmd = [
        sys.executable,
        str(ROOT / "scripts/likelihood_study.py"),
        "--quick",
        "--steps", "3",
        "--tasks", "cartpole-swingup",
        "--latents", "2",
        "--depth", "4",
        "--render", "fast",
        "--out", str(tmp_path / "out"),
        "--logdir", str(tmp_path / "runs"),
        "--data-dir", str(tmp_path / "data"),
        *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_study_writes_table_grids_models_and_reruns_selectively(tmp_path):
    out = study(tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "out/results.json").read_text())
    names = {"vae_d2", "aef_d2", "aef_partition_d2"}
    assert set(res["models"]) == names
    for name, r in res["models"].items():
        assert (tmp_path / f"out/grid_{name}.png").exists()
        assert (tmp_path / f"runs/{name}/model.pt").exists()
        assert len(r["bpd_per_frame"]) == res["data"]["eval_frames"]
        assert abs(sum(r["bpd_per_frame"]) / len(r["bpd_per_frame"]) - r["bpd"]) < 1e-3
    assert res["models"]["aef_partition_d2"]["estimator"] == "exact"
    table = (tmp_path / "out/table.md").read_text()
    assert "aef_partition" in table and "minus vae (paired)" in table

    again = study(tmp_path)  # everything done: nothing retrained
    assert again.stdout.count("done already") == 3
    before = res["models"]["vae_d2"]["train_seconds"]
    retrain = study(tmp_path, "--models", "aef_d2", "--retrain")
    assert retrain.returncode == 0, retrain.stderr[-2000:]
    after = json.loads((tmp_path / "out/results.json").read_text())["models"]
    assert after["vae_d2"]["train_seconds"] == before  # untouched
    assert "log p aef_d2" in retrain.stderr and "vae_d2" not in retrain.stderr

    bad = study(tmp_path, "--models", "flow_d2")
    assert bad.returncode != 0 and "unknown --models flow_d2: the grid has" in bad.stderr
    # Re-evaluating with other settings would mix two settings' rows under the new ones' args;
    # training with them dropped the stored rows (the documented study's, by default --out).
    for extra in (["--evaluate-only"], []):
        mixed = study(tmp_path, *extra, "--lr", "0.1")
        assert mixed.returncode == 2, mixed.stderr[-2000:]
        assert "holds results of other settings (lr): use the same" in mixed.stderr
    assert json.loads((tmp_path / "out/results.json").read_text())["models"] == after

    # --evaluate-only into another --out scored the models under --logdir whatever trained
    # them (another study's); now the settings stored with the weights must be these, but
    # for the evaluation's own (--num-samples here).
    other = study(tmp_path, "--evaluate-only", "--lr", "0.1", "--out", str(tmp_path / "other"))
    assert other.returncode == 2, other.stderr[-2000:]
    assert "vae_d2/model.pt was trained with other settings than these (--lr 0.0005)" in (
        other.stderr
    )
    assert not (tmp_path / "other").exists()
    fewer = tmp_path / "fewer"
    again = study(tmp_path, "--evaluate-only", "--num-samples", "4", "--models", "vae_d2",
                  "--out", str(fewer))  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert list(json.loads((fewer / "results.json").read_text())["models"]) == ["vae_d2"]


def test_results_of_side_by_side_invocations_are_merged(tmp_path):
    spec = importlib.util.spec_from_file_location("study", ROOT / "scripts/likelihood_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "results.json"
    args = {"steps": 3}
    # two processes started from the same file, each holding a stale copy of the other's model
    first = {"args": args, "models": {"vae_d8": {"bpd": 9.0}, "aef_d8": {"bpd": 9.0}}}
    second = json.loads(json.dumps(first))
    module.save_model_result(path, first, "vae_d8", {"bpd": 5.0})
    merged = module.save_model_result(path, second, "aef_d8", {"bpd": 6.0})
    assert merged["models"] == {"vae_d8": {"bpd": 5.0}, "aef_d8": {"bpd": 6.0}}
    assert json.loads(path.read_text())["models"] == merged["models"]
    # a file written with other settings is not merged in
    other = {"args": {"steps": 4}, "models": {}}
    assert module.save_model_result(path, other, "vae_d2", {"bpd": 7.0})["models"] == {
        "vae_d2": {"bpd": 7.0}
    }


def _module():
    spec = importlib.util.spec_from_file_location("study", ROOT / "scripts/likelihood_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_saved_models_carry_their_training_settings_and_older_files_still_load(tmp_path):
    module = _module()
    args = module.parse_args(["--quick", "--logdir", str(tmp_path), "--out", str(tmp_path / "o")])
    weights = {"w": torch.arange(3.0)}
    old = tmp_path / "vae_d2" / "model.pt"  # written before the settings were stored with it
    old.parent.mkdir()
    torch.save(weights, old)
    assert module.saved_weights(old)[1] is None
    assert torch.equal(module.saved_weights(old)[0]["w"], weights["w"])
    assert module.check_saved_models(args, ["vae_d2", "aef_d2"]) is None  # aef_d2: none saved

    model = torch.nn.Linear(2, 1)
    module.save_model(tmp_path / "aef_d2" / "model.pt", model, args)
    stored, trained_with = module.saved_weights(tmp_path / "aef_d2" / "model.pt")
    assert torch.equal(stored["weight"], model.weight) and trained_with["steps"] == args.steps
    assert module.check_saved_models(args, ["aef_d2"]) is None
    args.num_samples += 1  # an evaluation setting: may differ
    assert module.check_saved_models(args, ["aef_d2"]) is None
    args.tasks = list(reversed(args.tasks))  # the frames' order changes the training batches
    problem = module.check_saved_models(args, ["vae_d2", "aef_d2"])
    assert problem is not None and "trained with other settings than these (--tasks " in problem
    assert f"(--tasks {' '.join(reversed(args.tasks))}):" in problem


def test_block_standard_error_is_batch_means_stratified_by_episode():
    """Frames a few steps apart are correlated: the error comes from the means of blocks of
    consecutive frames of one episode, never from a block spanning two, and the episodes
    (one per task, fixed) are strata: their different levels add nothing."""
    import numpy as np

    study_module = _module()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 100)) * np.array([[1.0], [2.0], [0.5]])
    blocks = x.reshape(3, 10, 10).mean(2)  # written out: sqrt(sum_t var_t / m_t) / T
    want = np.sqrt(sum(b.var(ddof=1) / 10 for b in blocks)) / 3
    assert abs(study_module.block_sem(x.ravel(), 3) - want) < 1e-12
    # A slowly drifting (correlated) signal: frame-wise spread over √n understates the error.
    walk = np.cumsum(rng.normal(size=300)) * 0.1 + rng.normal(size=300)
    assert study_module.block_sem(walk, 3) > 1.5 * walk.std() / np.sqrt(300)
    # Levels 0, +5, -5 per episode change nothing; 95 frames each: the last 5 are dropped.
    y = rng.normal(size=(3, 95))
    shifted = y + np.array([[0.0], [5.0], [-5.0]])
    assert (
        abs(study_module.block_sem(shifted.ravel(), 3) - study_module.block_sem(y.ravel(), 3))
        < 1e-12
    )
    within = y[:, :90].reshape(3, 9, 10).mean(2)
    want = np.sqrt(sum(b.var(ddof=1) / 9 for b in within)) / 3
    assert abs(study_module.block_sem(y.ravel(), 3) - want) < 1e-12


def test_every_model_scores_the_same_dequantisation_noise(tmp_path):
    """The aef's proposal tuning drew from torch's generator before the held-out frames were
    dequantised, so its noise differed from the other models'; the tuning now runs on a
    generator of its own."""
    import argparse

    import torch

    from aefrl.obs_models import make_obs_model
    from aefrl.preprocess import Preprocess

    study_module = _module()
    seen = {}

    class Recording(Preprocess):
        def encode(self, obs, noise=None, dtype=None):
            y, logdet = super().encode(obs, noise, dtype)
            self.last = logdet
            return y, logdet

    class Logger:
        def log_image(self, *args):
            pass

        def log_scalars(self, *args):
            pass

    args = argparse.Namespace(seed=0, num_samples=2, steps=1, out=str(tmp_path), tasks=["t"])
    frames = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    for kind in ("vae", "aef", "aef_partition"):
        pre = Recording((3, 64, 64))
        model = make_obs_model(kind, (3, 64, 64), 2, depth=4).eval()
        study_module.evaluate(model, pre, frames[:4], frames, args, Logger(), kind)
        seen[kind] = pre.last
    torch.testing.assert_close(seen["aef"], seen["vae"], rtol=0, atol=0)
    torch.testing.assert_close(seen["aef_partition"], seen["vae"], rtol=0, atol=0)


def test_bad_options_are_one_line_and_quick_keeps_the_options_given(capsys, monkeypatch):
    """Each was a traceback (some after the frames were collected) or, for --steps -5, a
    result of nothing trained; --quick overrode --num-samples and the like given with it."""
    spec = importlib.util.spec_from_file_location("study", ROOT / "scripts/likelihood_study.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for args, message in (
        (["--tasks", "nonsense"], "--tasks: task 'nonsense' is not a DMC task"),
        (["--kinds", "flow"], "argument --kinds: invalid choice: 'flow'"),
        (["--latents", "0"], "argument --latents: expected a whole number >= 1, got '0'"),
        (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
        (["--steps", "-5"], "argument --steps: expected a whole number >= 1, got '-5'"),
        (["--models", "flow_d2"], "unknown --models flow_d2: the grid has vae_d2,"),
        (["--out", str(ROOT / "pyproject.toml")], "--out takes a folder"),
    ):
        with pytest.raises(SystemExit) as info:
            script.parse_args(args)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith(f"error: {message}"), err
    quick = script.parse_args(["--quick", "--num-samples", "5", "--episodes=4"])
    assert (quick.num_samples, quick.episodes, quick.eval_frames) == (
        5,
        4,
        script.QUICK["eval_frames"],
    )
    # ... and writes apart from the documented study, whose settings the bare command repeats
    monkeypatch.chdir(ROOT)
    assert (quick.out, quick.logdir) == (
        "runs/likelihood_study_quick",
        "runs/likelihood_study_quick/tb",
    )
    stored = json.loads((ROOT / "docs/results/likelihood_study/results.json").read_text())
    documented = {k: v for k, v in stored["args"].items() if k not in script.PER_RUN}
    assert script.settings(script.parse_args([])) == documented
    with pytest.raises(SystemExit) as info:  # the docs' rows are kept, not dropped
        script.parse_args(["--steps", "5"])
    assert "holds results of other settings (steps)" in capsys.readouterr().err
