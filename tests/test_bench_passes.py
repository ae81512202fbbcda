"""scripts/bench_passes.py end to end at toy sizes (times are not asserted; the script itself
checks that each pair of forms computes the same values before timing them)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_passes  # noqa: E402


def test_toy_run_writes_every_row(tmp_path):
    out = tmp_path / "passes.json"
    bench_passes.main(["--toy", "--reps", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert [row["what"].split()[0] for row in r["rows"]] == [
        "decoder",
        "pre-processing",
        "filtering",
        "actor",
    ]
    for row in r["rows"]:
        assert row["plain_ms"] > 0 and row["ours_ms"] > 0 and row["speedup"] > 0
    assert "| piece |" in out.with_suffix(".md").read_text()
