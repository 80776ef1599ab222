"""The X2-Gaussian 4D model (x2gaussian.md), registered as `x2`.

Coarse stage: the canonical Gaussians as they are (identical to the static model). Fine stage: every
render at time t goes through the deformation `deform(params["field"], canonical, t, key)`; the model
adds the HexPlane regularisers and, after `periodic_start`, the periodic-consistency render at
t + k T (T = exp(tau)) against the measured projection at t.

Parameters added to `TrainState.params`: "field" = {"grid", "deformation"} and "period" (tau). Their
optimiser groups ("grid", "deformation", "period") are gated so that each starts counting Adam steps
only when it first receives gradient (x2gaussian.md §9): the field at the first fine iteration, the
period at the first periodic iteration.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from x2gs_jax import losses
from x2gs_jax.fields import (DeformationConfig, deform, init_deformation_params, init_tau, period_seconds,
                             shifted_time, spatial_planes, time_planes)
from x2gs_jax.models.base import (DeformationModel, canonical_at_views, check_eval_phases, four_d_eval_times,
                                  register)
from x2gs_jax.train_state import gaussians_from_params


@dataclasses.dataclass(frozen=True)
class X2Settings:
    """4D-specific settings (defaults = the reference's hard-coded constants, now config values)."""

    field: DeformationConfig = DeformationConfig()
    period_init_s: float = 2.8
    scan_s: float = 60.0  # the pickle's `time` is seconds / scan_s
    shift_cycles: int = 1  # k = +-shift_cycles periods
    periodic_start: int = 7000  # periodic loss for iterations > this (fine stage only)
    lambda_prior: float = 1.0
    lambda_dssim: float = 0.25
    plane_tv_weight: float = 1e-4
    time_smoothness_weight: float = 1e-3
    l1_time_planes_weight: float = 1e-4
    eval_cycle_s: float = 3.0  # the evaluator's breathing cycle (phase k queried at (k + 1/2) cycle/P)
    eval_phases: int = 10


class X2Model(DeformationModel):
    """X2-Gaussian: HexPlane deformation + learnable breathing period (see module docstring)."""

    kind = "x2"
    is_4d = True
    has_period = True

    def __init__(self, settings: X2Settings):
        self.s = settings

    # -- parameters
    def init_params(self, key, case) -> dict:
        return {"field": init_deformation_params(key, self.s.field), "period": init_tau(self.s.period_init_s)}

    def param_labels(self, params) -> dict:
        """The field's top-level keys are its groups ("grid", "deformation"); tau is "period"."""
        return {"field": {name: jax.tree.map(lambda _, n=name: n, sub) for name, sub in params["field"].items()},
                "period": "period"}

    # -- geometry at time t
    def gaussians_at(self, params, model_state, canonical, t, key, stage):
        if stage != "fine":
            return canonical
        return deform(params["field"], canonical, t, key, self.s.field)[0]

    def _shift(self, params, times):
        """The periodic-consistency shift t -> t + kT of each view's time ([V])."""
        return shifted_time(times, params["period"], self.s.scan_s, self.s.shift_cycles)

    def phase(self, it: int, stage: str):
        """Fine stage: 0 before the periodic-consistency render starts, 1 from `periodic_start + 1`."""
        return int(it > self.s.periodic_start) if stage == "fine" else None

    # -- the Gaussians of a batch of training views
    def view_gaussians(self, params, model_state, canonical, times, key, it, settings):
        """(deformed Gaussians [V] at the views' times, cache for `extra_losses`).

        After `periodic_start` the field is evaluated at [t, t + kT] for each view in one vmap over the two
        times: the spatial-plane samples do not depend on time, so vmap computes them once and the backward
        scatters their gradient once (the spatial planes' scatter-adds dominate the fine step)."""
        if settings.stage != "fine":
            return canonical_at_views(canonical, times), None
        field = params["field"]
        shift = self._shift(params, times)
        on = it > self.s.periodic_start

        def at_times(ts):  # ts [K] -> Gaussians [K]
            return jax.vmap(lambda t: deform(field, canonical, t, key, self.s.field)[0])(ts)

        def with_shift(_):
            return jax.vmap(lambda t, ts: at_times(jnp.stack([t, ts])))(times, shift.t_shifted)

        def without_shift(_):
            g = jax.vmap(lambda t: at_times(t[None]))(times)
            return jax.tree.map(lambda x: jnp.concatenate([x, x], axis=1), g)

        both = _periodic_branch(settings, on, with_shift, without_shift)  # leaves [V, 2, ...]
        pick = lambda k: jax.tree.map(lambda x: x[:, k], both)  # noqa: E731
        return pick(0), {"shifted": pick(1), "shift_valid": shift.valid, "periodic_on": on}

    # -- losses beyond render + TV
    def extra_losses(self, params, model_state, active, batch, key, it, settings, render_fn: Callable, cache=None):
        if settings.stage != "fine":
            return jnp.zeros(()), {"period_s": period_seconds(params["period"])}
        grid = params["field"]["grid"]
        reg, terms = losses.hexplane_regularisers(
            spatial_planes(grid), time_planes(grid), plane_tv_weight=self.s.plane_tv_weight,
            time_smoothness_weight=self.s.time_smoothness_weight, l1_time_planes_weight=self.s.l1_time_planes_weight)
        metrics = {f"loss_{k}": v for k, v in terms.items()}
        if cache is None:  # called without view_gaussians: deform at the shifted times here
            canonical = gaussians_from_params(params, active, settings.scale_bound)
            shift = self._shift(params, batch["time"])
            shifted = jax.vmap(lambda ts: deform(params["field"], canonical, ts, key, self.s.field)[0])(shift.t_shifted)
            cache = {"shifted": shifted, "shift_valid": shift.valid, "periodic_on": it > self.s.periodic_start}

        def periodic_loss(_):
            def one(g, camera, image_gt):
                total, parts = losses.render_loss(render_fn(g, camera), image_gt, self.s.lambda_dssim)
                return total, parts["l1"], parts["dssim"]
            total, l1, ds = jax.vmap(one)(cache["shifted"], batch["camera"], batch["image"])
            return jnp.mean(total), jnp.mean(l1), jnp.mean(ds), jnp.all(cache["shift_valid"])

        def no_periodic(_):
            z = jnp.zeros(())
            return z, z, z, jnp.ones((), bool)

        prior, prior_l1, prior_dssim, valid = _periodic_branch(settings, cache["periodic_on"], periodic_loss,
                                                               no_periodic)
        metrics.update(loss_render_prior=prior_l1, loss_dssim_prior=prior_dssim,
                       period_s=period_seconds(params["period"]), period_shift_valid=valid)
        return reg + self.s.lambda_prior * prior, metrics

    # -- optimiser gates of the model's own groups
    def gates(self, it, settings) -> dict:
        fine = settings.stage == "fine"
        return {"grid": jnp.asarray(fine), "deformation": jnp.asarray(fine),
                "period": jnp.asarray(fine) & (it > self.s.periodic_start)}

    # -- evaluation convention
    def eval_times(self, case) -> np.ndarray:
        return four_d_eval_times(case, self.s.eval_cycle_s, self.s.scan_s)


def _periodic_branch(settings, on, periodic_fn, plain_fn):
    """`lax.cond(on, periodic_fn, plain_fn, None)`; with train.static_phases the step runs one phase
    (`StepSettings.phase`, `X2Model.phase`: 1 = periodic render on) and takes that branch in Python instead, so no
    cond is differentiated."""
    phase = getattr(settings, "phase", None)
    if phase is None:
        return jax.lax.cond(on, periodic_fn, plain_fn, None)
    return (periodic_fn if phase else plain_fn)(None)


@register("x2")
def make_x2(config, case) -> X2Model:
    m = config.model
    field = DeformationConfig.from_config(m.field.to_dict() if hasattr(m.field, "to_dict") else m.field)
    s = X2Settings(field=field, period_init_s=m.period_init_s, scan_s=config.data.scan_s,
                   shift_cycles=m.shift_cycles, periodic_start=config.loss.periodic_start,
                   lambda_prior=config.loss.lambda_prior, lambda_dssim=config.loss.lambda_dssim,
                   plane_tv_weight=config.loss.plane_tv_weight, time_smoothness_weight=config.loss.time_smoothness_weight,
                   l1_time_planes_weight=config.loss.l1_time_planes_weight, eval_cycle_s=config.eval.cycle_s,
                   eval_phases=config.eval.n_phases)
    check_eval_phases(config, case)
    return X2Model(s)
