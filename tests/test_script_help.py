"""The command lines of scripts/eval.py and scripts/world_model_report.py: every option explained
with its default, a mistake as one line ``error: ...`` with exit code 2 (no usage block, no
traceback), and both answered before the seconds of importing torch and torchrl."""

import os
import subprocess
import sys

import pytest

from aefrl.arguments import Parser
from tests.tiny_run import ROOT, load_script

SCRIPTS = ["eval", "world_model_report"]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
# Runs a script as __main__ and says, on its last line of stdout, whether torch got imported.
RUN_AS_MAIN = """\
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("torch imported:", "torch" in sys.modules)
"""


def run_as_main(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RUN_AS_MAIN, f"scripts/{name}.py", *args],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_says_what_it_does(name):
    parser = load_script(name).make_parser()
    for action in parser._actions:
        assert action.help, action.dest


@pytest.mark.parametrize(
    ("name", "lines"),
    [
        (
            "eval",
            [
                "--episodes EPISODES episodes to evaluate, >= 1 (default: 10)",
                "--seed SEED seed of the evaluation episodes and of torch (default: 12345)",
                "--device DEVICE auto (CUDA if available), cpu, cuda or cuda:N (default: auto)",
                "(default: the run's own env.render,",
                "(default: <run_dir>/eval.json",
            ],
        ),
        (
            "world_model_report",
            [
                "--episodes EPISODES held-out episodes to report on, >= 1 (default: 2)",
                "--seed SEED seed of the held-out episodes and of torch (default: 54321)",
                "(default: the run's own env.render,",
                "--out OUT JSON path (default: <run_dir>/world_model_report.json, or "
                "world_model_report_random.json with --policy random)",
            ],
        ),
    ],
)
def test_help_gives_the_defaults_without_importing_torch(name, lines):
    """--help used to take ~4 s (torch, torchrl and dm_control imported first) and gave no
    default for --episodes, nor any text for --device, --seed, --render or --out (report)."""
    out = run_as_main(name, "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.rstrip().endswith("torch imported: False")
    text = " ".join(out.stdout.split())  # argparse wraps the help at the terminal's width
    for line in lines:
        assert line in text


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("eval", ["RUN", "--episodes", "x"], "argument --episodes: invalid int value: 'x'"),
        ("eval", ["RUN", "--episodes", "0"], "--episodes must be >= 1, got 0"),
        ("eval", ["RUN", "--render", "pretty"], "argument --render: invalid choice: 'pretty'"),
        ("eval", ["RUN", "--planner", "ga"], "argument --planner: invalid choice: 'ga'"),
        ("eval", ["RUN", "--horizon", "1.5"], "argument --horizon: invalid int value: '1.5'"),
        ("eval", ["RUN", "--seed", "-1"], "argument --seed: expected an integer in [0, 2**32 - 1]"),
        ("eval", ["RUN", "--bogus"], "unrecognized arguments: --bogus"),
        ("eval", [], "the following arguments are required: run_dir"),
        ("world_model_report", ["RUN", "--seed", "x"], "argument --seed: expected an integer"),
        ("world_model_report", ["RUN", "--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        ("world_model_report", ["RUN", "--out"], "argument --out: expected one argument"),
        ("world_model_report", [], "the following arguments are required: run_dir"),
    ],
)
def test_a_mistake_is_one_line(name, args, message, capsys):
    """argparse printed its usage block (5 lines for eval.py) above the sentence that matters."""
    with pytest.raises(SystemExit) as info:
        load_script(name).main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_mistake_is_answered_before_the_heavy_imports(name):
    out = run_as_main(name, "RUN", "--episodes", "0")
    assert out.returncode == 2 and out.stderr == "error: --episodes must be >= 1, got 0\n"
    assert out.stdout.rstrip().endswith("torch imported: False")


def test_eval_offers_the_planners_there_are():
    """eval.py spells agents.planner.PLANNERS out to parse without torchrl: they must agree."""
    from agents.planner import PLANNERS

    assert load_script("eval").PLANNERS == PLANNERS


def test_help_names_every_default_the_option_has():
    """The benchmark and study scripts' --help gave no defaults (the README says all do)."""
    parser = Parser(prog="x")
    parser.add_argument("--reps", type=int, default=0)  # 0 is a default to show (0 == False)
    parser.add_argument("--sizes", nargs="+", default=[1, 2], help="sizes")
    parser.add_argument("--out", default=None, help="where")  # nothing to show
    parser.add_argument("--quick", action="store_true", help="fewer")
    parser.add_argument("--render", default="x", help="how (default: the run's own)")
    parser.add_argument_group("planner").add_argument("--top-k", type=int, default=7, help="k")
    text = " ".join(parser.format_help().split())
    assert "--reps REPS (default: 0)" in text
    assert "sizes (default: [1, 2])" in text
    assert "where --quick fewer --render" in text  # None and a flag's False: no default shown
    assert "--top-k TOP_K k (default: 7)" in text  # in an argument group too
    assert text.count("(default") == 4  # the render option's own wording is kept


@pytest.mark.parametrize(
    "name",
    [
        *SCRIPTS,
        "train",
        "bench",
        "bench_collect",
        "bench_cpu_options",
        "bench_passes",
        "bench_replay",
        "learning_report",
        "likelihood_study",
    ],
)
def test_version_is_the_packages_own(name):
    """train.py's --version printed Hydra's version ("Hydra 1.3.8"), eval.py's asked for a
    run_dir, four benchmark scripts had none; every script now prints the installed aefrl's, as
    importlib.metadata has it."""
    from importlib.metadata import version

    out = run_as_main(name, "--version")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0] == f"aefrl {version('aefrl')}"
