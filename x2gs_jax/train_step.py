"""One jit-compiled, pure training step: (state, batch, key) -> (state, metrics).

The step renders every view of the batch, computes the losses of gaussians.md §5 (+ the 4D terms of x2gaussian.md
§8 supplied by the model), takes one gated optimiser step and accumulates the densification statistics.
Densify/prune itself runs between steps (it may change buffer capacities, which happens outside jit).

A batch of B views (config.train.views_per_step; 1 in the reference) has the mean of its views' losses as its loss;
a view's loss is the single-view loss of `make_loss_fn` (its render, the 3D TV patch at its time, the model's
terms) with the view's own key, so B = 1 is the single-view step and the result does not depend on how the views
are split over devices. Data parallel (`x2gs_jax.parallel`): with `axis_name`, the step runs per device inside
`shard_map` on V = B / N of the views and reduces explicitly over the axis: parameter gradients summed (then / B),
loss metrics summed (then / B), densification statistics summed (count, gradient norms) or maxed (radii), the
pair-buffer overflow maxed. Everything else is computed from replicated values, so every device ends the step
with the same state.

Iteration numbering follows the reference: the step performs iteration `it = state.step + 1` (1-based).
Gates (x2gaussian.md §9): Gaussian attributes are not updated on a densify iteration; no group steps on
the last iteration of a stage; the model decides when its own groups (field, period) start.
Guard: metrics["finite"] is False when a loss term or an updated parameter is not finite (Gaussian groups on active
slots, every other parameter key in full); metrics["nonfinite_<key>"] counts the bad entries of each key.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from x2gs_jax import losses
from x2gs_jax.densify import add_increments, render_increments
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
    phase: Optional[int] = None  # the model's static phase (`DeformationModel.phase`, train.static_phases) or None


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
    """loss(params, ndc_offsets, active, model_state, batch, key, it) -> (total, (metrics, images, aux)); `model`
    implements x2gs_jax.models.DeformationModel. The step calls it with one view (V = 1: the single-view loss of
    the module docstring); with V views it renders them all but takes the TV patch at the first view's time."""

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
            # 3D TV on a random 32^3 patch at the (first) view's time (gaussians.md §5, x2gaussian.md §8).
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


def view_keys(key: jax.Array, first: jax.Array, n: int, batch: int) -> jax.Array:
    """Keys [n, 2] of the views first .. first + n - 1 (0-based indices in the global batch of `batch` views).

    A batch of one view uses the iteration's key itself (the single-view step); otherwise view j gets
    fold_in(key, j). The global index, not the device, decides the key: any split of the batch over devices
    draws the same numbers."""
    if batch == 1:
        return key[None]
    return jax.vmap(lambda j: jax.random.fold_in(key, j))(first + jnp.arange(n, dtype=jnp.int32))


def make_batch_loss(model, settings: StepSettings) -> Callable:
    """loss(params, ndc_offsets, active, model_state, batch, keys, it) -> (sum of the V views' losses,
    (metrics {name: [V]}, RenderAux with a leading [V])).

    batch: V views ({"image": [V,H,W], "camera": Camera[V], "time": [V]}); keys: [V, 2] (`view_keys`);
    ndc_offsets: [1, C, 2] when V = 1 (the single-view loss, called as is) else [V, 1, C, 2] (one vmap over the
    views of the single-view loss)."""
    view_loss = make_loss_fn(model, settings)

    def batch_loss(params, ndc_offsets, active, model_state, batch, keys, it):
        if keys.shape[0] == 1:
            total, (metrics, _, aux) = view_loss(params, ndc_offsets, active, model_state, batch, keys[0], it)
            return total, (jax.tree.map(lambda x: x[None], metrics), aux)
        one_view = jax.tree.map(lambda x: x[:, None], batch)  # [V, 1, ...]: V single-view batches
        totals, (metrics, _, aux) = jax.vmap(view_loss, in_axes=(None, 0, None, None, 0, 0, None))(
            params, ndc_offsets, active, model_state, one_view, keys, it)
        return jnp.sum(totals), (metrics, jax.tree.map(lambda x: x[:, 0], aux))

    return batch_loss


def make_train_step(model, settings: StepSettings, optimizer: optax.GradientTransformationExtraArgs,
                    axis_name: Optional[str] = None) -> Callable:
    """Build the pure step (state, batch, key) -> (state, metrics); jit it with donate_argnums=0.

    batch: {"image": [V,H,W] scene-scaled projections, "camera": Camera batched over V, "time": [V]}: the whole
    batch (B = V), or with `axis_name` this device's V consecutive views of the global batch B = V x the axis size
    (the step then runs inside `shard_map` over that mesh axis; see the module docstring). key: the iteration's
    key (the same on every device). Metrics are the global batch's (loss terms: means over its views).
    If the rasterizer reports a pair-capacity overflow (on any device) the state is returned unchanged with
    metrics["overflow"] = True, so the caller can grow the capacity and redo the iteration. The step takes an
    optional 4th argument `apply` (bool scalar, traced): False returns the state unchanged as well (the scanned
    multi-step's padding and the iterations after an overflow).
    """
    batch_loss = make_batch_loss(model, settings)

    def spread() -> bool:  # a mesh axis of more than one device (one device: no collectives, the plain program)
        return axis_name is not None and jax.lax.axis_size(axis_name) > 1

    def allsum(x):
        return jax.lax.psum(x, axis_name) if spread() else x

    def allmax(x):
        return jax.lax.pmax(x, axis_name) if spread() else x

    def step(state: TrainState, batch: Mapping[str, Any], key: jax.Array, apply=None):
        it = state.step + 1
        V = batch["image"].shape[0]
        n_dev = jax.lax.axis_size(axis_name) if spread() else 1
        B = V * n_dev  # static
        first = jax.lax.axis_index(axis_name) * V if spread() else jnp.zeros((), jnp.int32)
        keys = view_keys(key, first, V, B)
        ndc_shape = (1, state.capacity, 2) if V == 1 else (V, 1, state.capacity, 2)
        (_, (view_metrics, aux)), (grads, ndc_grads) = jax.value_and_grad(
            batch_loss, argnums=(0, 1), has_aux=True)(state.params, jnp.zeros(ndc_shape, jnp.float32), state.active,
                                                      state.model_state, batch, keys, it)
        # The barrier orders everything that reads the old parameters (the loss terms reported as metrics have no
        # path to the gradients) before the update that overwrites them in place (see the optimiser's gate below;
        # part of the change measured in BENCHMARKS.md, Training, item 4).
        grads, ndc_grads, view_metrics, aux = jax.lax.optimization_barrier((grads, ndc_grads, view_metrics, aux))
        # d(sum of the batch's view losses): summed over the devices, / B = the gradient of the batch's mean loss.
        grads = allsum(grads)
        if B > 1:
            grads = jax.tree.map(lambda g: g / B, grads)
        metrics = {k: _reduce_metric(v, B, allsum) for k, v in view_metrics.items()}

        densify_now = is_densify_iteration(it, settings)
        not_last = it != settings.stage_end
        gates = {k: (~densify_now) & not_last for k in GAUSSIAN_KEYS}
        for name, gate in model.gates(it, settings).items():
            gates[name] = gate & not_last
        # Whether the iteration counts: no pair-buffer overflow on any device (and the caller's `apply`). It goes
        # into the optimiser as one more gate (a closed gate leaves parameters and Adam state exactly as they
        # were) instead of a select between the old and the new state, which would keep every old buffer alive
        # to the end of the step and stop XLA from updating in place (BENCHMARKS.md, Training, item 4: on the CPU
        # backend the per-iteration copies of the field state went; on the GPU most remain, still to be found).
        overflow = allmax(jnp.any(aux.overflow).astype(jnp.int32)) > 0
        take = ~overflow if apply is None else apply & ~overflow
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, step=it, gates=gates, apply=take)
        params = optax.apply_updates(state.params, updates)

        # Each rendered view counts as one visit with its own loss's NDC gradient (reference: one view per
        # iteration), whatever the batch size; the views' sums (maxima for radii) are reduced over the devices.
        inc = render_increments(ndc_grads.reshape(V, state.capacity, 2), aux.radii)
        inc = inc.replace(grad_accum=allsum(inc.grad_accum), count=allsum(inc.count),
                          max_radii=allmax(inc.max_radii))
        stats = jax.tree.map(lambda new, old: jnp.where(take, new, old), add_increments(state.stats, inc), state.stats)
        new_state = state.replace(step=jnp.where(take, it, state.step), params=params, opt_state=opt_state,
                                  stats=stats)
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


def _reduce_metric(v: jax.Array, batch: int, allsum: Callable) -> jax.Array:
    """A per-view metric [V] over the global batch: floats -> mean, booleans -> all, integers -> sum."""
    if jnp.issubdtype(v.dtype, jnp.bool_):
        return allsum(jnp.sum(~v, dtype=jnp.int32)) == 0
    if jnp.issubdtype(v.dtype, jnp.integer):
        return allsum(jnp.sum(v))
    total = allsum(jnp.sum(v))
    return total / batch if batch > 1 else total


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
            apply = ~blocked & (k < n_valid)
            st, m = step(st, batch, key, apply)  # the state moves only when apply and no overflow
            ok = apply & ~m["overflow"]
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


def call_length(n: int, remaining: int, max_len: int, compiled: Sequence[int] = (), pad_short: bool = True) -> int:
    """Scan length for a call of n iterations with `remaining` (>= n) iterations left in its stage.

    pad_short=False: `padded_length(n, max_len)`. pad_short=True (GPU-sized configs): the shortest of the lengths
    already `compiled` for the same stage, capacity and pair buffer that holds n; else max_len when a full-length
    call of the stage follows this one (remaining - n >= max_len), so that a short call inside a stage (the
    evaluation after iteration 1, the redo after a pair-buffer overflow) runs that function padded with masked
    iterations instead of compiling a length of its own; else `padded_length(n, max_len)`. On the H200 each extra
    compilation of the default run cost 5.4-8.0 s (trace + XLA) and a masked iteration costs one iteration (~1 ms
    in the static stage); on a CPU a masked iteration of the `:tiny` fine stage costs ~0.7 s, hence the switch.
    """
    if not 1 <= int(n) <= int(remaining):
        raise ValueError(f"call_length: need 1 <= n <= remaining, got n={n}, remaining={remaining}")
    if pad_short:
        fits = [int(length) for length in compiled if int(length) >= int(n)]
        if fits:
            return min(fits)
        if int(remaining) - int(n) >= int(max_len):
            return max(1, int(max_len))
    return padded_length(n, max_len)
