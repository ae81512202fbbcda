"""Environments: DMC pixel tasks on torchrl (:mod:`aefrl.envs.dmc`)."""

from aefrl.envs.dmc import DMCPixelEnv, available_tasks, make_dmc_env
from aefrl.envs.imagination import ImaginationEnv

__all__ = ["DMCPixelEnv", "ImaginationEnv", "available_tasks", "make_dmc_env"]
