"""Losses as torchrl ``LossModule`` subclasses returning ``loss_*`` entries."""

from aefrl.objectives.actor import DreamerActorLoss
from aefrl.objectives.value import DreamerValueLoss, ReplayValueLoss
from aefrl.objectives.world_model import WorldModelLoss

__all__ = ["DreamerActorLoss", "DreamerValueLoss", "ReplayValueLoss", "WorldModelLoss"]
