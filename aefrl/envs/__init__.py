"""Environments: DMC pixel tasks on torchrl (:mod:`aefrl.envs.dmc`)."""

from aefrl.envs.dmc import DMCPixelEnv, available_tasks, make_dmc_env

__all__ = ["DMCPixelEnv", "available_tasks", "make_dmc_env"]
