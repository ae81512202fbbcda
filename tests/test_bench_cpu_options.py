"""scripts/bench_cpu_options.py end to end at toy sizes (numbers are not asserted)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_cpu_options  # noqa: E402


def test_toy_run_writes_every_measurement(tmp_path):
    out = tmp_path / "opts.json"
    bench_cpu_options.main(["--toy", "--reps", "1", "--frames", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["matmul"][0]["float32"] > 0 and r["matmul"][0]["bfloat16"] > 0
    assert r["norm_act"][0]["map"] == "2x256x4x4"
    assert r["norm_act"][0]["eager_ms"] > 0 and r["norm_act"][0]["compiled_ms"] > 0
    assert r["rssm_scan"]["steps"] == 4 and r["rssm_scan"]["compiled_ms"] > 0
    (row,) = r["update_precision"]
    assert row["none_s"] > 0 and row["bf16_s"] > 0 and row["speedup"] > 0
    assert "RSSM filtering scan" in out.with_suffix(".md").read_text()
    assert "| toy |" in out.with_suffix(".md").read_text()
