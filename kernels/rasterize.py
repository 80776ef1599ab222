"""Triton backend of the X-ray Gaussian rasterizer (rasterizer.md §4-§6): `rasterize_points`.

Pipeline for one view (vmap over cameras folds the views into one launch of each kernel):
  1. `x2gs_jax.render.projection.preprocess` (JAX, differentiable): pixel centre, conic, μ, radius, tile rect.
  2. `kernels.binning.bin_tiles` (Triton count → JAX scan → Triton fill): Gaussian ids grouped by 16×16 tile
     in a static buffer of P slots. Gaussians that cannot contribute (culled, or ρμ < 1e-5 so every pixel fails
     α ≥ 1e-5, e.g. inactive slots with ρ = 0) get no pairs and cost nothing past step 1.
  3. `raster_fwd_kernel`: one program per (tile, split part, view) sums its pairs' footprints in registers (no
     depth sort: the X-ray image is an order-independent sum) and writes a partial tile; the parts are summed
     in JAX. Splitting (`_launch.split_factor`) matters for small detectors: 96² has 36 tiles, each with
     thousands of pairs, which alone would leave most of the GPU idle.
  4. Backward (`jax.custom_vjp` around 2-3): `raster_bwd_kernel` reduces each pair's 256 pixels to six
     moments and adds them atomically per Gaussian; the per-Gaussian formulas of §6.1 and the chain of §6.2
     (autodiff through `preprocess`, with the reference's guards) run in JAX, exactly as the reference path.

Capacity. The pair buffer has P static slots per view (`max_pairs`, default `binning.default_capacity`). The
result is exact whatever P: a tile whose pairs did not fit ignores its pair list and tests every Gaussian's tile
box instead (O(C) per such tile: slow, so `aux.overflow` reports it — size `max_pairs` with
`count_pairs`/`pair_capacity` and re-jit). No host synchronisation, no data-dependent loop in JAX.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from kernels._launch import debug_init, launch, merge_batch, on_gpu, split_factor
from kernels.binning import SUB, bin_tiles, default_capacity, empty_boxes
from x2gs_jax.render.projection import TILE, preprocess, tile_grid
from x2gs_jax.render.rasterize_ref import RenderAux, contributing_pairs

# Launch shapes (profile-tuned on an H200, see bench/README.md): pairs per inner step and warps per program.
BLOCK_G = 16  # forward: [16 pairs, 256 px] float32 per temporary
NUM_WARPS = 4
BLOCK_G_BWD = 16  # backward: [256 px, 16 pairs]
NUM_WARPS_BWD = 4


class _Static(NamedTuple):
    width: int
    height: int
    capacity: int  # P, pair slots per view
    poison: bool  # debug: the image buffer starts as NaN, so an unwritten pixel shows


def _grid(st: _Static):
    gx, gy = tile_grid(st.width, st.height)
    return gx, gx * gy


# ------------------------------------------------------------------------------------------- batched ops
def _render_op(st: _Static, c: int):
    """(params [B,C,8], box [B,C,8], tstart [B,T·SUB+1], gids [B,P]) → image [B,H,W]."""
    from kernels import raster_kernels as rk  # lazy: imports triton

    gx, n_tiles = _grid(st)

    def run(params, box, tstart, gids):
        b = params.shape[0]
        split = split_factor(n_tiles * b, st.capacity // n_tiles, BLOCK_G)
        out = jax.ShapeDtypeStruct((b, split, st.height, st.width), jnp.float32)
        init, aliases = debug_init(out, st.poison, 4)
        (img,) = launch(rk.raster_fwd_kernel, (n_tiles * split, b), [out], params, box, tstart, gids, init,
                        scalars=(c, st.capacity, split), aliases=aliases, num_warps=NUM_WARPS,
                        T=n_tiles, GX=gx, W=st.width, H=st.height, BLOCK_G=BLOCK_G, SUB=SUB, INTERP=not on_gpu())
        return jnp.sum(img, axis=1)  # the split parts, in a fixed order

    return merge_batch(run)


def _moments_op(st: _Static, c: int):
    """(params, box, tstart, gids, g_image [B,H,W]) → moments [B,C,8] (six used) of §6.1 per Gaussian."""
    from kernels import raster_kernels as rk  # lazy: imports triton

    gx, n_tiles = _grid(st)

    def run(params, box, tstart, gids, g_image):
        b = params.shape[0]
        split = split_factor(n_tiles * b, st.capacity // n_tiles, BLOCK_G_BWD)
        (mom,) = launch(rk.raster_bwd_kernel, (n_tiles * split, b), [jax.ShapeDtypeStruct((b, c, 8), jnp.float32)],
                        params, box, tstart, gids, g_image, scalars=(c, st.capacity, split), zeroed=(0,),
                        num_warps=NUM_WARPS_BWD, T=n_tiles, GX=gx, W=st.width, H=st.height, BLOCK_G=BLOCK_G_BWD,
                        SUB=SUB, INTERP=not on_gpu())
        return mom

    return merge_batch(run)


def _pack(means2d, conic, weight):
    """Per-Gaussian kernel record [C, 8] = (p_x, p_y, A, B, C, w, 0, 0): one 32-byte row per gather."""
    zero = jnp.zeros_like(weight)
    return jnp.stack([means2d[:, 0], means2d[:, 1], conic[:, 0], conic[:, 1], conic[:, 2], weight, zero, zero],
                     axis=-1).astype(jnp.float32)


# ------------------------------------------------------------------------------------------- custom VJP
def _forward(st: _Static, means2d, conic, mu, rho, box):
    c = means2d.shape[0]
    gx, gy = tile_grid(st.width, st.height)
    params = _pack(means2d, conic, rho * mu)[None]
    box = box[None]
    tstart, gids = bin_tiles(box, tile_grid=(gy, gx, 1), capacity=st.capacity)
    image = _render_op(st, c)(params, box, tstart, gids)
    return image[0], (params, box, tstart, gids)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _raster(st: _Static, means2d, conic, mu, rho, box):
    """Image [H, W] of the tile-masked, thresholded footprints ρ μ exp(E) (§5)."""
    return _forward(st, means2d, conic, mu, rho, box)[0]


def _raster_fwd(st, means2d, conic, mu, rho, box):
    image, bins = _forward(st, means2d, conic, mu, rho, box)
    return image, (conic, mu, rho, bins)


def _raster_bwd(st, res, g_image):
    conic, mu, rho, (params, box, tstart, gids) = res
    mom = _moments_op(st, conic.shape[0])(params, box, tstart, gids, g_image.astype(jnp.float32)[None])
    s0, sx, sy, sxx, sxy, syy = (mom[0, :, i] for i in range(6))
    # §6.1, summed over the Gaussian's contributing pixels (same formulas as the reference path).
    weight = rho * mu
    A, B, C = conic[:, 0], conic[:, 1], conic[:, 2]
    g_rho = mu * s0
    g_mu = rho * s0
    g_conic = jnp.stack([-0.5 * weight * sxx, -weight * sxy, -0.5 * weight * syy], axis=-1)
    g_means2d = jnp.stack([weight * (-A * sx - B * sy), weight * (-B * sx - C * sy)], axis=-1)
    return g_means2d, g_conic, g_mu, g_rho, None


_raster.defvjp(_raster_fwd, _raster_bwd)


# ------------------------------------------------------------------------------------------- public
def rasterize_points(means, scales, rotations, densities, camera, *, ndc_offset: Optional[jax.Array] = None,
                     max_pairs: Optional[int] = None, debug_poison: bool = False):
    """Render one X-ray view with the Triton kernels; same contract as `x2gs_jax.render.rasterize_points`.

    Args:
      means [C, 3], scales [C, 3], rotations [C, 4] (w, x, y, z; used as given), densities [C]: activated
        Gaussians in world units. camera: `x2gs_jax.geometry.Camera` (one view; vmap for several).
      ndc_offset: optional [C, 2] zeros whose gradient is the screen-space mean gradient (§6.3).
      max_pairs: pair slots per view (static); None = `binning.default_capacity` (4 per Gaussian). The result is
        exact either way; `aux.overflow` is True when the pairs did not fit and the slow fallback ran.
      debug_poison: start the image buffer as NaN (tests: every pixel must be written).
    Returns:
      (image [H, W] float32, RenderAux(radii [C] int32, overflow [] bool, num_pairs [] int32,
      means2d [C, 2] float32 pixel centres, not differentiated)).
    """
    means = jnp.asarray(means, jnp.float32)
    densities = jnp.asarray(densities, jnp.float32)
    if means.ndim != 2 or means.shape[1] != 3:
        raise ValueError(f"rasterize_points: means must have shape [C, 3], got {means.shape}")
    n = means.shape[0]
    if densities.shape != (n,):
        raise ValueError(f"rasterize_points: densities must have shape ({n},), got {densities.shape}")
    if max_pairs is not None and int(max_pairs) <= 0:
        raise ValueError(f"rasterize_points: max_pairs must be a positive int or None, got {max_pairs!r}")
    if ndc_offset is None:
        ndc_offset = jnp.zeros((n, 2), jnp.float32)
    # Full float32 matmuls: on a GPU, XLA's default precision for f32 dots is TF32 (~1e-3 relative), which
    # moves projected centres by ~1e-3 px per px of distance and breaks parity with the float32 reference.
    with jax.default_matmul_precision("highest"):
        proj = preprocess(means, scales, rotations, camera, ndc_offset=ndc_offset)
    if n == 0:
        zero = jnp.zeros((), jnp.int32)
        return (jnp.zeros((camera.height, camera.width), jnp.float32),
                RenderAux(proj.radii, jnp.zeros((), bool), zero, jax.lax.stop_gradient(proj.means2d)))
    proj, counts = contributing_pairs(proj, densities, camera.width, camera.height)
    # Tile box (row, column, 0) of the binning kernels, empty for Gaussians that cannot contribute.
    lo, hi = proj.rect_min.astype(jnp.int32), proj.rect_max.astype(jnp.int32)
    zero, one = jnp.zeros((n, 1), jnp.int32), jnp.ones((n, 1), jnp.int32)
    rect = jnp.concatenate([lo[:, 1:2], lo[:, 0:1], zero, hi[:, 1:2], hi[:, 0:1], one, zero, zero], axis=-1)
    rect = jax.lax.stop_gradient(empty_boxes(rect, counts > 0))
    gx, gy = tile_grid(camera.width, camera.height)
    n_tiles = gx * gy
    capacity = default_capacity(n, n_tiles) if max_pairs is None else int(max_pairs)
    st = _Static(int(camera.width), int(camera.height), capacity, bool(debug_poison))
    image = _raster(st, proj.means2d, proj.conic, proj.mu, densities, rect)
    total = jnp.sum(counts)
    overflow = total > capacity
    return image, RenderAux(radii=proj.radii, overflow=overflow, num_pairs=total,
                            means2d=jax.lax.stop_gradient(proj.means2d))


__all__ = ["rasterize_points", "TILE"]
