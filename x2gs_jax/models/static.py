"""The static model (R2-Gaussian, and the coarse stage of every 4D model): canonical Gaussians as they are."""
from __future__ import annotations

import jax.numpy as jnp

from x2gs_jax.models.base import DeformationModel, canonical_at_views, register


class StaticModel(DeformationModel):
    """No extra parameters, no state, no extra losses; the Gaussians do not depend on time."""

    kind = "static"
    is_4d = False

    def init_params(self, key, case) -> dict:
        return {}

    def param_labels(self, params) -> dict:
        return {}

    def gaussians_at(self, params, model_state, canonical, t, key, stage):
        return canonical

    def view_gaussians(self, params, model_state, canonical, times, key, it, settings):
        return canonical_at_views(canonical, times), None

    def extra_losses(self, params, model_state, active, batch, key, it, settings, render_fn, cache=None):
        return jnp.zeros(()), {}

    def gates(self, it, settings) -> dict:
        return {}


@register("static")
def make_static(config, case) -> StaticModel:
    return StaticModel()
