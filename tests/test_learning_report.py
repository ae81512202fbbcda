"""scripts/learning_report.py on synthetic TensorBoard runs: tables, windows, plots."""

import importlib.util
import json
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "learning_report", ROOT / "scripts/learning_report.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(path: Path, evals: dict[int, float], train: dict[int, float], critic=None) -> None:
    w = SummaryWriter(str(path / "tb"))
    for step, value in evals.items():
        w.add_scalar("eval/episode_return", value, step)
    for step, value in train.items():
        w.add_scalar("env/episode_return", value, step)
    w.add_scalar("heldout/bits_per_dim", 6.5, 20000)
    # perf/fps averages since the start; the report's speed is the median of the rates
    # between logs from 10k on (10, 10 and a pause's 1.5 frames/s here), not of these values
    for step, fps, wall in (
        (5000, 90.0, 0.0),
        (10000, 12.0, 100.0),
        (20000, 10.0, 1100.0),
        (25000, 11.0, 1600.0),
        (30000, 6.0, 5000.0),
    ):
        w.add_scalar("perf/fps", fps, step, walltime=wall)
    for step in (2000, 10000, 12000, 20000):  # logged every 2000 frames; reported per window
        w.add_scalar("train/imag_value", step / 1000, step)
    for step, (value, togo) in (critic or {}).items():
        w.add_scalar("eval/critic_value", value, step)
        w.add_scalar("eval/critic_return_to_go", togo, step)
    w.close()


def test_report_tables_seeds_and_windows(tmp_path):
    root = tmp_path / "task"
    evals = {10000: 100.0, 20000: 300.0, 30000: 350.0}  # s0 ran longer than s1
    _run(root / "aef/s0", evals, {1000: 10.0, 9000: 30.0, 15000: 50.0}, {10000: (1.0, 10.0)})
    _run(root / "aef/s1", {10000: 200.0, 20000: 500.0}, {5000: 20.0}, {10000: (9.0, 30.0)})
    _run(root / "vae/s0", {10000: 50.0}, {12000: 7.0})
    from aefrl.provenance import append_run_record, cpu_model

    append_run_record(root / "aef/s0", 0, "python scripts/train.py seed=0")
    append_run_record(root / "aef/s0", 20000, "python scripts/train.py resume=aef/s0")
    out = tmp_path / "out"
    assert _load().main([str(root), "--out", str(out)]) == 0
    md = (out / "task.md").read_text()
    assert "| 10000 | 150 [100, 200] | 50 |" in md  # eval: mean [min, max] over seeds
    assert "| 20000 | 400 [300, 500] |  |" in md
    assert "| 30000 | 350 (1 of 2) |  |" in md  # a longer seed's late points are kept, marked
    # train returns per 10k window: s0 has 1k and 9k (mean 20), s1 has 5k (20); then 15k / 12k
    assert "| 10000 | 20 [20, 20] |  |" in md
    assert "| 20000 | 50 (1 of 2) | 7 |" in md
    assert "| 20000 | 6.500 [6.500, 6.500] | 6.500 |" in md
    # the critic's calibration as a ratio per run (0.1 and 0.3), then over the seeds: a ratio of
    # the means (10 / 40) would read 0.25
    assert "| 10000 | 0.20 [0.10, 0.30] |  |" in md
    assert "| 10000 | 10.0 [10.0, 10.0] | 10.0 |" in md and "| 12000 | 12.0" not in md
    # the runs: frames reached, median frames/s after the prefill, machine and starts recorded
    assert f"| {root / 'aef/s0'} | 30000 | 10.0 | {cpu_model()} | 2 |" in md
    assert f"| {root / 'vae/s0'} | 30000 | 10.0 | not recorded | 0 |" in md
    result = json.loads((out / "task.json").read_text())
    assert result["_run_info"][str(root / "aef/s0")]["commands"][1].endswith("resume=aef/s0")
    assert "scripts/learning_report.py" in result["_command"]
    for png in ("task_return.png", "task_train_return.png"):
        assert (out / png).stat().st_size > 0


def test_labelled_folders_keep_variants_of_one_agent_apart(tmp_path):
    _run(tmp_path / "default/task/aef/s0", {10000: 100.0}, {})
    _run(tmp_path / "variant/task/aef/s0", {10000: 300.0}, {})
    _run(tmp_path / "a=b/task/aef/s0", {10000: 700.0}, {})  # a folder whose name holds "="
    out = tmp_path / "out"
    argv = [str(tmp_path / "default/task"), f"γ 0.99={tmp_path / 'variant/task'}"]
    assert _load().main([*argv, str(tmp_path / "a=b"), "--out", str(out)]) == 0
    result = json.loads((out / "task.json").read_text())  # named after the first folder
    assert sorted(result["_runs"]) == ["aef", "γ 0.99 aef"]
    assert result["aef"]["eval/episode_return"][0]["mean"] == 400.0  # default and a=b
    assert result["γ 0.99 aef"]["eval/episode_return"][0]["mean"] == 300.0


def test_no_runs_is_an_error(tmp_path, capsys):
    assert _load().main([str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err


def test_bad_options_and_runs_without_scalars_are_one_sentence(tmp_path, capsys):
    """--window 0 was a ZeroDivisionError, --window -100 made wrong bins and exit 0, an --out
    that is a file a FileExistsError, and a tb/ holding no readable events an empty report."""
    script = _load()
    for window in ("0", "-100", "ten"):
        with pytest.raises(SystemExit) as info:
            script.main([str(tmp_path), "--window", window])
        assert info.value.code == 2
        assert capsys.readouterr().err == (
            f"error: argument --window: expected a whole number >= 1, got '{window}'\n"
        )
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        script.main([str(tmp_path), "--out", str(tmp_path / "file")])
    assert "--out takes a folder" in capsys.readouterr().err
    (tmp_path / "runs" / "a" / "tb").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "tb" / "events.out.tfevents.1.x").write_bytes(b"garbage" * 50)
    assert script.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    assert "logged none of the scalars reported" in capsys.readouterr().err
