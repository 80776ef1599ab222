"""Deformation models: one explicit contract (`DeformationModel`), a registry keyed by config.model.kind."""
from x2gs_jax.models.base import ConfigError, DeformationModel, make_model, model_kinds, register

__all__ = ["ConfigError", "DeformationModel", "make_model", "model_kinds", "register"]
