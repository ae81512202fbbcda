"""scripts/likelihood_study.py end to end on a tiny grid: files written, reruns skip or retrain."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert bad.returncode != 0 and "unknown model names" in bad.stderr


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
