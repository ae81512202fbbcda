"""aefrl/cli.py: what the scripts share for one-sentence errors, and the scripts using it."""

import argparse
import re

import pytest
import torch

from aefrl.arguments import seed_arg
from aefrl.cli import UserError, make_env, output_path, resolve_device
from tests.tiny_run import load_script


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device meta is not supported"):
        resolve_device("meta", "--device ")
    for name, shown in ((None, "null"), (0, "0"), (True, "True")):  # null: a TypeError before
        with pytest.raises(UserError, match=f"device={shown} is not a device"):
            resolve_device(name)
    with pytest.raises(UserError, match="device=gpu0 is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_seeds():
    assert seed_arg("0") == 0 and seed_arg(str(2**32 - 1)) == 2**32 - 1
    for bad in ("-1", str(2**32), "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 2\*\*32 - 1\]"):
            seed_arg(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # the env's arguments are the env section's keys: name them as the user types them
        ({"render": "pretty"}, "env.render must be one of faithful, fast, got 'pretty'"),
        ({"image_size": 4}, "env.image_size must be an integer between 8 and 1024, got 4"),
        ({"action_repeat": 1.5}, "env.action_repeat must be an integer >= 1, got 1.5"),
        ({"time_limit": -1}, "env.time_limit must be a positive number of seconds"),
        ({"task": "walker-fly"}, "env.task 'walker-fly' is not a DMC task (walker tasks:"),
        ({"seed": -1}, "seed must be an integer"),  # the run's own key, not env.seed
    ],
)
def test_env_errors_name_the_env_key(kwargs, message):
    kwargs = {"task": "walker-walk", **kwargs}
    with pytest.raises(UserError) as info:
        make_env(**kwargs)
    assert str(info.value).startswith(message)


def test_output_folders_are_made_before_the_work(tmp_path):
    out = output_path(str(tmp_path / "a" / "b" / "r.json"), tmp_path / "default.json")
    assert out.parent.is_dir() and not out.exists()
    assert output_path(None, tmp_path / "d.json") == tmp_path / "d.json"
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        output_path(str(tmp_path / "file" / "r.json"), tmp_path)
    # A directory, or a place that cannot hold files, is refused before the work too.
    with pytest.raises(UserError, match="it is a directory; give a file path"):
        output_path(str(tmp_path), tmp_path / "d.json")
    with pytest.raises(UserError, match=r"cannot write /proc/r\.json"):
        output_path("/proc/r.json", tmp_path / "d.json")
    (tmp_path / "kept.json").write_text("old")  # an existing file is left as it is until written
    assert output_path(str(tmp_path / "kept.json"), tmp_path).read_text() == "old"
    # A dangling symlink is written through (its target created by the script's write).
    (tmp_path / "latest.json").symlink_to(tmp_path / "results" / "r1.json")
    out = output_path(str(tmp_path / "latest.json"), tmp_path)
    assert not (tmp_path / "results" / "r1.json").exists()
    out.write_text("{}")
    assert (tmp_path / "results" / "r1.json").read_text() == "{}"


def test_outputs_never_overwrite_the_training_runs_files(tmp_path):
    """eval.py --out run/checkpoint.pt wrote its JSON over the checkpoint (the run could not be
    resumed); world_model_report.py --out x.gif wrote its GIF and then the JSON to one path."""
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    own = ("checkpoint.pt", "run_config.yaml", "provenance.jsonl", ".lock", "final_evaluation.json")
    for name in (*own, "tb/events"):
        with pytest.raises(UserError, match=re.escape(f"it is the training run's own {name}")):
            output_path(str(run / name), run / "d.json", run)
    (tmp_path / "link.pt").symlink_to(run / "checkpoint.pt")
    with pytest.raises(UserError, match=re.escape("the training run's own checkpoint.pt")):
        output_path(str(tmp_path / "link.pt"), run / "d.json", run)  # through a link
    assert output_path(str(run / "eval.json"), run / "d.json", run) == run / "eval.json"
    with pytest.raises(UserError, match="another output of this command goes there"):
        output_path(str(run / "x.gif"), run / "d.gif", run, (run / "x.gif",))


@pytest.mark.parametrize("name", ["eval", "world_model_report"])
def test_an_output_over_the_checkpoint_is_refused_before_any_work(name, tmp_path, capsys):
    from tests.tiny_run import write_tiny_dreamer_run

    write_tiny_dreamer_run(tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    script = load_script(name)
    assert script.main([str(tmp_path), "--out", str(tmp_path / "checkpoint.pt")]) == 2
    assert "the training run's own checkpoint.pt" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    # A checkpoint of another name, read as the file given: not overwritten either.
    (tmp_path / "checkpoint.pt").rename(tmp_path / "snap.pt")
    assert script.main([str(tmp_path / "snap.pt"), "--out", str(tmp_path / "snap.pt")]) == 2
    assert "it is the training run's own snap.pt" in capsys.readouterr().err
    assert (tmp_path / "snap.pt").read_bytes() == before


@pytest.mark.parametrize("name", ["eval", "world_model_report"])
def test_scripts_refuse_bad_seeds_and_devices_in_one_sentence(name, tmp_path, capsys):
    script = load_script(name)
    with pytest.raises(SystemExit) as info:
        script.main([str(tmp_path), "--seed", "-1"])
    assert info.value.code == 2 and "expected an integer" in capsys.readouterr().err
    if name == "eval":
        assert script.main([str(tmp_path), "--device", "tpu"]) == 2
        err = capsys.readouterr().err
        assert err == "error: --device tpu is not a device: use auto, cpu, cuda or cuda:N\n"
