"""Environments: DMC pixel tasks on torchrl (:mod:`aefrl.envs.dmc`)."""

from aefrl.envs.dmc import DMCPixelEnv, available_tasks, make_dmc_env, task_action_dim
from aefrl.envs.imagination import ImaginationEnv

__all__ = ["DMCPixelEnv", "ImaginationEnv", "available_tasks", "make_dmc_env", "task_action_dim"]
