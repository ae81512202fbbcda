"""A run directory holding an untrained tiny Dreamer checkpoint, for tests of the scripts that
read one (scripts/eval.py, scripts/world_model_report.py)."""

import importlib.util
from pathlib import Path

import torch

from aefrl.checkpoint import save_checkpoint
from agents.factory import build_agent
from tests.world_model.conftest import OBS

ROOT = Path(__file__).resolve().parents[1]


def write_tiny_dreamer_run(
    run_dir: Path, time_limit: float = 0.1, frames: int = 0, obs_model: str = "aef"
) -> dict:
    """Save a tiny Dreamer (``obs_model`` kind, aef by default) on cartpole-swingup (16x16, fast
    rendering, episodes of ``time_limit`` simulated seconds) as ``run_dir/checkpoint.pt``;
    returns its run config."""
    torch.manual_seed(0)
    wm = {"deter": 8, "hidden": 16, "layers": 1, "depth": 4}
    conf = {
        "env": {"task": "cartpole-swingup", "image_size": OBS[-1], "action_repeat": 2,
                "render": "fast", "num_envs": 1, "time_limit": time_limit},
        "agent": {"name": "dreamer", "world_model": wm, "actor": {"hidden": 16, "layers": 1},
                  "critic": {"hidden": 16, "layers": 1}},
        "obs_model": {"kind": obs_model, "latent_dim": 3, "options": {}},
    }  # fmt: skip
    dreamer = build_agent(conf["agent"], conf["obs_model"], OBS, 1)
    state = {
        "format": 1,
        "run_config": conf,
        "agent": dreamer.state_dict(),
        "counters": {"frames": frames},
    }
    save_checkpoint(Path(run_dir) / "checkpoint.pt", state)
    return conf


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
