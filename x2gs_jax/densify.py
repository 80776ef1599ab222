"""Adaptive density control (clone / split / prune) on fixed-capacity Gaussian buffers.

Reproduces the reference `GaussianModel.densify_and_prune` (gaussians.md §6, x2gaussian.md §10) with
static shapes, so it runs under `jax.jit`:

  * Gaussians live in `capacity` slots with an `active` mask. Appended Gaussians (clone copies and the
    second child of a split) go to free (inactive) slots, lowest index first; the first split child
    overwrites its parent's slot. Pruning deactivates slots and resets them to empty values.
  * Nothing is ever dropped for lack of room: `required_capacity` (cheap, jit-able) tells the caller the
    slot count the next call needs; the caller enlarges every per-Gaussian buffer with
    `gaussians.grow` (outside jit) first. If `densify_and_prune` is called without enough free slots
    it changes nothing at all and sets info["overflow"], so the caller can grow and retry with the
    same inputs and key.
  * Per-Gaussian optimiser state (e.g. Adam mu/nu of the Gaussian parameters) is passed in
    `per_gaussian`: rows of new Gaussians (clone copies and *both* split children, including the one
    reusing the parent's slot) and of pruned/free slots are zeroed; surviving rows (including clone
    sources, whose density was halved in place) keep their moments, as in the reference.

Reference timing (the training step's business, documented here): at a densify iteration the
reference replaces the Gaussian tensors after the backward pass, so that iteration applies **no** Adam
update to the Gaussian parameters and their Adam step count does not advance (network / period groups
still step). With the gated optimiser (x2gs_jax/optim.py) close the Gaussian groups' gates on
iterations where `is_densify_iteration(it)` is true. The reference runs densify-and-prune at
iterations from < it < until with it % interval == 0 (600, 700, ..., 14,900), in both X2 stages.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from x2gs_jax.gaussians import (Gaussians, inverse_scale_activation_jax, inverse_softplus_jax,
                                quaternion_to_rotation, scale_activation, softplus)

# Split: 2 children with scale s / (0.8 * 2) (gaussians.md §6).
SPLIT_CHILDREN = 2
SPLIT_SCALE_DIVISOR = 0.8 * SPLIT_CHILDREN


@struct.dataclass
class DensifyStats:
    """Per-slot densification statistics (gaussians.md §4 step 4).

    grad_accum: [C] float32, sum of ||d L / d ndc_xy||_2 over renders where the Gaussian was visible.
    count: [C] int32, number of those renders.
    max_radii: [C] float32, largest screen radius seen (pixels).
    """

    grad_accum: jax.Array
    count: jax.Array
    max_radii: jax.Array

    @classmethod
    def zeros(cls, capacity: int) -> "DensifyStats":
        z = lambda dtype: jax.device_put(np.zeros((capacity,), dtype))  # noqa: E731  (a transfer, not a compile)
        return cls(grad_accum=z(np.float32), count=z(np.int32), max_radii=z(np.float32))

    def mean_grad(self) -> jax.Array:
        """g = grad_accum / count [C]; 0 where count == 0 (the reference's NaN -> 0)."""
        return jnp.where(self.count > 0, self.grad_accum / jnp.maximum(self.count, 1).astype(jnp.float32), 0.0)


def accumulate(stats: DensifyStats, ndc_grad: jax.Array, radii: jax.Array) -> DensifyStats:
    """Add one render's statistics where radii > 0 (visible Gaussians).

    Args:
      ndc_grad: [C, 2] gradient of the loss w.r.t. each Gaussian's 2-D NDC centre (rasterizer.md §6.3).
      radii: [C] screen radius in pixels (0 = not rendered, which includes inactive slots).
    """
    visible = radii > 0
    norm = jnp.sqrt(jnp.sum(jnp.square(ndc_grad.astype(jnp.float32)), axis=-1))
    return DensifyStats(
        grad_accum=stats.grad_accum + jnp.where(visible, norm, 0.0),
        count=stats.count + visible.astype(jnp.int32),
        max_radii=jnp.where(visible, jnp.maximum(stats.max_radii, radii.astype(jnp.float32)), stats.max_radii),
    )


def render_increments(ndc_grads: jax.Array, radii: jax.Array) -> DensifyStats:
    """The statistics of V renders as one increment for `add_increments`: per slot the sum of the gradient norms and
    the count over the renders where the Gaussian was visible, and its largest radius there (0 if never visible).

    Args:
      ndc_grads: [V, C, 2] gradient of each render's loss w.r.t. each Gaussian's 2-D NDC centre.
      radii: [V, C] screen radius in pixels (0 = not rendered).
    Increments of several devices add up (sums) and combine by max (radii) before `add_increments`.
    """
    visible = radii > 0
    norm = jnp.sqrt(jnp.sum(jnp.square(ndc_grads.astype(jnp.float32)), axis=-1))
    return DensifyStats(grad_accum=jnp.sum(jnp.where(visible, norm, 0.0), axis=0),
                        count=jnp.sum(visible.astype(jnp.int32), axis=0),
                        max_radii=jnp.max(jnp.where(visible, radii.astype(jnp.float32), 0.0), axis=0))


def add_increments(stats: DensifyStats, inc: DensifyStats) -> DensifyStats:
    """`stats` after the renders of `inc` (`render_increments`); one render gives exactly `accumulate`'s result
    (radii are >= 0, so max(old, 0) = old where the Gaussian was not visible)."""
    return DensifyStats(grad_accum=stats.grad_accum + inc.grad_accum, count=stats.count + inc.count,
                        max_radii=jnp.maximum(stats.max_radii, inc.max_radii))


def is_densify_iteration(it, *, interval: int = 100, start: int = 500, until: int = 15000):
    """True at the reference's densify iterations: start < it < until and it % interval == 0 (works on tracers)."""
    return (it > start) & (it < until) & (it % interval == 0)


# ---------------------------------------------------------------------------------- selection
def _selection(gaussians: Gaussians, stats: DensifyStats, grad_threshold, scale_threshold,
               max_num_gaussians: Optional[int]):
    """Masks [C] of clone and split sources and the active count (before any change)."""
    active = gaussians.active
    n_active = gaussians.num_active()
    # The reference densifies only while the current count is below the cap (None or 0 = no cap).
    if max_num_gaussians is None:
        densify = jnp.asarray(True)
    else:
        cap = jnp.asarray(max_num_gaussians, jnp.int32)  # may be traced: no recompile per value
        densify = (cap <= 0) | (n_active < cap)
    hot = active & (stats.mean_grad() >= grad_threshold) & densify
    s_max = jnp.max(gaussians.get_scale(), axis=-1)
    # Clone and split select disjoint sets (<= vs >), so the reference's ordering (clone first, split on
    # the enlarged set with g padded by 0 for clones) is equivalent to selecting both up front.
    return hot & (s_max <= scale_threshold), hot & (s_max > scale_threshold), densify, n_active


def required_capacity(gaussians: Gaussians, stats: DensifyStats, *, grad_threshold: float = 5e-5,
                      scale_threshold: float = 0.2, max_num_gaussians: Optional[int] = 500000) -> jax.Array:
    """Slots the next `densify_and_prune` with the same settings needs: active + clones + splits (int32 scalar).

    Each clone needs one free slot and each split one (its first child reuses the parent's slot).
    Compare with `gaussians.capacity` and enlarge with `grow(..., next_capacity(needed, capacity), capacity)`.
    """
    clone, split, _, n_active = _selection(gaussians, stats, grad_threshold, scale_threshold, max_num_gaussians)
    return n_active + jnp.sum(clone, dtype=jnp.int32) + jnp.sum(split, dtype=jnp.int32)


def _rows_where(mask: jax.Array, value, x):
    """where(mask, value, x) broadcast over the trailing axes of x [C, ...]."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), value, x)


def _gather_rows(receives, src, new_value, x):
    """x with rows i where receives[i] replaced by new_value[src[i]]."""
    return _rows_where(receives, jnp.take(new_value, src, axis=0), x)


def _zero_rows(tree: Any, rows: jax.Array) -> Any:
    """Zero the rows `rows` [C] of every leaf with leading axis C; other leaves (e.g. step counts) unchanged."""
    c = rows.shape[0]

    def zero(x):
        if getattr(x, "ndim", 0) >= 1 and x.shape[0] == c:
            return _rows_where(rows, jnp.zeros((), x.dtype), x)
        return x

    return jax.tree.map(zero, tree)


# ---------------------------------------------------------------------------------- main entry
def densify_and_prune(gaussians: Gaussians, stats: DensifyStats, key: jax.Array, *,
                      grad_threshold: float = 5e-5, scale_threshold: float = 0.2, density_min: float = 1e-5,
                      bbox_min=None, bbox_max=None, max_num_gaussians: Optional[int] = 500000,
                      max_screen_size: Optional[float] = None, max_scale: Optional[float] = None,
                      per_gaussian: Any = (), split_noise: Optional[jax.Array] = None):
    """One reference densify-and-prune step on fixed-capacity buffers (pure, static shapes).

    Under `jax.jit`, max_screen_size and max_scale must be static (Python values or None), and so must
    whether bbox / max_num_gaussians / split_noise are None; the thresholds, the bbox values and the cap
    may be traced (changing them does not recompile). Example:
    `jax.jit(densify_and_prune, static_argnames=("max_screen_size", "max_scale"))`.

    Args:
      gaussians: C slots. stats: their `DensifyStats`. key: PRNG key for the split offsets.
      grad_threshold: on the mean NDC-gradient norm g (>=).
      scale_threshold: world units; split if max(s) > it, clone if <= (0.1 * V = 0.2 for V = 2).
      density_min: prune activated density below this.
      bbox_min, bbox_max: [3] world units; prune centres strictly outside on any axis (None: no bbox test).
      max_num_gaussians: no clone/split while the active count is >= this (None or 0: no cap).
      max_screen_size (pixels), max_scale (world units): optional extra prune rules, off by default as in
        the reference.
      per_gaussian: pytree(s) with leaves [C, ...] (optimiser moments of the Gaussian parameters); leaves
        of other shapes are returned unchanged.
      split_noise: optional [2, C, 3] standard normals (child 1, child 2 per parent slot) replacing the
        draws from `key` (for tests / reproducibility).

    Returns:
      (gaussians, stats, per_gaussian, info) where info holds int32/bool scalars: cloned, split, pruned,
      num_active (after), needed_capacity (= `required_capacity`), overflow, densified (clone/split
      stage ran, so the accumulators were reset). On overflow every output equals its input.
    """
    c = gaussians.capacity
    active = gaussians.active
    clone, split, densify, n_active = _selection(gaussians, stats, grad_threshold, scale_threshold,
                                                 max_num_gaussians)
    n_clone = jnp.sum(clone, dtype=jnp.int32)
    n_split = jnp.sum(split, dtype=jnp.int32)
    n_new = n_clone + n_split  # free slots needed
    needed = n_active + n_new
    overflow = needed > c

    # -- candidate values (computed for every slot, used where selected)
    rho = softplus(gaussians.density)
    half_density = inverse_softplus_jax(0.5 * rho)  # clone source and copy, and both split children
    scale = gaussians.get_scale()
    child_scaling = inverse_scale_activation_jax(scale / SPLIT_SCALE_DIVISOR, gaussians.scale_bound)
    if split_noise is None:
        split_noise = jax.random.normal(key, (SPLIT_CHILDREN, c, 3), jnp.float32)
    elif tuple(split_noise.shape) != (SPLIT_CHILDREN, c, 3):
        raise ValueError(f"densify_and_prune: split_noise must have shape {(SPLIT_CHILDREN, c, 3)}, "
                         f"got {tuple(split_noise.shape)}")
    rot = quaternion_to_rotation(gaussians.get_rotation())  # [C, 3, 3]
    # child = m + R(q) z, z ~ N(0, diag(s^2))
    child_xyz = gaussians.xyz[None] + jnp.einsum("cij,kcj->kci", rot, split_noise * scale[None], precision=jax.lax.Precision.HIGHEST)

    # -- appended Gaussians: item r (clones by source index, then second split children) -> r-th free slot
    free = ~active
    free_rank = jnp.cumsum(free.astype(jnp.int32)) - 1
    receives = free & (free_rank < n_new)
    clone_src = jnp.nonzero(clone, size=c, fill_value=0)[0]
    split_src = jnp.nonzero(split, size=c, fill_value=0)[0]
    item = jnp.clip(free_rank, 0, c - 1)
    is_copy = item < n_clone
    src = jnp.where(is_copy, clone_src[item], split_src[jnp.clip(item - n_clone, 0, c - 1)])
    new_is_copy = receives & is_copy
    new_is_child = receives & ~is_copy

    g = gaussians
    # in-place changes: clone sources halve their density, split parents become child 1
    xyz = _rows_where(split, child_xyz[0], g.xyz)
    scaling = _rows_where(split, child_scaling, g.scaling)
    density = jnp.where(clone | split, half_density, g.density)
    # appended rows
    xyz = _gather_rows(new_is_copy, src, g.xyz, xyz)
    xyz = _gather_rows(new_is_child, src, child_xyz[1], xyz)
    scaling = _gather_rows(new_is_copy, src, g.scaling, scaling)
    scaling = _gather_rows(new_is_child, src, child_scaling, scaling)
    rotation = _gather_rows(receives, src, g.rotation, g.rotation)  # raw rotation copied unnormalised
    density = _gather_rows(receives, src, half_density, density)
    max_radii = _gather_rows(receives, src, stats.max_radii, stats.max_radii)  # children inherit
    active_d = active | receives

    # -- accumulators: reset for everyone whenever the clone/split stage ran (its postfix always resets)
    grad_accum = jnp.where(densify, 0.0, stats.grad_accum)
    count = jnp.where(densify, 0, stats.count)

    # -- prune (always), on the densified set
    prune = softplus(density) < density_min
    if bbox_min is not None or bbox_max is not None:
        if bbox_min is None or bbox_max is None:
            raise ValueError("densify_and_prune: give both bbox_min and bbox_max, or neither")
        lo = jnp.asarray(bbox_min, jnp.float32).reshape(3)
        hi = jnp.asarray(bbox_max, jnp.float32).reshape(3)
        prune = prune | jnp.any((xyz < lo) | (xyz > hi), axis=-1)
    if max_screen_size:
        prune = prune | (max_radii > max_screen_size)
    if max_scale:
        prune = prune | (jnp.max(scale_activation(scaling, g.scale_bound), axis=-1) > max_scale)
    prune = prune & active_d
    active_f = active_d & ~prune

    # -- empty every inactive slot (pruned ones and never-used ones alike)
    empty = Gaussians.empty(c, g.scale_bound)
    out = g.replace(
        xyz=_rows_where(active_f, xyz, empty.xyz),
        scaling=_rows_where(active_f, scaling, empty.scaling),
        rotation=_rows_where(active_f, rotation, empty.rotation),
        density=jnp.where(active_f, density, empty.density),
        active=active_f,
    )
    new_stats = DensifyStats(grad_accum=jnp.where(active_f, grad_accum, 0.0),
                             count=jnp.where(active_f, count, 0),
                             max_radii=jnp.where(active_f, max_radii, 0.0))
    # New Gaussians (copies, both split children) and empty slots start with zero optimiser moments.
    new_pg = _zero_rows(per_gaussian, receives | split | ~active_f)

    # -- all or nothing: without room, return the inputs unchanged
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(overflow, b, a), new, old)  # noqa: E731
    out, new_stats, new_pg = keep((out, new_stats, new_pg), (gaussians, stats, per_gaussian))
    ok = ~overflow
    info = dict(
        cloned=jnp.where(ok, n_clone, 0),
        split=jnp.where(ok, n_split, 0),
        pruned=jnp.where(ok, jnp.sum(prune, dtype=jnp.int32), 0),
        num_active=out.num_active(),
        needed_capacity=needed,
        overflow=overflow,
        densified=densify & ok,
    )
    return out, new_stats, new_pg, info
