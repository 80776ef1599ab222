"""The deformation-model contract and its registry.

Every model (`static`, `x2`, `physx`, ...) is a registered implementation of `DeformationModel`; the trainer,
densification, checkpoints, export and evaluation only talk to this contract. `make_model(config, case)` looks
`config.model.kind` up in the registry and fails loudly on an unknown kind.

What a model owns, all of it inside the one `TrainState` pytree:
  * trained parameters: extra top-level keys of `TrainState.params` beside the Gaussians (`init_params`), each
    leaf labelled with an optimiser group (`param_labels`; the groups' learning rates are config.optim.lr.<group>);
  * non-trained state (`TrainState.model_state`, a flat dict of arrays): e.g. PhysX's anchors and the KNN binding
    of every Gaussian slot. Built by `init_model_state`, rebuilt by `rebind` after every densify/prune/grow
    (outside jit, between steps), so that it always matches the Gaussian buffers;
  * the Gaussians rendered at a time (`gaussians_at`: evaluation/inference, deterministic) and those of a batch
    of training views (`view_gaussians`, with a cache passed on to `extra_losses`);
  * the losses beyond render + 3D TV (`extra_losses`) and when its optimiser groups start stepping (`gates`).

Shapes: C = Gaussian capacity, V = views per step. Times are normalised (seconds / scan length).
"""
from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Mapping, Optional

import chex
import jax
import numpy as np

from x2gs_jax.evaluation import phase_mid_times
from x2gs_jax.gaussians import Gaussians


class ConfigError(ValueError):
    """A config value that cannot work (the message names the key, the value and what is allowed)."""


class DeformationModel(abc.ABC):
    """The explicit contract of a deformation model (see the module docstring)."""

    kind: ClassVar[str]
    is_4d: ClassVar[bool]  # renders depend on time (needs a 4D case)
    has_period: ClassVar[bool] = False  # params["period"] holds tau (T = exp(tau) s)

    # -- parameters and state
    @abc.abstractmethod
    def init_params(self, key: jax.Array, case) -> dict:
        """The model's trained parameters: {top-level key: pytree} merged into TrainState.params."""

    @abc.abstractmethod
    def param_labels(self, params: Mapping[str, Any]) -> dict:
        """Optimiser group name of every leaf of the model's own keys of `params` (a label pytree per key)."""

    def init_model_state(self, key: jax.Array, gaussians: Gaussians) -> dict:
        """Non-trained per-model state (flat dict of arrays) for the initial Gaussians."""
        return {}

    def rebind(self, model_state: dict, gaussians: Gaussians) -> dict:
        """The state after densify/prune/grow changed the Gaussian buffers (capacity C may have changed)."""
        return model_state

    def phase(self, it: int, stage: str) -> Optional[int]:
        """The static phase of `stage` at iteration `it` (Python int), for `train.static_phases`: the loop then
        compiles one step function per phase, passes it as `StepSettings.phase` and ends a call where the phase
        changes, so the hooks can branch in Python instead of differentiating a `lax.cond` (whose taken branch
        writes zeros for the other branch's residuals). None: the model has no phases (the default)."""
        return None

    def group_specs(self) -> dict:
        """{optimiser group: optim.GroupSpec} whose learning rate the model's own settings decide (they replace
        config.optim.lr.<group>; config.optim.controls still apply on top)."""
        return {}

    # -- geometry
    @abc.abstractmethod
    def gaussians_at(self, params, model_state, canonical: Gaussians, t, key, stage: str) -> Gaussians:
        """The Gaussians at normalised time t for evaluation and inference (no masking, no training noise)."""

    @abc.abstractmethod
    def view_gaussians(self, params, model_state, canonical: Gaussians, times, key, it, settings):
        """(Gaussians with a leading view axis [V], cache for `extra_losses`) of a batch's training views."""

    def regulariser_gaussians(self, g: Gaussians) -> Gaussians:
        """The Gaussians the 3D TV patch sees (one view's deformed Gaussians; PhysX-Boosted stops the gradient of
        the geometry there)."""
        return g

    # -- losses and optimiser gates
    @abc.abstractmethod
    def extra_losses(self, params, model_state, active, batch, key, it, settings, render_fn: Callable,
                     cache=None) -> tuple[jax.Array, dict]:
        """(weighted sum of the model's own loss terms, metrics) for the step at 1-based iteration `it`."""

    @abc.abstractmethod
    def gates(self, it, settings) -> dict:
        """{optimiser group: bool scalar}: whether the model's groups step at iteration `it`."""

    # -- evaluation convention
    def eval_times(self, case) -> np.ndarray:
        """Normalised times of the phase volumes the evaluation compares with the GT."""
        return np.zeros(1)


def check_view_gaussians(g: Gaussians, n_views: int, capacity: int) -> None:
    """Shape check at the contract's boundary (static shapes, runs at trace time)."""
    chex.assert_shape(g.xyz, (n_views, capacity, 3))
    chex.assert_shape(g.scaling, (n_views, capacity, 3))
    chex.assert_shape(g.rotation, (n_views, capacity, 4))


def canonical_at_views(canonical: Gaussians, times) -> Gaussians:
    """The canonical Gaussians repeated for each view ([V] leading axis)."""
    return jax.vmap(lambda t: canonical)(times)


def four_d_eval_times(case, cycle_s: float, scan_s: float) -> np.ndarray:
    return phase_mid_times(case.volumes.shape[0], cycle_s, scan_s)


def check_eval_phases(config, case) -> None:
    """A 4D case must have config.eval.n_phases phase volumes (the evaluator queries one time per phase)."""
    n = int(config.eval.n_phases)
    if case is not None and case.is_4d and case.volumes.shape[0] != n:
        raise ConfigError(f"config.eval.n_phases={n} but the case has {case.volumes.shape[0]} phase volumes")


# ------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, Callable[[Any, Any], DeformationModel]] = {}


def register(kind: str):
    """Class decorator / factory registration: `make(config, case) -> DeformationModel` under `kind`."""

    def deco(factory):
        if kind in _REGISTRY:
            raise ValueError(f"model kind {kind!r} registered twice")
        _REGISTRY[kind] = factory
        return factory

    return deco


def model_kinds() -> tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_REGISTRY))


def make_model(config, case) -> DeformationModel:
    """The registered model of `config.model.kind` for this case (ConfigError on an unknown kind)."""
    _load_builtin()
    kind = str(config.model.kind)
    if kind not in _REGISTRY:
        raise ConfigError(f"config.model.kind={kind!r} is not a registered model; known kinds: {model_kinds()}")
    return _REGISTRY[kind](config, case)


def _load_builtin() -> None:
    # The built-in models register themselves on import.
    from x2gs_jax.models import boosted, physx, static, x2  # noqa: F401

