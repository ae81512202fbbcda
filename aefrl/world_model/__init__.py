"""RSSM world model whose observation model is a VAE or an AEF."""

from aefrl.world_model.heads import BernoulliHead, TwoHot, TwoHotHead, symexp, symlog, two_hot
from aefrl.world_model.rssm import RSSM, Observed, RSSMState
from aefrl.world_model.world_model import Filtered, WorldModel

__all__ = [
    "RSSM",
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
]
