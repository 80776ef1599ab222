"""One jit-compiled, pure training step: (state, batch, key) -> (state, metrics).

The step renders every view of the batch (leading view axis V, default 1 as the reference), computes
the losses of gaussians.md §5 (+ the 4D terms of x2gaussian.md §8 supplied by the model), takes one
gated optimiser step and accumulates the densification statistics. Densify/prune itself runs between
steps (it may change buffer capacities, which happens outside jit).

Iteration numbering follows the reference: the step performs iteration `it = state.step + 1` (1-based).
Gates (x2gaussian.md §9): Gaussian attributes are not updated on a densify iteration; no group steps on
the last iteration of a stage; the model decides when its own groups (field, period) start.
Guard: metrics["finite"] is False when a loss term or an updated parameter is not finite (Gaussian groups on active
slots, every other parameter key in full); metrics["nonfinite_<key>"] counts the bad entries of each key.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from x2gs_jax import losses
from x2gs_jax.densify import accumulate
from x2gs_jax.densify import is_densify_iteration as densify_iteration
from x2gs_jax.models.base import check_view_gaussians
from x2gs_jax.render import Grid, rasterize, voxelize
from x2gs_jax.train_state import GAUSSIAN_KEYS, TrainState, gaussians_from_params


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of a step function (hashable; a change re-traces)."""

    stage: str  # "coarse" (static Gaussians) or "fine" (deformed)
    stage_end: int  # last iteration of the stage (no optimiser step there, as the reference)
    backend: str
    max_pairs: Optional[int]  # rasterizer (Gaussian, tile) pair capacity per view
    lambda_dssim: float
    lambda_tv: float
    tv_n: int
    tv_size: tuple  # world units, = tv_n * dVoxel
    tv_culling: str
    tv_mean_grad: str
    bbox_min: tuple
    bbox_max: tuple
    densify_interval: int
    densify_from: int
    densify_until: int
    densify_enabled: bool = True
    scale_bound: Optional[tuple] = None  # (s_min, s_max) world units, or None for exp scales


def is_densify_iteration(it, s: StepSettings):
    """The reference rule of `densify.is_densify_iteration` with the step's settings (ints or traced ints)."""
    if not s.densify_enabled:
        return jnp.zeros((), bool) if isinstance(it, jax.Array) else False
    return densify_iteration(it, interval=s.densify_interval, start=s.densify_from, until=s.densify_until)


def _render_view(gaussians, camera, ndc_offset, settings: StepSettings):
    image, aux = rasterize(gaussians, camera, backend=settings.backend, ndc_offset=ndc_offset,
                           return_aux=True, max_pairs=settings.max_pairs)
    return image, aux


def make_loss_fn(model, settings: StepSettings):
    """loss(params, ndc_offsets, active, model_state, batch, key, it) -> (total, aux); `model` implements
    x2gs_jax.models.DeformationModel."""

    def loss_fn(params, ndc_offsets, active, model_state, batch, key, it):
        canonical = gaussians_from_params(params, active, settings.scale_bound)
        key_deform, key_tv, key_extra = jax.random.split(key, 3)

        # The Gaussians at each view's time, deformed once: the renders, the TV patch and the model's extra
        # losses (through `cache`, e.g. X2's periodic render, PhysX's anchor displacements) share them.
        deformed, cache = model.view_gaussians(params, model_state, canonical, batch["time"], key_deform, it,
                                               settings)
        check_view_gaussians(deformed, batch["time"].shape[0], canonical.capacity)  # the contract's shapes

        def one_view(g, camera, image_gt, ndc_offset):
            image, aux = _render_view(g, camera, ndc_offset, settings)
            total, terms = losses.render_loss(image, image_gt, settings.lambda_dssim)
            return total, terms, image, aux

        totals, terms, images, aux = jax.vmap(one_view)(deformed, batch["camera"], batch["image"], ndc_offsets)
        total = jnp.mean(totals)
        metrics = {f"loss_{k}": jnp.mean(v) for k, v in terms.items()}

        if settings.lambda_tv > 0:
            # 3D TV on a random 32^3 patch at the first view's time (gaussians.md §5, x2gaussian.md §8).
            size = jnp.asarray(settings.tv_size, jnp.float32)
            center = losses.tv_patch_center(key_tv, jnp.asarray(settings.bbox_min), jnp.asarray(settings.bbox_max), size)
            grid = Grid(n=(settings.tv_n,) * 3, size=size, center=center)
            g_tv = model.regulariser_gaussians(jax.tree.map(lambda x: x[0], deformed))
            vol = voxelize(g_tv, grid, culling=settings.tv_culling, mean_grad=settings.tv_mean_grad,
                           backend=settings.backend)
            tv = losses.tv_3d(vol)
            total = total + settings.lambda_tv * tv
            metrics["loss_tv"] = tv

        extra, extra_terms = model.extra_losses(params, model_state, active, batch, key_extra, it, settings,
                                                lambda g, cam: _render_view(g, cam, None, settings)[0], cache)
        total = total + extra
        metrics.update(extra_terms)
        metrics["loss"] = total
        return total, (metrics, images, aux)

    return loss_fn


def make_train_step(model, settings: StepSettings, optimizer: optax.GradientTransformationExtraArgs) -> Callable:
    """Build the pure step (state, batch, key) -> (state, metrics); jit it with donate_argnums=0.

    batch: {"image": [V,H,W] scene-scaled projections, "camera": Camera batched over V, "time": [V]}.
    If the rasterizer reports a pair-capacity overflow the state is returned unchanged with
    metrics["overflow"] = True, so the caller can grow the capacity and redo the iteration.
    """
    loss_fn = make_loss_fn(model, settings)

    def step(state: TrainState, batch: Mapping[str, Any], key: jax.Array):
        it = state.step + 1
        V = batch["image"].shape[0]
        ndc_offsets = jnp.zeros((V, state.capacity, 2), jnp.float32)
        (loss, (metrics, images, aux)), (grads, ndc_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(state.params, ndc_offsets, state.active, state.model_state, batch,
                                                   key, it)

        densify_now = is_densify_iteration(it, settings)
        not_last = it != settings.stage_end
        gates = {k: (~densify_now) & not_last for k in GAUSSIAN_KEYS}
        for name, gate in model.gates(it, settings).items():
            gates[name] = gate & not_last
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, step=it, gates=gates)
        params = optax.apply_updates(state.params, updates)

        stats = state.stats
        for v in range(V):  # each rendered view counts as one visit (reference: one view per iteration)
            stats = accumulate(stats, ndc_grads[v], aux.radii[v])

        overflow = jnp.any(aux.overflow)
        new_state = state.replace(step=it, params=params, opt_state=opt_state, stats=stats)
        new_state = jax.tree.map(lambda new, old: jnp.where(overflow, old, new), new_state, state)
        metrics = dict(metrics)
        metrics["overflow"] = overflow
        metrics["num_gaussians"] = jnp.sum(state.active.astype(jnp.int32))
        # The guard: loss terms and the updated parameters. The renderer drops a Gaussian with a NaN attribute, so
        # the loss alone can stay finite while the parameters (and the export) are lost.
        bad = nonfinite_counts(params, state.active)
        metrics.update({NONFINITE_PREFIX + k: n for k, n in bad.items()})
        metrics["finite"] = jnp.all(jnp.stack([jnp.isfinite(v) for k, v in metrics.items() if k.startswith("loss")]
                                              + [n == 0 for n in bad.values()]))
        return new_state, metrics

    return step


NONFINITE_PREFIX = "nonfinite_"  # metrics["nonfinite_<key>"]: non-finite entries of params[<key>] after the step


def nonfinite_counts(params: Mapping[str, Any], active) -> dict:
    """{top-level parameter key: number of non-finite entries} (int32 scalars, traceable).

    The Gaussian groups count active slots only (free slots may hold stale values that are never rendered); every
    other key (X2's field and period, PhysX's anchor_net, whatever a model adds) counts all its float leaves."""
    out = {}
    for k, v in params.items():
        if k in GAUSSIAN_KEYS:
            bad = ~jnp.isfinite(v).reshape(v.shape[0], -1) & active[:, None]
            out[k] = jnp.sum(bad, dtype=jnp.int32)
        else:
            leaves = [x for x in jax.tree.leaves(v) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
            out[k] = sum((jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves), jnp.zeros((), jnp.int32))
    return out


def make_multi_step(step: Callable) -> Callable:
    """K iterations in one call, (state, batches, keys, n_valid) -> (state, metrics), by `lax.scan` over `step`.

    batches: the batch pytree with a leading axis K; keys: [K, 2]; n_valid: int32 scalar, only the first
    n_valid iterations are applied (the rest are padding, so that calls of different lengths share one
    compiled function). Every metric gains a leading axis K, plus metrics["done"][k] (iteration k was
    applied). After the first pair-buffer overflow every later iteration of the call is a no-op, so the
    returned state stops at the last completed iteration and the caller can grow the buffer and continue
    from there: the result is the same as one call per iteration.
    """

    def multi(state, batches, keys, n_valid):
        def body(carry, xs):
            st, blocked = carry
            batch, key, k = xs
            new, m = step(st, batch, key)
            ok = ~blocked & ~m["overflow"] & (k < n_valid)
            st = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, st)
            m = dict(m)
            m["done"] = ok
            return (st, blocked | ~ok), m

        n = keys.shape[0]
        (state, _), metrics = jax.lax.scan(body, (state, jnp.zeros((), bool)),
                                           (batches, keys, jnp.arange(n, dtype=jnp.int32)))
        return state, metrics

    return multi


def padded_length(n: int, max_len: int) -> int:
    """Scan length for a call of n iterations: the next power of two, capped at max_len (few compilations)."""
    return max(1, min(int(max_len), 1 << (int(n) - 1).bit_length()))
