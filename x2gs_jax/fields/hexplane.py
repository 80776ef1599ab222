"""Spatiotemporal HexPlane (K-planes) feature field of X2-Gaussian (x2gaussian.md §4).

Parameters ("grid" optimiser group): a list over levels of a list of 6 planes in the reference order

  0:(x,y)  1:(x,z)  2:(x,t)  3:(y,z)  4:(y,t)  5:(z,t)      spatial {0,1,3}, time {2,4,5}

Plane (a,b) is an array [C, R_b, R_a] (rows = second coordinate b, columns = first coordinate a).
Level l (multires factor m_l) has spatial resolution m_l * (Rx, Ry, Rz); the time resolution Rt is
the same at every level. Init: time planes 1.0, spatial planes i.i.d. Uniform(0.1, 0.5).

Coordinates (exactly as the reference codes them): g_xyz = -p / bounds (the reference's aabb is
stored upside down, hence the sign flip), g_t = t (normalised time, raw), so t in [0, 1] only covers
the upper half of the time axis. "full" time mapping (g_t = 2t - 1) uses the whole axis (the X2 config's
default: README difference 18).

Sampling is bilinear with align_corners=True and border padding (PyTorch grid_sample semantics):
column i = (u+1)/2 (R_a-1), row j = (v+1)/2 (R_b-1), clamped to the plane. `sample_plane` is
gather-based with a custom VJP whose residuals are only the plane (by reference) and the coordinates,
so no per-corner [N, C] tensor is kept for the backward pass.

Feature of a point: concat over levels of the element-wise product of its 6 plane samples,
[N, n_levels * C] (128 for the defaults). On a GPU the product of a level's 3 spatial samples is one fused
Triton kernel pair (kernels/field.py; `_triton_field`: X2GS_FIELD_KERNEL=xla selects the pure-JAX path).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# (a, b) coordinate indices into (x, y, z, t) of each plane, in the reference order.
PLANE_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
SPATIAL_PLANES = (0, 1, 3)
TIME_PLANES = (2, 4, 5)
TIME_MAPPINGS = ("reference", "full")

SPATIAL_INIT_RANGE = (0.1, 0.5)  # reference init of the planes without t
TIME_INIT_VALUE = 1.0  # reference init of the planes containing t


# ------------------------------------------------------------------------------------ shapes / init
def level_resolutions(resolution: Sequence[int], multires: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Per level (Rx, Ry, Rz, Rt): spatial axes multiplied by the multires factor, time unchanged."""
    rx, ry, rz, rt = (int(r) for r in resolution)
    return [(rx * int(m), ry * int(m), rz * int(m), rt) for m in multires]


def plane_shapes(resolution: Sequence[int], multires: Sequence[int], features: int) -> list[list[tuple[int, int, int]]]:
    """[levels][6] shapes (C, R_b, R_a) of the planes."""
    _check_sizes(resolution, multires, features)
    out = []
    for res in level_resolutions(resolution, multires):
        out.append([(int(features), res[b], res[a]) for a, b in PLANE_PAIRS])
    return out


def num_grid_params(resolution: Sequence[int], multires: Sequence[int], features: int) -> int:
    """Number of floats in the grid (closed form, no allocation)."""
    return int(sum(int(np.prod(s)) for level in plane_shapes(resolution, multires, features) for s in level))


def init_grid(key: jax.Array, resolution: Sequence[int] = (64, 64, 64, 150), multires: Sequence[int] = (1, 2, 4, 8),
              features: int = 32) -> list[list[jax.Array]]:
    """Reference initialisation: time planes all 1.0, spatial planes i.i.d. Uniform(0.1, 0.5) (float32)."""
    shapes = plane_shapes(resolution, multires, features)
    lo, hi = SPATIAL_INIT_RANGE
    spatial_sizes = [int(np.prod(level[p])) for level in shapes for p in SPATIAL_PLANES]
    # One draw for all spatial planes (i.i.d. anyway): a single RNG kernel compiles much faster
    # than one per plane shape.
    flat = jax.random.uniform(key, (sum(spatial_sizes),), jnp.float32, lo, hi)
    offsets = np.cumsum([0] + spatial_sizes)
    grid, n = [], 0
    for level_shapes in shapes:
        planes = []
        for p, shape in enumerate(level_shapes):
            if p in TIME_PLANES:
                planes.append(jnp.full(shape, TIME_INIT_VALUE, jnp.float32))
            else:
                planes.append(flat[offsets[n]:offsets[n + 1]].reshape(shape))
                n += 1
        grid.append(planes)
    return grid


def spatial_planes(grid_params: Sequence[Sequence[jax.Array]]) -> list[jax.Array]:
    """The (x,y), (x,z), (y,z) planes of every level, level-major (for `losses.hexplane_regularisers`)."""
    return [level[p] for level in _check_grid(grid_params) for p in SPATIAL_PLANES]


def time_planes(grid_params: Sequence[Sequence[jax.Array]]) -> list[jax.Array]:
    """The (x,t), (y,t), (z,t) planes of every level, level-major (for `losses.hexplane_regularisers`)."""
    return [level[p] for level in _check_grid(grid_params) for p in TIME_PLANES]


# ------------------------------------------------------------------------------------ coordinates
def normalise_coords(xyz: jax.Array, t, bounds: float = 1.6, time_mapping: str = "reference") -> jax.Array:
    """Grid coordinates [N, 4] = (-x/bounds, -y/bounds, -z/bounds, g_t) from world xyz [N, 3] and time t.

    t: [] or [N] normalised acquisition time (seconds / scan length). g_t = t ("reference") or
    2t - 1 ("full": the whole axis, the X2 config's default). The sign flip of the spatial axes is the
    reference's (x2gaussian.md §4).
    """
    g_xyz, g_t = grid_coords(xyz, t, bounds, time_mapping)
    return jnp.concatenate([g_xyz, jnp.broadcast_to(g_t, xyz.shape[:1])[:, None]], axis=1)


def grid_coords(xyz: jax.Array, t, bounds: float = 1.6, time_mapping: str = "reference"):
    """(g_xyz [N, 3], g_t [] or [N]): the columns of `normalise_coords`, kept apart.

    Apart because g_xyz does not depend on t: under `jax.vmap` over times it stays unbatched, so the spatial
    planes' samples (and, in the backward pass, their gradient scatter) are computed once for every time of the
    batch instead of once per time (the periodic render's t + kT, the tidal curve's chunks of times).
    """
    if time_mapping not in TIME_MAPPINGS:
        raise ValueError(f"normalise_coords: time_mapping must be one of {TIME_MAPPINGS}, got {time_mapping!r}")
    xyz = jnp.asarray(xyz, jnp.float32)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"normalise_coords: xyz must have shape [N, 3], got {xyz.shape}")
    t = jnp.asarray(t, jnp.float32)
    if t.ndim not in (0, 1) or (t.ndim == 1 and t.shape[0] != xyz.shape[0]):
        raise ValueError(f"normalise_coords: t must be [] or [N={xyz.shape[0]}], got {t.shape}")
    g_t = t if time_mapping == "reference" else 2.0 * t - 1.0
    return -xyz / jnp.float32(bounds), g_t


# ------------------------------------------------------------------------------------ sampling
def _axis_lookup(g: jax.Array, size: int):
    """Continuous index along one axis of length `size` (align_corners=True, border clamp).

    Returns (i0 [N] int32 in [0, size-2], frac [N] in [0, 1], d_index/d_g [N]); the derivative is zero
    where the clamp is active (PyTorch's clip_coordinates_set_grad: strictly inside only).
    """
    scale = 0.5 * (size - 1)
    raw = (g + 1.0) * scale
    pos = jnp.clip(raw, 0.0, size - 1.0)
    # i0 <= size-2 so that i0+1 is a valid neighbour; at the last node frac becomes 1.
    i0 = jnp.clip(jnp.floor(pos), 0.0, size - 2.0)
    frac = pos - i0
    dpos = jnp.where((raw > 0.0) & (raw < size - 1.0), jnp.float32(scale), 0.0)
    # Clamp again in integer space: a NaN coordinate must give a NaN sample, never an out-of-bounds read.
    return jnp.clip(i0.astype(jnp.int32), 0, size - 2), frac, dpos


def _corner_rows(plane: jax.Array, u: jax.Array, v: jax.Array):
    """Gather the 4 corner feature vectors [N, C] of each point from a plane [C, R_b, R_a]."""
    c, rb, ra = plane.shape
    i0, fi, di = _axis_lookup(u, ra)
    j0, fj, dj = _axis_lookup(v, rb)
    # Row-major [R_b*R_a, C] table so each corner is one contiguous C-vector (coalesced on GPU).
    table = plane.reshape(c, rb * ra).T
    base = j0 * ra + i0
    idx = (base, base + 1, base + ra, base + ra + 1)  # (j0,i0) (j0,i1) (j1,i0) (j1,i1)
    rows = tuple(table.at[k].get(mode="promise_in_bounds") for k in idx)  # indices clamped above
    return rows, idx, (fi, fj), (di, dj)


def _use_kernel(env: str, default: str, module: str) -> bool:
    """Whether a Triton kernel replaces a pure-JAX piece of the field, read at trace time from environment variable
    `env` (`default` when unset): "xla" = the pure-JAX path; "interpret" = the kernel on any backend (tests: Triton's
    interpreter on a CPU, small sizes only); "auto" = the kernel on a GPU where `module` and jax_triton import. The
    one place where the field's backends are chosen (`_triton_scatter`, `_triton_field`, `_triton_time_line`)."""
    import importlib

    mode = os.environ.get(env, default)
    if mode == "interpret":
        return True
    if mode != "auto" or jax.default_backend() != "gpu":
        return False
    try:
        importlib.import_module(module)
        import jax_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_scatter() -> bool:
    """Plane gradients of `sample_plane` through the Triton scatter kernel (kernels/plane_scatter.py):
    X2GS_PLANE_SCATTER, default auto (XLA's scatter emitter was the bottleneck on GPUs)."""
    return _use_kernel("X2GS_PLANE_SCATTER", "auto", "kernels.plane_scatter")


@jax.custom_vjp
def sample_plane(plane: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """Bilinear sample [N, C] of a plane [C, R_b, R_a] at grid coordinates u (columns) and v (rows), [N].

    align_corners=True (u = -1 -> column 0, u = +1 -> column R_a-1) with border padding (coordinates
    outside [-1, 1] are clamped). Differentiable w.r.t. the plane values and both coordinates; the
    coordinate gradient is zero where clamping is active. Needs R_a, R_b >= 2.
    """
    return _sample_fwd(plane, u, v)[0]


def _sample_fwd(plane, u, v):
    rows, _, (fi, fj), _ = _corner_rows(plane, u, v)
    p00, p01, p10, p11 = rows
    fi, fj = fi[:, None], fj[:, None]
    out = (1.0 - fj) * ((1.0 - fi) * p00 + fi * p01) + fj * ((1.0 - fi) * p10 + fi * p11)
    return out, (plane, u, v)  # residuals: no [N, C] tensors, the corners are re-gathered in bwd


def _sample_bwd(res, g):
    plane, u, v = res
    c, rb, ra = plane.shape
    (p00, p01, p10, p11), idx, (fi, fj), (di, dj) = _corner_rows(plane, u, v)
    fi2, fj2 = fi[:, None], fj[:, None]
    # d out / d frac_i and d out / d frac_j, contracted with the cotangent over channels.
    d_fi = jnp.sum(g * ((1.0 - fj2) * (p01 - p00) + fj2 * (p11 - p10)), axis=1)
    d_fj = jnp.sum(g * ((1.0 - fi2) * (p10 - p00) + fi2 * (p11 - p01)), axis=1)
    weights = ((1.0 - fi) * (1.0 - fj), fi * (1.0 - fj), (1.0 - fi) * fj, fi * fj)
    if _triton_scatter():
        from kernels.plane_scatter import scatter_rows  # GPU: XLA's scatter emitter is the bottleneck here

        table = scatter_rows(jnp.stack(idx), jnp.stack(weights), g, rb * ra)
    else:
        table = jnp.zeros((rb * ra, c), plane.dtype)
        for k, w in zip(idx, weights):  # four scatter-adds into one buffer, no [4N, C] concatenation
            table = table.at[k].add(g * w[:, None], mode="promise_in_bounds")
    d_plane = table.T.reshape(c, rb, ra)
    return d_plane, (d_fi * di).astype(u.dtype), (d_fj * dj).astype(v.dtype)


sample_plane.defvjp(_sample_fwd, _sample_bwd)


def _validated_sample(plane: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    if plane.ndim != 3 or plane.shape[1] < 2 or plane.shape[2] < 2:
        raise ValueError(f"sample_plane: plane must be [C, R_b>=2, R_a>=2], got {plane.shape}")
    if u.shape != v.shape or u.ndim != 1:
        raise ValueError(f"sample_plane: u and v must both be [N], got {u.shape} and {v.shape}")
    return sample_plane(plane, u, v)


def _triton_field() -> bool:
    """A level's spatial product through the fused Triton kernels (kernels/field.py): X2GS_FIELD_KERNEL, default
    auto."""
    return _use_kernel("X2GS_FIELD_KERNEL", "auto", "kernels.field")


def _spatial_product(planes_xy_xz_yz: Sequence[jax.Array], g_xyz: jax.Array) -> jax.Array:
    """s_xy · s_xz · s_yz [N, C] of one level's (x,y), (x,z), (y,z) planes at g_xyz [N, 3]: the one place that picks
    the backend (`_triton_field`): one fused kernel pair, or three `sample_plane`s and their products."""
    if _triton_field():
        from kernels.field import spatial_level  # GPU: one kernel per level instead of a tail of small ones

        return spatial_level(planes_xy_xz_yz, g_xyz)
    feat = None
    for plane, p in zip(planes_xy_xz_yz, SPATIAL_PLANES):
        a, b = PLANE_PAIRS[p]
        s = _validated_sample(plane, g_xyz[:, a], g_xyz[:, b])
        feat = s if feat is None else feat * s
    return feat


# ------------------------------------------------------------------------- time planes at one time
def _triton_time_line() -> bool:
    """The line gradient of `sample_time_plane` through the segmented Triton kernel (kernels/line.py):
    X2GS_TIME_KERNEL, default auto (H200, 200k points: field forward + backward 4.52 -> 3.29 ms; "xla" = the dense
    one-hot product, the CPU path and the kernel's pure twin)."""
    return _use_kernel("X2GS_TIME_KERNEL", "auto", "kernels.line")


def _time_rows(plane: jax.Array, g_t: jax.Array):
    """The two plane rows around the scalar time coordinate g_t: (r0, r1 [C, R_a], j0, fj, dj)."""
    j0, fj, dj = _axis_lookup(g_t, plane.shape[1])
    r0 = jax.lax.dynamic_index_in_dim(plane, j0, axis=1, keepdims=False)
    r1 = jax.lax.dynamic_index_in_dim(plane, j0 + 1, axis=1, keepdims=False)
    return r0, r1, j0, fj, dj


def sample_time_plane(plane: jax.Array, u: jax.Array, g_t: jax.Array, perm: Optional[jax.Array] = None) -> jax.Array:
    """`sample_plane(plane, u, full(N, g_t))` for a time plane sampled at one time for every point.

    The same bilinear value (up to rounding: interpolated along time first), computed as a 1-D lookup in the
    time-interpolated row. Why: with one time for all N points, the plane gradient of the general path is
    N scatter-adds into the same two rows, serialised by atomic contention on the GPU (the training
    step's bottleneck); here it is a dense, deterministic one-hot product [R_a, N] x [N, C] instead (on a GPU:
    the segmented kernel of `_triton_time_line`).
    Args: plane [C, R_t, R_a]; u [N] column coordinates; g_t [] time coordinate (differentiable); perm: optional
    [N] int32 `argsort(u)` for the kernel's backward (`time_sort`; computed there when None). The levels of one
    axis share u, and XLA does not merge their identical sorts: `hexplane_features` sorts once per axis.
    """
    return _sample_time(plane, u, g_t, perm)


def time_sort(u: jax.Array) -> Optional[jax.Array]:
    """The point order for the time planes' gradient kernel: argsort(u) [N] int32 where the kernel runs (the
    backward's sort), else None (the one-hot product needs no order). One per axis, shared by the levels."""
    return jnp.argsort(u).astype(jnp.int32) if _triton_time_line() else None


@jax.custom_vjp
def _sample_time(plane, u, g_t, perm):
    return _time_fwd(plane, u, g_t, perm)[0]


def _time_line(r0, r1, fj):
    """The time-interpolated row as [R_a, C] (one row per node: a point's C channels are contiguous).

    X2GS_TIME_LINE_BARRIER=1 (read at trace time; an A/B: −2 % on an H200, within the noise): the line goes through
    `lax.optimization_barrier`, so XLA materialises it before the gathers. Why: in the H200 profile of 2026-12-04
    XLA had fused the transpose into the gather fusion as a [C, R_a]-ordered bitcast, so each point's 32-channel
    gather read 32 lines 256 B apart (the periodic render's forward time product: 1.18 ms for a ~0.13 ms floor)."""
    line = ((1.0 - fj) * r0 + fj * r1).T
    if os.environ.get("X2GS_TIME_LINE_BARRIER", "0") == "1":
        line = jax.lax.optimization_barrier(line)
    return line


def _time_fwd(plane, u, g_t, perm):
    r0, r1, _, fj, _ = _time_rows(plane, g_t)
    line = _time_line(r0, r1, fj)  # [R_a, C]
    i0, fi, _ = _axis_lookup(u, plane.shape[2])
    fi = fi[:, None]
    out = (1.0 - fi) * line.at[i0].get(mode="promise_in_bounds") + fi * line.at[i0 + 1].get(mode="promise_in_bounds")
    return out, (plane, u, g_t, perm)


def _time_bwd(res, g):
    plane, u, g_t, perm = res
    _, _, ra = plane.shape
    r0, r1, j0, fj, dj = _time_rows(plane, g_t)
    line = _time_line(r0, r1, fj)  # [R_a, C]
    i0, fi, di = _axis_lookup(u, ra)
    a = line.at[i0].get(mode="promise_in_bounds")
    b = line.at[i0 + 1].get(mode="promise_in_bounds")
    d_u = jnp.sum(g * (b - a), axis=1) * di
    if _triton_time_line():
        from kernels.line import line_gradient  # GPU: segmented sums over points sorted by column

        # u is not batched under the vmap over times: one sort per call, not per time (`time_sort`: per axis).
        order = jnp.argsort(u).astype(jnp.int32) if perm is None else perm
        d_line = line_gradient(order, i0, fi, g, ra)  # [R_a, C]
    else:
        cols = jnp.arange(ra, dtype=jnp.int32)[None, :]
        w = (jnp.where(cols == i0[:, None], (1.0 - fi)[:, None], 0.0)
             + jnp.where(cols == i0[:, None] + 1, fi[:, None], 0.0))
        d_line = jnp.dot(w.T, g, precision=jax.lax.Precision.HIGHEST)  # [R_a, C], exact float32 sums
    # The plane gradient is (1 - fj)·d_line on row j0, fj·d_line on row j0 + 1 and zero elsewhere, written as one
    # elementwise select rather than two row scatters into a zero plane: under jax.vmap over times (the periodic
    # render, the tidal chunks) the scatters built one full [C, R_t, R_a] buffer per time before summing them,
    # whereas a select over broadcasts fuses with that sum into a single pass writing the plane once. Same values.
    rows = jnp.arange(plane.shape[1], dtype=jnp.int32)[None, :, None]
    d_plane = jnp.where(rows == j0, (1.0 - fj) * d_line.T[:, None, :],
                        jnp.where(rows == j0 + 1, fj * d_line.T[:, None, :], 0.0)).astype(plane.dtype)
    d_gt = jnp.sum((r1 - r0) * d_line.T) * dj
    return d_plane, d_u.astype(u.dtype), d_gt.astype(g_t.dtype), None  # perm: integer, no cotangent


_sample_time.defvjp(_time_fwd, _time_bwd)


@jax.custom_vjp
def _times_temporal(spatial, planes3, us, g_t, perms):
    """spatial [N, C] · s_0 · s_1 · s_2, s_a = `sample_time_plane(planes3[a], us[a], g_t)`: a level's feature when
    every point has the same time. Custom VJP: the residuals are the inputs (`spatial` and the coordinates), not
    the three time samples and their partial products — those are re-sampled in the backward from the small
    time-interpolated lines. Why: autodiff kept ~5 [N, C] arrays per level and time (20 x [2, N, C] for the periodic
    render's two times at the default field: ~1.3 GB written and re-read per step at 250k points), and under the
    model's `lax.cond` the single-time branch's residuals were written as zeros by the two-time one."""
    return _times_temporal_fwd(spatial, planes3, us, g_t, perms)[0]


def _time_samples(planes3, us, g_t):
    return [_time_fwd(plane, u, g_t, None)[0] for plane, u in zip(planes3, us)]


def _times_temporal_fwd(spatial, planes3, us, g_t, perms):
    s0, s1, s2 = _time_samples(planes3, us, g_t)
    return spatial * (s0 * s1 * s2), (spatial, planes3, us, g_t, perms)


def _times_temporal_bwd(res, g):
    spatial, planes3, us, g_t, perms = res
    s0, s1, s2 = _time_samples(planes3, us, g_t)
    # The products in the order autodiff of spatial * ((s0 * s1) * s2) uses (the same values as before).
    d_spatial = g * (s0 * s1 * s2)
    gs = g * spatial
    t2 = gs * s2
    cots = (t2 * s1, t2 * s0, gs * (s0 * s1))
    d_planes, d_us, d_gt = [], [], jnp.zeros_like(g_t)
    for a in range(3):
        perm = None if perms is None else perms[a]
        dp, du, dg, _ = _time_bwd((planes3[a], us[a], g_t, perm), cots[a])
        d_planes.append(dp)
        d_us.append(du)
        d_gt = d_gt + dg
    return d_spatial, tuple(d_planes), tuple(d_us), d_gt, None if perms is None else tuple(None for _ in perms)


_times_temporal.defvjp(_times_temporal_fwd, _times_temporal_bwd)


# ------------------------------------------------------------------------------------ features
def level_features(planes: Sequence[jax.Array], g_xyz: jax.Array, g_t: jax.Array,
                   perms: Optional[Sequence] = None) -> jax.Array:
    """Element-wise product of the 6 plane samples of one level: [N, C].

    g_xyz: [N, 3] spatial grid coordinates; g_t: [] one time coordinate shared by every point (the time planes
    then take the contention-free `sample_time_plane` path) or [N] one per point (`grid_coords`); perms: optional
    (3,) `time_sort` of each axis' coordinate (entries may be None), shared by the levels.
    Computed as (spatial product) · (time product): `_spatial_product` picks the fused kernel or the pure path."""
    spatial = _spatial_product([planes[p] for p in SPATIAL_PLANES], g_xyz)
    if jnp.ndim(g_t) == 0:
        planes3 = tuple(planes[p] for p in TIME_PLANES)
        for plane in planes3:
            if plane.ndim != 3 or plane.shape[1] < 2 or plane.shape[2] < 2:
                raise ValueError(f"sample_time_plane: plane must be [C, R_t>=2, R_a>=2], got {plane.shape}")
        us = tuple(g_xyz[:, PLANE_PAIRS[p][0]] for p in TIME_PLANES)
        return _times_temporal(spatial, planes3, us, g_t, None if perms is None else tuple(perms))
    temporal = None
    for p in TIME_PLANES:
        s = _validated_sample(planes[p], g_xyz[:, PLANE_PAIRS[p][0]], g_t)
        temporal = s if temporal is None else temporal * s
    return spatial * temporal


def hexplane_features(grid_params: Sequence[Sequence[jax.Array]], xyz: jax.Array, t, *, bounds: float = 1.6,
                      time_mapping: str = "reference", remat: bool = False) -> jax.Array:
    """HexPlane feature f(xyz, t): [N, n_levels * C] (128 for the defaults).

    Args:
      grid_params: [levels][6] planes [C, R_b, R_a] (see module docstring).
      xyz: [N, 3] world positions (the canonical Gaussian centres).
      t: [] or [N] normalised time (seconds / scan length); differentiable (period learning).
      bounds: half-size of the field's box in world units (reference 1.6).
      time_mapping: "reference" (g_t = t) or "full" (g_t = 2t - 1).
      remat: recompute each level's 6 samples in the backward pass instead of keeping them
        (saves 6 [N, C] float32 arrays per level at the cost of re-gathering).
    Under `jax.vmap` over t (xyz not mapped) the spatial samples are computed once for all times (`grid_coords`).
    """
    g_xyz, g_t = grid_coords(xyz, t, bounds, time_mapping)
    perms = tuple(time_sort(g_xyz[:, a]) for a in range(3)) if jnp.ndim(g_t) == 0 else None
    fn = jax.checkpoint(level_features) if remat else level_features
    return jnp.concatenate([fn(list(level), g_xyz, g_t, perms) for level in _check_grid(grid_params)], axis=1)


# ------------------------------------------------------------------------------------ validation
def _check_sizes(resolution, multires, features):
    if len(resolution) != 4 or any(int(r) < 2 for r in resolution):
        raise ValueError(f"HexPlane resolution must be 4 ints >= 2 (x, y, z, t), got {tuple(resolution)}")
    if len(multires) < 1 or any(int(m) < 1 for m in multires):
        raise ValueError(f"HexPlane multires must be a non-empty list of ints >= 1, got {tuple(multires)}")
    if int(features) < 1:
        raise ValueError(f"HexPlane features must be >= 1, got {features}")


def _check_grid(grid_params):
    if len(grid_params) < 1:
        raise ValueError("HexPlane grid: expected a non-empty list of levels")
    for i, level in enumerate(grid_params):
        if len(level) != 6:
            raise ValueError(f"HexPlane grid: level {i} has {len(level)} planes, expected 6 (xy, xz, xt, yz, yt, zt)")
    return grid_params
