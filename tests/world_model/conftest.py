"""Tiny world models and batches on 3x16x16 images (the shapes, not the sizes, matter here)."""

import torch
from tensordict import TensorDict

from aefrl.world_model import WorldModel

OBS = (3, 16, 16)
ACTIONS = 2


def tiny_world_model(kind: str, dtype=torch.float32, **kw) -> WorldModel:
    opts = dict(latent_dim=3, deter=8, hidden=16, layers=1, depth=4)
    opts.update(kw)
    return WorldModel(OBS, ACTIONS, kind, **opts).to(dtype)


def random_batch(b: int = 2, t: int = 6, first_at=(0,), dtype=torch.float32) -> TensorDict:
    is_first = torch.zeros(b, t, 1, dtype=torch.bool)
    for i in first_at:
        is_first[:, i] = True
    return TensorDict(
        {
            "pixels": torch.randint(0, 256, (b, t, *OBS), dtype=torch.uint8),
            "prev_action": (torch.rand(b, t, ACTIONS) * 2 - 1).to(dtype),
            "reward": torch.rand(b, t, 1).to(dtype),
            "is_first": is_first,
            "terminated": torch.zeros(b, t, 1, dtype=torch.bool),
        },
        [b, t],
    )
