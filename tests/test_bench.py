"""Smoke test of scripts/bench.py at toy sizes: it runs and writes every JSON key (no timings
are asserted; a timed test on a shared machine would only test the machine)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

TOP_LEVEL = (
    "wm_update_speedup_vs_torchrl",
    "full_update_speedup_vs_torchrl",
    "wm_update_over_conv_bound",
    "wm_update_over_conv_layers_bound",
    "wm_update_speedup_vs_torchrl_by_model",
    "full_update_speedup_vs_torchrl_by_model",
    "wm_update_speedup_vs_torchrl_same_trunks",
    "full_update_speedup_vs_torchrl_same_trunks",
    "machine",
    "load_average",
    "command",
    "identical_sizes",
    "scaling",
    "image_scaling",
    "default_sizes",
    "end_to_end",
    "end_to_end_torchrl",
    "e2e_speedup_vs_torchrl",
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_toy_run_writes_every_key(bench, tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--toy", "--reps", "1", "--skip-e2e", "--out", str(out)])
    result = json.loads(out.read_text())
    for key in TOP_LEVEL:
        assert key in result, key
    ident = result["identical_sizes"]
    for section in ("wm_update", "full_update", "imagination"):
        assert set(ident[section]) == {"aef", "vae", "aef_v1", "torchrl"}, section
        assert all(r["median_s"] > 0 for r in ident[section].values())
    assert set(ident["conv_bound"]) == {
        "ours_trunks",
        "aef_v1_trunks",
        "ours_conv_layers",
        "ours_conv_layers_channels_last",
        "torchrl_trunks",
    }
    assert ident["profile"]["wm_update_aef"]["top_ops"]
    assert ident["conv_flops_per_image"]["torchrl"]["conv_gflop_forward"] > 0
    work = ident["update_flops"]
    assert set(work) == {"aef", "vae", "aef_v1", "torchrl"}
    for rec in work.values():  # the full update contains the world-model update
        assert rec["full_update"]["flops"] > rec["wm_update"]["flops"] > 0
        assert rec["wm_update"]["gflop_per_s"] > 0
    scaling = result["scaling"]
    assert {r["subject"] for r in scaling} == {"aef", "torchrl"}
    assert {(r["batch"], r["seq"]) for r in scaling} == {(3, 4), (2, 4)}  # toy point, headline
    for r in scaling:  # every point times all three, and the headline rows are the headline's
        assert all(r[m]["median_s"] > 0 for m in ("wm_update", "full_update", "imagination"))
    head = next(r for r in scaling if r["subject"] == "aef" and (r["batch"], r["seq"]) == (2, 4))
    assert head["full_update"] == ident["full_update"]["aef"]
    images = {(r["subject"], r["image"]): r for r in result["image_scaling"]}
    assert set(images) == {("aef", 32), ("aef", 64), ("torchrl", 64)}  # toy side, headline
    small = images[("aef", 32)]
    for m in ("wm_update", "full_update", "imagination", "conv_bound"):
        assert small[m]["median_s"] > 0, m
    assert images[("aef", 64)]["conv_bound"] == ident["conv_bound"]["ours_trunks"]
    assert images[("torchrl", 64)]["wm_update"] == ident["wm_update"]["torchrl"]
    assert result["load_average"]["start"] and result["load_average"]["end"]
    md = out.with_suffix(".md").read_text()
    assert "### Image size" in md and "| ours (aef) | 32 x 32 |" in md
    assert "world-model update speedup" in md and "| torchrl |" in md
    assert "### Work per update" in md and "GFLOP/s" in md
    sizes = ident["sizes"]  # the RSSM's MLPs as wide as the belief, recorded and shown
    assert sizes["rssm_hidden"] == sizes["deter"] and f"(its MLPs {sizes['deter']} wide)" in md
    from aefrl.bench.report import markdown  # a GPU's memory is max allocated, not RSS

    gpu_md = markdown({**result, "device": "cuda"})
    assert "peak RSS MiB" in md and "peak RSS MiB" not in gpu_md
    assert gpu_md.count("max allocated MiB") == md.count("peak RSS MiB")
    assert "peak RSS of the process" not in gpu_md and "Peak RSS as above" not in gpu_md
    assert "compile_stats" not in result and "dynamo" not in md  # eager


def test_a_compiled_run_says_what_dynamo_did(bench, tmp_path, monkeypatch):
    """``--compile``: the result and the headline say how many graphs dynamo made and whether a
    function passed its recompile limit (then ran eagerly), counted after the headline's
    measurements and at the end of the run. What is counted is tested against dynamo in
    tests/test_compiled.py; here compiling is skipped (identity) and the counts are stand-ins,
    so the test checks when they are taken and how they are reported."""
    monkeypatch.setattr(torch, "compile", lambda model=None, **options: model)
    # agent.compile raises dynamo's limit for the process; keep it to this test
    monkeypatch.setattr(
        torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit
    )
    counts = iter(
        [
            {"unique_graphs": 1, "recompile_limit_hits": 1, "functions_past_limit": ["f (a:1)"]},
            {"unique_graphs": 5, "recompile_limit_hits": 2, "functions_past_limit": ["f (a:1)"]},
        ]
    )
    taken = []
    monkeypatch.setattr(bench, "compile_stats", lambda: taken.append("stats") or next(counts))
    monkeypatch.setattr(bench, "measure_scaling", lambda *a: taken.append("scaling") or [])
    out = tmp_path / "bench.json"
    bench.main(["--toy", "--reps", "1", "--skip-e2e", "--compile", "--out", str(out)])
    assert taken == ["stats", "scaling", "stats"]  # the headline's count before the later sections
    result = json.loads(out.read_text())
    assert result["identical_sizes"]["compile_stats"]["unique_graphs"] == 1
    assert result["compile_stats"]["unique_graphs"] == 5
    md = out.with_suffix(".md").read_text()
    assert (
        "dynamo made 1 graph and **1 function hit its recompile limit and ran eagerly from then "
        "on** (f (a:1)): the compiled times above are partly eager; by the end of the run, "
        "dynamo made 5 graphs and **2 functions hit its recompile limit and ran eagerly from "
        "then on** (f (a:1)): the later sections' compiled times are partly eager." in md
    )
    from aefrl.bench.report import markdown

    clean = {"unique_graphs": 3, "recompile_limit_hits": 0, "functions_past_limit": []}
    result["identical_sizes"]["compile_stats"] = clean
    text = markdown({**result, "compile_stats": clean})
    assert "dynamo made 3 graphs and no function hit its recompile limit." in text
    assert "by the end of the run" not in text and "partly eager" not in text
    late = {"unique_graphs": 4, "recompile_limit_hits": 1, "functions_past_limit": []}
    text = markdown({**result, "compile_stats": late})  # a hit after the headline's count
    assert (
        "3 graphs and no function hit its recompile limit; by the end of the run, dynamo made "
        "4 graphs and **1 function hit its recompile limit and ran eagerly from then on**: the "
        "later sections' compiled times are partly eager." in text
    )
    del result["identical_sizes"]["compile_stats"]  # a result from before the headline's count
    text = markdown({**result, "compile_stats": late})
    assert "losses): in the whole run, dynamo made 4 graphs and **1 function" in text
    assert "identical-sizes" not in text.split("Compiled (")[1].split("\n")[0]


def test_only_e2e_writes_the_end_to_end_run_alone(bench, tmp_path):
    out = tmp_path / "e2e.json"
    bench.main(["--toy", "--only-e2e", "--task", "cartpole-swingup", "--out", str(out)])
    result = json.loads(out.read_text())
    e, t = result["end_to_end"], result["end_to_end_torchrl"]
    assert e["task"] == "cartpole-swingup" and e["agent_steps_per_s"] > 0
    assert e["timed_agent_steps"] >= 2 and e["updates_in_timed_steps"] >= 1
    assert "identical_sizes" not in result and result["machine"]["OMP_WAIT_POLICY"]
    # torchrl's Dreamer loop at the same sizes, ratio and task, and ours over it
    assert t["impl"] == "torchrl" and t["task"] == "cartpole-swingup"
    assert (t["train_ratio"], t["batch"]) == (e["train_ratio"], e["batch"])
    assert t["timed_agent_steps"] >= 2 and t["updates_in_timed_steps"] >= 1
    speedup = e["agent_steps_per_s"] / t["agent_steps_per_s"]
    assert result["e2e_speedup_vs_torchrl"] == pytest.approx(speedup, rel=1e-3, abs=1e-3)
    from aefrl.bench.report import _e2e

    lines = _e2e(result)
    assert "torchrl's Dreamer" in lines[-1] and str(t["agent_steps_per_s"]) in lines[-1]


def test_only_e2e_is_refused_with_skip_e2e(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--toy", "--only-e2e", "--skip-e2e"])
    assert "exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "foo"], "error: --device foo is not a device"),  # a RuntimeError
        (["--device", "meta"], "error: --device meta is not supported"),
        (["--reps", "0"], "error: argument --reps: expected a whole number >= 1, got '0'"),
        (["--e2e-steps", "-3"], "error: argument --e2e-steps: expected a whole number >= 1"),
        (["--threads", "-1"], "error: argument --threads: expected a whole number >= 1"),
        (["--task", "nonsense"], "error: --task 'nonsense' is not a DMC task"),
    ],
)
def test_bad_options_are_one_line_before_any_work(bench, args, message, tmp_path, capsys):
    """--reps 0 silently used the plan's reps, --reps -1 failed after all the work, --device
    foo and --task nonsense were tracebacks, and argparse's usage block buried the sentence."""
    with pytest.raises(SystemExit) as info:
        bench.parse_args(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(message) and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", str(tmp_path)])
    assert "--out takes a JSON file path" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_matrix_refuses_to_run_without_cuda(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        ["bash", str(root / "scripts/bench_gpu.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "no CUDA device" in out.stderr
    assert not list(tmp_path.glob("*.json"))
    out = subprocess.run(  # a stage it does not have, before anything runs
        ["bash", str(root / "scripts/bench_gpu.sh"), str(tmp_path), "everything"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "stage must be quick, full, compile or e2e, got everything" in out.stderr


def _script_copy(tmp_path):
    """bench_gpu.sh in a tree of its own: it changes to its repository's root, where a
    developer's .gl / .whl would otherwise be unpacked into this machine's / by the fake
    python's "CUDA"."""
    scripts = tmp_path / "repo" / "scripts"
    scripts.mkdir(parents=True)
    root = Path(__file__).resolve().parents[1]
    (scripts / "bench_gpu.sh").write_text((root / "scripts/bench_gpu.sh").read_text())
    return scripts / "bench_gpu.sh"


def _fake_python(tmp_path, imports_fail=False):
    """A python3 that has CUDA and records every command it is given (bench_gpu.sh's
    ``PYTHON``)."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python3"
    fail = "exit 1" if imports_fail else "true"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {log}\n'
        'if [[ "$*" == *"import torch, torchrl"* ]]; then echo versions; ' + fail + "; fi\n"
    )
    fake.chmod(0o755)
    return fake, log


@pytest.mark.parametrize("stage", ["quick", "full", "compile", "e2e"])
def test_gpu_script_runs_every_step_of_a_stage_and_packs_the_results_into_out(tmp_path, stage):
    """With $OUT set (the device tool's machine) the results go to a folder of their own and
    come back as one archive (the tool returns at most 8 files); each step runs under its own
    time limit; the libraries' versions are logged first."""
    import subprocess
    import tarfile

    script = _script_copy(tmp_path)
    fake, log = _fake_python(tmp_path)
    back = tmp_path / "out"
    back.mkdir()
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(back), "AEFRL_DEVICE_TOOL": "1"}
    run = subprocess.run(
        ["bash", str(script), stage],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    calls = log.read_text().splitlines()
    assert "torch.cuda.is_available" in calls[0] and "import torch, torchrl" in calls[1]
    expected = {"quick": 3, "full": 2, "compile": 3, "e2e": 3}[stage]
    assert len(calls) == 2 + expected
    if stage == "quick":  # the numbers first, the tests in what is left
        assert "bench.py" in calls[2] and "bench.py" in calls[3] and "pytest" in calls[4]
    assert [p.name for p in back.iterdir()] == [f"gpu_{stage}.tgz"]
    with tarfile.open(back / f"gpu_{stage}.tgz") as archive:
        names = [n for n in archive.getnames() if n.endswith(".log")]
    assert len(names) == 1 + expected  # the versions' log and every step's
    assert run.stdout.count("(limit ") == 1 + expected


def test_gpu_script_stops_when_the_libraries_do_not_load(tmp_path):
    import subprocess

    script = _script_copy(tmp_path)
    fake, log = _fake_python(tmp_path, imports_fail=True)
    back = tmp_path / "out"
    back.mkdir()
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(back), "AEFRL_DEVICE_TOOL": "1"}
    run = subprocess.run(
        ["bash", str(script)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 2 and "scripts/gpu_carry.sh" in run.stderr
    assert len(log.read_text().splitlines()) == 2  # the CUDA check and the imports: nothing more
    assert (back / "gpu_quick.tgz").exists()  # the log of what failed still comes back


def test_call_flops_counts_a_linear_layer_forward_and_backward():
    from aefrl.bench.timing import call_flops

    n, i, o = 4, 10, 20
    layer, x = torch.nn.Linear(i, o), torch.randn(n, i, requires_grad=True)
    # forward x W^T; backward: input grad and weight grad, each the same 2·n·i·o FLOPs.
    assert call_flops(lambda: layer(x).sum().backward())["flops"] == 3 * 2 * n * i * o


def test_same_trunks_variant_builds_torchrl_geometry_without_norms(bench):
    from aefrl.bench.subjects import Sizes

    ours = bench.build_ours("aef_v1", Sizes(latent=3, deter=8, hidden=16, depth=4), "cpu")
    wm = ours.agent.world_model
    assert wm.obs_model.kind == "aef"
    x = torch.zeros(1, 3, 64, 64)
    # torchrl's ObsEncoder: valid padding, 64 -> 31 -> 14 -> 6 -> 2, so 8 * depth * 2 * 2 features
    assert wm.obs_model.encoder(x).shape[-1] == 8 * 4 * 2 * 2
    trunks = [*wm.obs_model.encoder.modules(), *wm.obs_model.decoder.modules()]
    assert not [m for m in trunks if "Norm" in type(m).__name__]
    default = bench.build_ours("aef", Sizes(latent=3, deter=8, hidden=16, depth=4), "cpu")
    assert any("Norm" in type(m).__name__ for m in default.agent.world_model.obs_model.modules())
    # identical sizes give our RSSM's MLPs torchrl's width (the belief's), the heads hidden's
    for model in (wm, default.agent.world_model):
        assert (
            model.rssm.gru.input_size == 8 and model.obs_model.posterior_head[0].out_features == 8
        )
        assert model.reward_head.net[0].out_features == 16


def test_the_conv_bound_hands_the_trunks_gradients_in_their_outputs_layout(bench):
    """The update's decoder output is channels-last and so is the gradient autograd hands it;
    the bound gave it an NCHW gradient, a layout copy in its backward the update does not make."""
    from aefrl.bench.subjects import Sizes, random_batch

    sizes = Sizes(latent=3, deter=8, hidden=16, depth=4).with_batch(2, 3)
    ours = bench.build_ours("aef", sizes, "cpu")
    batch = ours.prepare(random_batch(sizes))
    # the trunks themselves (channels-last, as in the update), and the layers-only copies
    for layers_only, channels_last in ((False, False), (True, True), (True, False)):
        inputs = ours.conv_inputs(batch, layers_only=layers_only, channels_last=channels_last)
        x = inputs["modules"][1](inputs["dec_in"])
        fmt = torch.channels_last if channels_last or not layers_only else torch.contiguous_format
        assert x.is_contiguous(memory_format=fmt)
        assert inputs["grad_x"].shape == x.shape
        assert inputs["grad_x"].stride() == x.stride(), (layers_only, channels_last)


def test_time_interleaved_rotates_and_measures_memory_in_a_round_of_its_own(monkeypatch):
    """Order of calls: a memory round, the warm-up rounds, the timed rounds, each starting one
    callable later than the one before; memory is read in the first round only and the timed
    rounds alone are recorded."""
    from aefrl.bench import timing

    log, measured = [], []

    class Recorder:  # stands in for PeakMemory: which calls it wrapped
        peak = delta = 0

        def __init__(self, device):
            pass

        def __enter__(self):
            measured.append(len(log))
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(timing, "PeakMemory", Recorder)
    calls = {name: (lambda n=name: log.append(n)) for name in "abc"}
    out = timing.time_interleaved(calls, torch.device("cpu"), reps=2, warmup=1)
    assert "".join(log) == "abc" + "bca" + "cab" + "abc"
    assert measured == [0, 1, 2]  # before the calls of the memory round, and no others
    assert all(len(rec["times_s"]) == 2 for rec in out.values())
    log.clear()
    timing.time_interleaved(calls, torch.device("cpu"), reps=1, warmup=0, memory=False)
    assert "".join(log) == "abc"


def test_a_gpu_profile_counts_each_kernel_once_under_its_operator_and_phase():
    """On a GPU the profiler lists the CPU-side operators, whose self device time holds the
    kernels they launched, and the kernels again as events of their own (no parent, so no
    phase): the summary counted each kernel twice, its second copy as "forward"."""
    from types import SimpleNamespace as Event

    from torch.autograd import DeviceType

    from aefrl.bench.timing import self_times

    engine = Event(name="autograd::engine::evaluate_function: MmBackward0", cpu_parent=None)
    ops = [
        Event(name="aten::mm", cpu_parent=None, device_type=DeviceType.CPU,
              self_device_time_total=30.0, self_cpu_time_total=5.0),
        Event(name="aten::mm", cpu_parent=engine, device_type=DeviceType.CPU,
              self_device_time_total=50.0, self_cpu_time_total=7.0),
    ]  # fmt: skip
    kernels = [
        Event(name="sm90_xmma_gemm", cpu_parent=None, device_type=DeviceType.CUDA,
              self_device_time_total=t, self_cpu_time_total=0.0)
        for t in (30.0, 50.0)
    ]  # fmt: skip
    groups, phases, by_op = self_times(ops + kernels, cuda=True)
    assert phases == {"forward": 30.0, "backward": 50.0, "optimizer": 0.0}
    assert groups == {"matmul / linear": 80.0}
    assert by_op == {
        ("aten::mm", "forward"): [30.0, 1, "matmul / linear"],
        ("aten::mm", "backward"): [50.0, 1, "matmul / linear"],
    }
    _, cpu_phases, _ = self_times(ops, cuda=False)  # the CPU clock: self CPU times
    assert cpu_phases == {"forward": 5.0, "backward": 7.0, "optimizer": 0.0}


def test_e2e_speedup_only_compares_like_with_like(bench, monkeypatch):
    """torchrl's loop runs one env in float32, eagerly: ours with more envs, bf16 trunks or
    compiled is not a speedup over it (and ``--compile`` compiles ours in the loop too)."""
    from types import SimpleNamespace

    ours, theirs = {"agent_steps_per_s": 0.6}, {"agent_steps_per_s": 0.5}
    like = SimpleNamespace(num_envs=1, autocast="none", compile=False)
    assert bench.e2e_speedup(ours, theirs, like) == 1.2
    assert bench.e2e_speedup(ours, None, like) is None
    for other in ({"num_envs": 4}, {"autocast": "bf16"}, {"compile": True}):
        assert bench.e2e_speedup(ours, theirs, SimpleNamespace(**{**vars(like), **other})) is None
    built = []

    class BuiltError(Exception):
        pass

    def build_ours(kind, sizes, device, compile=False, autocast="none"):
        built.append(compile)
        raise BuiltError

    monkeypatch.setattr(bench, "build_ours", build_ours)
    with pytest.raises(BuiltError):
        bench.measure_end_to_end(bench.parse_args(["--toy", "--only-e2e", "--compile"]))
    assert built == [True]
    from aefrl.bench.report import _e2e_torchrl

    fields = "task render train_ratio batch prefill_steps frames_per_batch timed_agent_steps"
    t = dict.fromkeys(fields.split(), 1) | dict.fromkeys(["updates_in_timed_steps", "seconds"], 1)
    text = "".join(_e2e_torchrl({"end_to_end_torchrl": {**theirs, **t}}))
    assert "No speedup: ours ran with other envs, precision or compilation than" in text


def test_gpu_script_ends_every_step_by_its_deadline(tmp_path):
    """The device tool kills a command at its limit, traps included: steps the deadline leaves
    no time for are skipped, named and logged, and the archive holds what ran."""
    import subprocess
    import tarfile

    script = _script_copy(tmp_path)
    fake = tmp_path / "python3"
    fake.write_text('#!/usr/bin/env bash\n[[ "$*" == *bench.py* ]] && sleep 5\nexit 0\n')
    fake.chmod(0o755)
    back = tmp_path / "out"
    back.mkdir()
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(back), "AEFRL_DEVICE_TOOL": "1"}
    env["AEFRL_GPU_SECONDS"] = "38"  # 23 s for steps after the 15 s margin: one bench, then none
    run = subprocess.run(
        ["bash", str(script), "quick"], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 1 and "skipped, no time left" in run.stdout
    assert "failed: e2e_cuda_envs1 gpu_tests" in run.stderr
    with tarfile.open(back / "gpu_quick.tgz") as archive:
        assert {"./bench_cuda_quick.log", "./gpu_tests.log"} <= set(archive.getnames())


def test_gpu_script_unpacks_nothing_off_the_device_tool(tmp_path):
    """Without AEFRL_DEVICE_TOOL=1 (a workstation with OUT in its environment) no wheels are
    installed and no loaders unpacked into /: the fake python would record the pip call."""
    import subprocess

    script = _script_copy(tmp_path)
    (script.parent.parent / ".whl").mkdir()
    (script.parent.parent / ".whl" / "x-1-py3-none-any.whl").write_bytes(b"")
    fake, log = _fake_python(tmp_path)
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out")}
    env.pop("AEFRL_DEVICE_TOOL", None)
    run = subprocess.run(
        ["bash", str(script), str(results), "compile"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert not any("pip install" in line for line in log.read_text().splitlines())
    assert (results / "imports.log").exists() and not (tmp_path / "out").exists()


def test_gpu_script_packs_after_every_step(tmp_path):
    """The tool kills a command at its limit with its exit trap: the archive must already hold
    every finished step's log when the next step runs."""
    import subprocess

    script = _script_copy(tmp_path)
    back = tmp_path / "out"
    back.mkdir()
    seen = tmp_path / "seen.txt"
    fake = tmp_path / "python3"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$*" == *e2e_cuda_envs1* ]]; then '
        f"tar tzf {back}/gpu_quick.tgz > {seen}; fi\n"
        "exit 0\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(back), "AEFRL_DEVICE_TOOL": "1"}
    run = subprocess.run(
        ["bash", str(script), "quick"], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stderr
    assert "./bench_cuda_quick.log" in seen.read_text().split()
    assert sorted(p.name for p in back.iterdir()) == ["gpu_quick.tgz"]  # no .tmp left


@pytest.mark.parametrize(
    ("args", "extra_env", "message"),
    [
        (["quick", "full"], {}, None),  # a results folder named like a stage, then the stage
        (["results", "full compile"], {}, "stage must be quick, full, compile or e2e"),
        (["results"], {"AEFRL_GPU_SECONDS": "9.5"}, "AEFRL_GPU_SECONDS must be whole seconds"),
        (["OUT"], {"AEFRL_DEVICE_TOOL": "1"}, "the results folder must not be $OUT"),
    ],
)
def test_gpu_script_arguments(tmp_path, args, extra_env, message):
    import subprocess

    script = _script_copy(tmp_path)
    fake, _ = _fake_python(tmp_path)
    back = tmp_path / "out"
    back.mkdir()
    args = [str(back) if a == "OUT" else a for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEFRL_")}
    env.update(PYTHON=str(fake), OUT=str(back), **extra_env)
    run = subprocess.run(
        ["bash", str(script), *args],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    if message is None:  # ran the full stage into ./quick
        assert run.returncode == 0, run.stderr
        assert "bench_cuda_bf16" in run.stdout and (script.parent.parent / "quick").is_dir()
    else:
        assert run.returncode == 2 and message in run.stderr
