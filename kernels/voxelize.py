"""Triton backend of the voxelizer (rasterizer.md §7): `voxelize_points`.

Pipeline (a batch of Gaussian states under vmap is folded into one launch of each kernel):
  1. `x2gs_jax.render.voxelize_ref.gaussian_setup` (JAX): centre v and Q = Σ_v⁻¹ in voxel units, the reference
     culling ("extent" / "center"), the reference 8³ tile box intersected with the box of {ρ exp(E) ≥ 1e-6}
     (outside it every voxel is skipped by the threshold anyway). Culled, zero-density (inactive) and
     below-threshold Gaussians get an empty box: no pairs, no cost.
  2. `kernels.binning.bin_tiles` groups (Gaussian, 8³ tile) pairs by tile (Triton count → scan → fill).
  3. `voxel_fwd_kernel`: one program per (tile, split part, batch row) sums its part of the tile's pairs over
     the tile's 512 voxels; the parts are summed in JAX (few tiles, e.g. the 32³ TV patch: see split_factor).
  2'-3'. Or, on grids of at most SCATTER_MAX_VOXELS voxels (the default `forward="auto"`; `forward=` selects):
     `voxel_scatter_kernel`, one program per (Gaussian, batch row), adds the Gaussian over its voxel box (step
     4's box) into the zeroed volume with atomics; no binning.
  4. Backward (`jax.custom_vjp`): `voxel_bwd_kernel` gathers, one program per (Gaussian, batch row), the
     cotangent over the Gaussian's voxel box (`_voxel_boxes`: the threshold box of step 1 inside its tile box
     and the grid) and writes its ten moments with plain stores (no binning, no atomics, deterministic; cost ~
     the box voxels, not pairs × 512). §7.4's chain (Q → Σ_v with the 1/(det² + 1e-7) guard → Σ → (s, q);
     v → m with the "true" or the reference's h²-scaled mean gradient) runs in JAX, as in the reference path.

Exact (no pair is ever dropped): a tile whose pairs did not fit into the static pair buffer tests every
Gaussian's tile box instead of its pair list (slow, rare with the default capacity); the backward uses no pair
list. No host synchronisation.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from kernels._launch import debug_init, launch, merge_batch, on_gpu, split_factor
from kernels.binning import SUB, bin_tiles, default_capacity, empty_boxes
from x2gs_jax.gaussians import covariance
from x2gs_jax.render import voxelize_ref as vr
from x2gs_jax.render.voxelize import CULLING_MODES, MEAN_GRAD_MODES

VTILE = 8  # voxel tile edge (the reference's)
# Launch shapes (profile-tuned on an H200, see bench/README.md).
BLOCK_G = 8  # forward: [8 pairs, 512 voxels] float32 per temporary
NUM_WARPS = 4
# Backward (gather), one program per Gaussian: voxels per loop step and warps. Measured on an H200 at 64³ 50k
# (bench/profile.py; BENCHMARKS.md): (64, 1) 0.045 ms, (32, 1) 0.041, (128, 1) 0.060, (128, 2) 0.092, (256, 4)
# 0.168 ms; 64 keeps long boxes (256³ grids) at fewer loop steps than 32. Why one warp: the ten moment sums then reduce within the warp (shuffles only,
# no shared memory or barriers), and the per-program set-up and reductions, paid once per Gaussian, are not
# repeated by every warp. SASS counts (sm_90, Triton 3.6) per warp: set-up + reductions ≈ 360 instructions,
# 133 per step of 64 voxels; (BLOCK_V, warps) = (256, 4) costs 4 × (≈ 480 + 133 per step). The 64³ / 50k
# benchmark scene's voxel boxes hold 117 voxels on average (median 80, at most 1100): ≈ 34M warp instructions
# with (64, 1), ≈ 126M with (256, 4). 256³ grids (boxes up to ~6·10⁴ voxels) are step-bound: ≈ 8·10⁸ for both.
BLOCK_V_BWD = 64
NUM_WARPS_BWD = 1
PAIRS_PER_GAUSSIAN = 32  # default pair buffer: this many 8³ tiles per Gaussian (beyond: exact slow fallback)


# Forward algorithms: "tiles" (binning + one program per 8³ tile, cost ~ pairs × 512 voxel evaluations) and
# "scatter" (one program per Gaussian adding its voxel box with atomics: no binning, 3 fewer kernels, cost ~ box
# voxels + one atomic per kept voxel). "auto" picks scatter up to SCATTER_MAX_VOXELS grid voxels. Measured on an
# H200 (bench/render.py --backends triton:tiles,triton:scatter --only voxelize, BENCHMARKS.md), tiles / scatter
# forward ms: 64³ 50k 0.235 / 0.184, 128³ 200k 0.938 / 0.661, 256³ 50k 0.810 / 0.978, 256³ 200k 2.390 / 2.735:
# on 256³ grids the boxes are long (up to ~6·10⁴ voxels) and the atomics cost more than the tile sums.
FORWARD_MODES = ("auto", "tiles", "scatter")
SCATTER_MAX_VOXELS = 128 ** 3
BLOCK_V_SCATTER = 64  # the gather backward's walk (BLOCK_V_BWD), one warp per Gaussian
NUM_WARPS_SCATTER = 1


class _Static(NamedTuple):
    n: tuple  # (nx, ny, nz)
    culling: str
    mean_grad: str
    capacity: int
    poison: bool
    forward: str  # "tiles" or "scatter"


def _tiles(n: tuple) -> tuple:
    return tuple(-(-int(a) // VTILE) for a in n)


# ------------------------------------------------------------------------------------------- batched ops
def _render_op(st: _Static, c: int):
    """(params [B,C,12], box [B,C,8], tstart, gids) → volume [B,nx,ny,nz]."""
    from kernels import voxel_kernels as vk  # lazy: imports triton

    ga, gb, gc = _tiles(st.n)
    n_tiles = ga * gb * gc

    def run(params, box, tstart, gids):
        b = params.shape[0]
        split = split_factor(n_tiles * b, st.capacity // n_tiles, BLOCK_G)
        out = jax.ShapeDtypeStruct((b, split) + st.n, jnp.float32)
        init, aliases = debug_init(out, st.poison, 4)
        (vol,) = launch(vk.voxel_fwd_kernel, (n_tiles * split, b), [out], params, box, tstart, gids, init,
                        scalars=(c, st.capacity, split), aliases=aliases, num_warps=NUM_WARPS,
                        T=n_tiles, GY=gb, GZ=gc, NX=st.n[0], NY=st.n[1], NZ=st.n[2],
                        BLOCK_G=BLOCK_G, SUB=SUB, INTERP=not on_gpu())
        return jnp.sum(vol, axis=1)  # the split parts, in a fixed order

    return merge_batch(run)


def _scatter_op(st: _Static, c: int):
    """(params [B,C,12], vbox [B,C,8]) → volume [B,nx,ny,nz]: one program per (Gaussian, batch row) adds its
    voxel box atomically into the zeroed volume."""
    from kernels import voxel_kernels as vk  # lazy: imports triton

    def run(params, vbox):
        b = params.shape[0]
        (vol,) = launch(vk.voxel_scatter_kernel, (c, b), [jax.ShapeDtypeStruct((b,) + st.n, jnp.float32)],
                        params, vbox, scalars=(c,), zeroed=(0,), num_warps=NUM_WARPS_SCATTER, NX=st.n[0],
                        NY=st.n[1], NZ=st.n[2], BLOCK_V=BLOCK_V_SCATTER, INTERP=not on_gpu())
        return vol

    return merge_batch(run)


def _moments_op(st: _Static, c: int):
    """(params [B,C,12], vbox [B,C,8], cotangent [B,nx,ny,nz]) → moments [B,C,10] of §7.4: Σ Gg, Σ Gg δ (3),
    Σ Gg δδᵀ (xx, xy, xz, yy, yz, zz) over each Gaussian's voxel box (G = exp(E), g = cotangent, δ = v − voxel
    centre in voxels). One program per (Gaussian, batch row); every output element is stored (no memset)."""
    from kernels import voxel_kernels as vk  # lazy: imports triton

    def run(params, vbox, cot):
        b = params.shape[0]
        (mom,) = launch(vk.voxel_bwd_kernel, (c, b), [jax.ShapeDtypeStruct((b, c, 10), jnp.float32)],
                        params, vbox, cot, scalars=(c,), num_warps=NUM_WARPS_BWD, NX=st.n[0], NY=st.n[1],
                        NZ=st.n[2], BLOCK_V=BLOCK_V_BWD, INTERP=not on_gpu())
        return mom

    return merge_batch(run)


# ------------------------------------------------------------------------------------------- setup
def _setup(st: _Static, means, scales, rotations, densities, size, center):
    """Reference geometry and culling, kernel records and tile boxes.

    Returns (setup, params [C, 12], box [C, 8] int32)."""
    with jax.default_matmul_precision("highest"):  # GPU f32 dots default to TF32 (see kernels/rasterize.py)
        s = vr.gaussian_setup(means, scales, rotations, densities, size, center, st.n, st.culling)
    zero = jnp.zeros_like(s.rho)
    params = jnp.concatenate([s.v, s.q, s.rho[:, None], zero[:, None], zero[:, None]], axis=-1)
    # gaussian_setup's 4³-block range lies inside the reference's 8³ tile box; round it out to 8³ tiles.
    ratio = VTILE // vr.BLOCK
    lo = s.block_lo // ratio
    hi = (s.block_lo + s.block_cnt + ratio - 1) // ratio
    keep = jnp.all(s.block_cnt > 0, axis=-1)
    zi = jnp.zeros_like(lo[:, :2])
    box = empty_boxes(jnp.concatenate([lo, hi, zi], axis=-1).astype(jnp.int32), keep)
    return s, params, box


def _voxel_boxes(s: vr.Setup) -> jax.Array:
    """Voxel box [C, 8] int32 (x0, y0, z0, x1, y1, z1, 0, 0), half-open, of each Gaussian: the voxels where the
    forward may add it. Empty (all 0) for culled, zero-density and below-threshold Gaussians.

    The forward adds Gaussian g at voxel x iff x lies in one of g's 8³ tiles and passes the keep rule (E ≤ 0,
    ρ exp(E) ≥ 1e-6). Its tiles are those meeting gaussian_setup's support box [lo, hi) = reference tile box ∩
    grid ∩ box of {ρ exp(E) ≥ 1e-6} (with float32 safety margins); the voxels of those tiles outside [lo, hi)
    fail the threshold (the reference path and the forward's choice of tiles rely on the same fact). So the
    forward's contributing voxels are exactly those of [lo, hi) that pass the keep rule.
    """
    keep = jnp.all(s.block_cnt > 0, axis=-1)
    zi = jnp.zeros_like(s.lo[:, :2])
    return empty_boxes(jnp.concatenate([s.lo, s.hi, zi], axis=-1).astype(jnp.int32), keep)


def _forward(st: _Static, means, scales, rotations, densities, size, center):
    c = means.shape[0]
    s, params, box = _setup(st, means, scales, rotations, densities, size, center)
    params = params[None]
    vbox = _voxel_boxes(s)[None]  # the scatter forward's and the backward's boxes
    if st.forward == "scatter":
        vol = _scatter_op(st, c)(params, vbox)
    else:
        tstart, gids = bin_tiles(box[None], tile_grid=_tiles(st.n), capacity=st.capacity)
        vol = _render_op(st, c)(params, box[None], tstart, gids)
    return vol[0], (s, params, vbox)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _voxelize(st: _Static, means, scales, rotations, densities, size, center):
    return _forward(st, means, scales, rotations, densities, size, center)[0]


def _voxelize_fwd(st, means, scales, rotations, densities, size, center):
    vol, res = _forward(st, means, scales, rotations, densities, size, center)
    return vol, (res, scales, rotations, size, center)


def _voxelize_bwd(st, res, cot):
    (s, params, vbox), scales, rotations, size, center = res
    mom = _moments_op(st, params.shape[1])(params, vbox, cot.astype(jnp.float32)[None])[0]
    s0 = mom[:, 0]
    s1 = mom[:, 1:4]  # Σ Gg δ
    s2 = mom[:, 4:10]  # Σ Gg δδᵀ (xx, xy, xz, yy, yz, zz)
    rho = s.rho
    # §7.4: ∂L/∂Q_aa = −½ρ Σ Gg δ_a², ∂L/∂Q_ab = −ρ Σ Gg δ_a δ_b (shared symmetric slot), ∂L/∂v = −ρ Q Σ Gg δ.
    g_q6 = -rho[:, None] * s2 * jnp.asarray([0.5, 1.0, 1.0, 0.5, 1.0, 0.5], jnp.float32)
    d_v = -rho[:, None] * jnp.sum(vr._full(s.q) * s1[:, None, :], axis=-1)  # Q Σ Gg δ, elementwise (no TF32)
    # Q = cof/det → Σ_v (guarded 1/det²) → Σ → (s, q), exactly the reference path's chain.
    h = size / jnp.asarray(st.n, jnp.float32)
    g_q = vr._full(g_q6 * jnp.asarray([1.0, 0.5, 0.5, 1.0, 0.5, 1.0], jnp.float32))
    cof = vr._full(s.cof)
    inv_det2 = 1.0 / (s.det * s.det + vr.DET_EPS)
    with jax.default_matmul_precision("highest"):
        g_cov_v = -(cof @ g_q @ cof) * inv_det2[:, None, None]
        g_cov = g_cov_v / (h[:, None] * h[None, :])
        _, cov_vjp = jax.vjp(covariance, scales, rotations)
        d_s, d_r = cov_vjp(g_cov)
    d_m = d_v / h if st.mean_grad == "true" else d_v * h
    return d_m, d_s, d_r, s0, jnp.zeros_like(size), jnp.zeros_like(center)


_voxelize.defvjp(_voxelize_fwd, _voxelize_bwd)


# ------------------------------------------------------------------------------------------- public
def voxelize_points(means, scales, rotations, densities, grid, *, culling: str = "extent", mean_grad: str = "true",
                    pair_capacity: Optional[int] = None, debug_poison: bool = False,
                    forward: str = "auto") -> jax.Array:
    """Voxelize activated Gaussians with the Triton kernels; same contract as `x2gs_jax.render.voxelize_points`.

    Args:
      means [C, 3], scales [C, 3], rotations [C, 4] (w, x, y, z; used as given), densities [C] (float32,
        world units; 0 on inactive slots). grid: `x2gs_jax.render.voxelize.Grid`.
      culling: "extent" ([R2]) or "center" ([X2]); mean_grad: "true" or "reference_h2" (§7.4 bug).
      pair_capacity: (Gaussian, 8³ tile) slots (default 32 per Gaussian); only the speed depends on it: tiles
        whose pairs do not fit test every Gaussian instead (exact, slow).
      debug_poison: start the volume buffer as NaN (tests: every voxel must be written; tile forward only, the
        scatter forward starts from a zeroed buffer).
      forward: "tiles", "scatter" or "auto" (scatter for grids of at most SCATTER_MAX_VOXELS voxels); see
        FORWARD_MODES. Both give the reference's values; scatter's summation order is not fixed.
    Returns:
      volume [nx, ny, nz] float32; differentiable w.r.t. the four Gaussian inputs (grid: zero cotangent).
    """
    if culling not in CULLING_MODES:
        raise ValueError(f"voxelize_points: culling must be one of {CULLING_MODES}, got {culling!r}")
    if mean_grad not in MEAN_GRAD_MODES:
        raise ValueError(f"voxelize_points: mean_grad must be one of {MEAN_GRAD_MODES}, got {mean_grad!r}")
    if forward not in FORWARD_MODES:
        raise ValueError(f"voxelize_points: forward must be one of {FORWARD_MODES}, got {forward!r}")
    means = jnp.asarray(means, jnp.float32)
    if means.ndim != 2 or means.shape[1] != 3:
        raise ValueError(f"voxelize_points: means must have shape [C, 3], got {means.shape}")
    n = tuple(int(v) for v in grid.n)
    c = means.shape[0]
    if c == 0:
        return jnp.zeros(n, jnp.float32)
    ga, gb, gc = _tiles(n)
    n_tiles = ga * gb * gc
    capacity = (default_capacity(c, n_tiles, PAIRS_PER_GAUSSIAN) if pair_capacity is None
                else int(pair_capacity))
    if forward == "auto":
        forward = "scatter" if n[0] * n[1] * n[2] <= SCATTER_MAX_VOXELS else "tiles"
    st = _Static(n, culling, mean_grad, capacity, bool(debug_poison), forward)
    return _voxelize(st, means, jnp.asarray(scales, jnp.float32), jnp.asarray(rotations, jnp.float32),
                     jnp.asarray(densities, jnp.float32), jnp.asarray(grid.size, jnp.float32),
                     jnp.asarray(grid.center, jnp.float32))
