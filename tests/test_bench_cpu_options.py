"""scripts/bench_cpu_options.py end to end at toy sizes (numbers are not asserted)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_cpu_options  # noqa: E402

from aefrl.objectives.actor import GRADIENTS  # noqa: E402


def test_toy_run_writes_every_measurement(tmp_path):
    out = tmp_path / "opts.json"
    bench_cpu_options.main(["--toy", "--reps", "1", "--frames", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["matmul"][0]["float32"] > 0 and r["matmul"][0]["bfloat16"] > 0
    assert r["norm_act"][0]["map"] == "2x256x4x4"
    assert r["norm_act"][0]["eager_ms"] > 0 and r["norm_act"][0]["compiled_ms"] > 0
    assert r["rssm_scan"]["steps"] == 4 and r["rssm_scan"]["compiled_ms"] > 0
    assert len(r["last_decoder_layer"]) == 5  # each form checked equal to the layer first
    assert all(row["fwd_bwd_ms"] > 0 for row in r["last_decoder_layer"])
    (row,) = r["update_precision"]
    assert row["none_s"] > 0 and row["bf16_s"] > 0 and row["speedup"] > 0
    assert "RSSM filtering scan" in out.with_suffix(".md").read_text()
    assert "| toy |" in out.with_suffix(".md").read_text()
    wm, full = r["rssm_width"]  # toy sizes: hidden 16, deter 8
    assert (wm["update"], full["update"]) == ("wm_update", "full_update")
    assert wm["widths"] == [16, 8] and min(wm["wide_s"], wm["narrow_s"], full["narrow_s"]) > 0
    assert "RSSM MLPs 16 wide" in out.with_suffix(".md").read_text()
    (row,) = r["actor_gradient"]
    times = [row[f"{part}_{g}_s"] for part in ("actor_critic", "full") for g in GRADIENTS]
    assert min(times) > 0 and row["full_speedup"] > 0
    assert "agent.actor_loss.gradient" in out.with_suffix(".md").read_text()
    (row,) = r["replay_value"]
    assert min(row[f"{n}_s"] for n in bench_cpu_options.REPLAY_VALUE) > 0
    assert row["repval_grad_cost"] > 0 and "repval_grad_delta_mib" in row
    assert "+ repval_grad s" in out.with_suffix(".md").read_text()
    # --only runs the sections named, and the report has only those
    bench_cpu_options.main(["--toy", "--reps", "1", "--frames", "2", "--out", str(out), "--only",
                            "last_decoder_layer"])  # fmt: skip
    r = json.loads(out.read_text())
    assert "last_decoder_layer" in r and "matmul" not in r and "update_precision" not in r
    assert "RSSM" not in out.with_suffix(".md").read_text()


def test_the_subpixel_weight_is_the_transposed_convolution():
    """Independent of the benchmark's own check: against conv_transpose2d in float64."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 6, 7, dtype=torch.float64), torch.randn(5, 3, 4, 4).double()
    want = F.conv_transpose2d(x, w, stride=2, padding=1)
    got = F.pixel_shuffle(F.conv2d(x, bench_cpu_options.subpixel_weight(w), padding=1), 2)
    torch.testing.assert_close(got, want)


def test_the_phase_weight_is_the_transposed_convolution():
    """The 2 x 2 form over the padded input, cropped, against conv_transpose2d in float64."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 6, 7, dtype=torch.float64), torch.randn(5, 3, 4, 4).double()
    want = F.conv_transpose2d(x, w, stride=2, padding=1)
    padded = F.pad(x, (1, 1, 1, 1))
    got = F.pixel_shuffle(F.conv2d(padded, bench_cpu_options.phase_weight(w)), 2)[..., 1:-1, 1:-1]
    torch.testing.assert_close(got, want)
