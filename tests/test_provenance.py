"""Run records: one JSON line per start of a training run."""

from aefrl.provenance import append_run_record, cpu_model, read_run_records


def test_run_records_append_per_start_and_skip_a_line_cut_by_a_kill(tmp_path):
    assert read_run_records(tmp_path) == []  # runs from before the records existed
    append_run_record(tmp_path, 0, "python scripts/train.py seed=1")
    append_run_record(tmp_path, 5000, "python scripts/train.py resume=x")
    with open(tmp_path / "provenance.jsonl", "a") as f:
        f.write('{"started": "2026-')  # a kill mid-write
    first, resumed = read_run_records(tmp_path)
    assert (first["frames"], resumed["frames"]) == (0, 5000)
    assert resumed["command"] == "python scripts/train.py resume=x"
    assert first["cpu"] == cpu_model() and "torch" in first and "git" in first
