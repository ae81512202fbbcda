"""Observation models: ``vae``, ``aef`` (expansion family, the default) and ``aef_partition``.

``make_obs_model(kind, obs_shape, latent_dim, context_dim=0, **options)`` builds one; see
:class:`~aefrl.obs_models.base.ObservationModel` for the shared interface and options.
"""

from __future__ import annotations

import inspect

from aefrl.obs_models.aef import (
    AEFObservationModel,
    AEFPartitionObservationModel,
    spiral_core_indices,
)
from aefrl.obs_models.base import ObservationModel
from aefrl.obs_models.vae import VAEObservationModel, posterior_kl

OBS_MODELS: dict[str, type[ObservationModel]] = {
    "vae": VAEObservationModel,
    "aef": AEFObservationModel,
    "aef_partition": AEFPartitionObservationModel,
}


def accepted_options(kind: str) -> list[str]:
    """Keyword options accepted by ``make_obs_model(kind, ...)``."""
    names: set[str] = set()
    for klass in (OBS_MODELS[kind], ObservationModel):
        sig = inspect.signature(klass.__init__)
        names |= {p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
    return sorted(names)


def make_obs_model(
    kind: str, obs_shape, latent_dim: int, context_dim: int = 0, **options
) -> ObservationModel:
    """Build an observation model.

    Args:
        kind: ``"vae"``, ``"aef"`` or ``"aef_partition"``.
        obs_shape: ``(C, H, W)`` for images (conv trunks) or ``(D,)`` for vectors (MLP trunks).
        latent_dim: d, the size of z.
        context_dim: size of the context (the RSSM state h); 0 for none.
        **options: see :class:`~aefrl.obs_models.base.ObservationModel` and the model classes.

    Raises:
        ValueError: unknown kind, bad shape or an unknown / invalid option, naming the
            accepted values.
    """
    if kind not in OBS_MODELS:
        raise ValueError(
            f"unknown observation model {kind!r}; accepted: {', '.join(sorted(OBS_MODELS))}"
        )
    unknown = sorted(set(options) - set(accepted_options(kind)))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for obs model {kind!r}; "
            f"accepted: {', '.join(accepted_options(kind))}"
        )
    return OBS_MODELS[kind](obs_shape, latent_dim, context_dim, **options)


__all__ = [
    "OBS_MODELS",
    "AEFObservationModel",
    "AEFPartitionObservationModel",
    "ObservationModel",
    "VAEObservationModel",
    "accepted_options",
    "make_obs_model",
    "posterior_kl",
    "spiral_core_indices",
]
