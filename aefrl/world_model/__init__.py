"""RSSM world model whose observation model is a VAE or an AEF."""

from aefrl.world_model.heads import (
    TWOHOT,
    BernoulliHead,
    TwoHot,
    TwoHotHead,
    symexp,
    symlog,
    two_hot,
    twohot_bins,
)
from aefrl.world_model.rssm import RSSM, Observed, RSSMState
from aefrl.world_model.world_model import Filtered, WorldModel

__all__ = [
    "RSSM",
    "TWOHOT",
    "BernoulliHead",
    "Filtered",
    "Observed",
    "RSSMState",
    "TwoHot",
    "TwoHotHead",
    "WorldModel",
    "symexp",
    "symlog",
    "two_hot",
    "twohot_bins",
]
