"""HexPlane field on the GPU: the spatial product of one level as one fused Triton kernel pair.

`spatial_level((p_xy, p_xz, p_yz), g_xyz)` = sample_plane(p_xy, x, y) · sample_plane(p_xz, x, z) ·
sample_plane(p_yz, y, z) of `x2gs_jax.fields.hexplane` (the same bilinear weights, float32 operations in the same
order; the products and the atomic sums differ in rounding only). Why: the pure-JAX level is, per spatial plane, a
gather fusion forward and a re-gather, a scatter kernel and coordinate-gradient fusions backward, plus the product
fusions: a long tail of small kernels per level. Here the forward is one kernel (12 corner-row reads per point, one
[N, C] write) and the backward one kernel (re-read, the three cotangents, relaxed-atomic adds into the three
gradient tables and the [N, 3] coordinate gradient). Residuals: the planes and coordinates only (no [N, C] tensor).

Layout: the parameters stay [C, R_b, R_a]; the kernels read row-major [R_b·R_a, C] tables (a corner is C
contiguous floats), transposed here, and the gradient tables are transposed back (kernels/field_kernels.py).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kernels._launch import launch, merge_batch

FWD_BLOCK = 64  # points per program, forward (12 [BLOCK, CP] row reads in flight)
BWD_BLOCK = 32  # points per program, backward (more live tiles: samples, cotangents, corners)
NUM_WARPS = 4


def _pow2(c: int) -> int:
    return 1 << max(0, (int(c) - 1).bit_length())


def _table(plane: jax.Array) -> jax.Array:
    """[C, R_b, R_a] → row-major [R_b·R_a, C] (row j·R_a + i)."""
    c, rb, ra = plane.shape
    return plane.reshape(c, rb * ra).T


def _untable(table: jax.Array, shape) -> jax.Array:
    """[R_b·R_a, C] → [C, R_b, R_a] (inverse of `_table`)."""
    return table.T.reshape(shape)


def _sizes(p_xy: jax.Array, p_xz: jax.Array) -> tuple[int, int, int, int]:
    """(C, R_x, R_y, R_z) from the (x,y) plane [C, R_y, R_x] and the (x,z) plane [C, R_z, R_x]."""
    return int(p_xy.shape[0]), int(p_xy.shape[2]), int(p_xy.shape[1]), int(p_xz.shape[1])


def _forward(p_xy, p_xz, p_yz, g):
    from kernels import field_kernels as fk  # lazy: imports triton

    c, rx, ry, rz = _sizes(p_xy, p_xz)
    n = int(g.shape[0])
    if n == 0:
        return jnp.zeros((0, c), jnp.float32)

    def run(t_xy, t_xz, t_yz, g):
        b = g.shape[0]
        (out,) = launch(fk.spatial_fwd_kernel, (-(-n // FWD_BLOCK), b),
                        [jax.ShapeDtypeStruct((b, n, c), jnp.float32)], t_xy, t_xz, t_yz, g,
                        scalars=(n, rx, ry, rz), num_warps=NUM_WARPS, C=c, CP=_pow2(c), BLOCK=FWD_BLOCK)
        return out

    tabs = [_table(p)[None] for p in (p_xy, p_xz, p_yz)]
    return merge_batch(run)(*tabs, g[None])[0]


def _backward(p_xy, p_xz, p_yz, g, ds):
    from kernels import field_kernels as fk  # lazy: imports triton

    c, rx, ry, rz = _sizes(p_xy, p_xz)
    n = int(g.shape[0])
    rows = (ry * rx, rz * rx, rz * ry)
    if n == 0:  # nothing to scatter; the launch of an empty grid cannot produce the (non-empty) tables
        return tuple(jnp.zeros_like(p) for p in (p_xy, p_xz, p_yz)) + (jnp.zeros_like(g),)

    def run(t_xy, t_xz, t_yz, g, ds):
        b = g.shape[0]
        shapes = [jax.ShapeDtypeStruct((b, r, c), jnp.float32) for r in rows]
        shapes.append(jax.ShapeDtypeStruct((b, n, 3), jnp.float32))
        return launch(fk.spatial_bwd_kernel, (-(-n // BWD_BLOCK), b), shapes, t_xy, t_xz, t_yz, g, ds,
                      scalars=(n, rx, ry, rz), zeroed=(0, 1, 2), num_warps=NUM_WARPS, C=c, CP=_pow2(c),
                      BLOCK=BWD_BLOCK)

    tabs = [_table(p)[None] for p in (p_xy, p_xz, p_yz)]
    d_xy, d_xz, d_yz, d_g = merge_batch(run)(*tabs, g[None], ds[None])
    grads = tuple(_untable(d[0], p.shape) for d, p in zip((d_xy, d_xz, d_yz), (p_xy, p_xz, p_yz)))
    return grads + (d_g[0],)


@jax.custom_vjp
def _spatial(p_xy, p_xz, p_yz, g):
    return _forward(p_xy, p_xz, p_yz, g)


def _spatial_fwd(p_xy, p_xz, p_yz, g):
    return _forward(p_xy, p_xz, p_yz, g), (p_xy, p_xz, p_yz, g)  # the samples are recomputed in the backward


def _spatial_bwd(res, ds):
    return _backward(*res, ds.astype(jnp.float32))


_spatial.defvjp(_spatial_fwd, _spatial_bwd)


def spatial_level(planes_xy_xz_yz: Sequence[jax.Array], g_xyz: jax.Array) -> jax.Array:
    """Spatial product of one HexPlane level: [N, C] float32.

    Args:
      planes_xy_xz_yz: the level's (x,y) plane [C, R_y, R_x], (x,z) plane [C, R_z, R_x] and (y,z) plane
        [C, R_z, R_y] (parameter layout, float32; every R >= 2).
      g_xyz: [N, 3] grid coordinates (unitless; -1 / +1 = first / last node, clamped outside).
    Returns s_xy · s_xz · s_yz per point, with `hexplane.sample_plane`'s bilinear semantics. Differentiable w.r.t.
    the three planes and g_xyz (custom VJP; the coordinate gradient is zero where the clamp is active). Works under
    jax.vmap (batch axes are folded into the launch grid); N may be 0.
    """
    p_xy, p_xz, p_yz = (jnp.asarray(p, jnp.float32) for p in planes_xy_xz_yz)
    g_xyz = jnp.asarray(g_xyz, jnp.float32)
    for p in (p_xy, p_xz, p_yz):
        if p.ndim != 3 or p.shape[1] < 2 or p.shape[2] < 2:
            raise ValueError(f"spatial_level: planes must be [C, R_b>=2, R_a>=2], got {p.shape}")
    c, rx, ry, rz = _sizes(p_xy, p_xz)
    want = ((c, ry, rx), (c, rz, rx), (c, rz, ry))
    if (p_xy.shape, p_xz.shape, p_yz.shape) != want:
        raise ValueError(f"spatial_level: planes (xy, xz, yz) must be {want} (C, R_b, R_a), got "
                         f"{(p_xy.shape, p_xz.shape, p_yz.shape)}")
    if g_xyz.ndim != 2 or g_xyz.shape[1] != 3:
        raise ValueError(f"spatial_level: g_xyz must be [N, 3], got {g_xyz.shape}")
    return _spatial(p_xy, p_xz, p_yz, g_xyz)
