"""Environments: DMC pixel tasks on torchrl (:mod:`aefrl.envs.dmc`), a world model's
imagination (:mod:`aefrl.envs.imagination`) and its filtered latents as a real env's
observations (:mod:`aefrl.envs.latent`)."""

from aefrl.envs.dmc import DMCPixelEnv, available_tasks, make_dmc_env, task_action_dim
from aefrl.envs.imagination import ImaginationEnv
from aefrl.envs.latent import LatentObservation

__all__ = [
    "DMCPixelEnv",
    "ImaginationEnv",
    "LatentObservation",
    "available_tasks",
    "make_dmc_env",
    "task_action_dim",
]
