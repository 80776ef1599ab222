"""Reference (pure-JAX) voxelizer backend with a custom VJP (rasterizer.md §7; public API in voxelize.py).

Scheme (exact, memory-bounded, no capacity to guess). Space is cut into 4^3-voxel blocks; each block
lies inside one of the reference's 8^3 tiles, so the reference tile mask is a per-block property. A
Gaussian gets the blocks that (a) lie inside its tile box (the reference support) and (b) meet the
axis-aligned bounding box of the ellipsoid {rho exp(E) >= 1e-6} (outside it every voxel is skipped by
the 1e-6 threshold anyway, so (b) only removes work). The (Gaussian, block) pairs are numbered
Gaussian-major through an exclusive cumsum of per-Gaussian block counts; a `lax.while_loop` walks
them `chunk_pairs` at a time, evaluates the 64 voxels of each pair with the exact skip rules and
scatter-adds whole 64-voxel rows into a block-major volume. The backward pass walks the same pairs,
gathers the cotangent rows, reduces each pair's 64 voxels to 10 moments (one small matmul) and
scatter-adds the per-pair (rho, Q, v) gradients per Gaussian; the per-Gaussian chain Q -> Sigma_v -> Sigma -> (s, q) and v -> m is vectorised outside the loop.

Memory: the volume plus ~10 temporaries of [chunk_pairs, 64] float32, whatever the Gaussian count.
The only failure mode is an int32 overflow of the pair count (> 2^31 pairs), reported as a NaN volume.
Limitation: for extremely ill-conditioned covariances (condition number >~1e5) the float32 bounding
box can miss voxels whose value is ~1e-6 (at the threshold), i.e. errors of ~1e-6 absolute.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from x2gs_jax.gaussians import covariance
from x2gs_jax.mathutil import mm

# Reference constants (rasterizer.md §8).
TILE = 8  # voxel tile edge of the reference kernel
ALPHA_MIN = 1e-6  # voxel skip threshold on rho exp(E)
DET_EPS = 1e-7  # backward guard: 1/det^2 evaluated as 1/(det^2 + 1e-7)
# Implementation constants.
BLOCK = 4  # evaluation block edge (divides TILE, so a block never straddles two tiles)
DEFAULT_CHUNK_PAIRS = 8192
_BBOX_REL_MARGIN = 1e-2  # safety margins on the ellipsoid box (float32 Q is not exactly Sigma_v^-1)
_BBOX_ABS_MARGIN = 0.05  # voxels
_LOG_ALPHA_MIN = float(np.log(ALPHA_MIN))
# Voxel offsets from the block centre, u in {-1.5, -0.5, 0.5, 1.5}^3, and their quadratic features
# F(u) = (1, u_x, u_y, u_z, u_x^2, u_y^2, u_z^2, u_x u_y, u_x u_z, u_y u_z): the backward's per-pair voxel sums
# of w delta_a and w delta_a delta_b (delta = c - u) follow from the moments sum w F(u), one [K, 64] x [64, 10] product.
_U = np.stack(np.meshgrid(*(np.arange(BLOCK) - (BLOCK - 1) / 2,) * 3, indexing="ij"), -1).reshape(-1, 3)
_FEATURES = np.stack([np.ones(len(_U)), _U[:, 0], _U[:, 1], _U[:, 2], _U[:, 0] ** 2, _U[:, 1] ** 2, _U[:, 2] ** 2,
                      _U[:, 0] * _U[:, 1], _U[:, 0] * _U[:, 2], _U[:, 1] * _U[:, 2]], -1).astype(np.float32)  # [64, 10]
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on GPUs


class Setup(NamedTuple):
    """Per-Gaussian quantities in voxel units (C Gaussians)."""

    v: jax.Array  # [C, 3] centre in voxel units
    q: jax.Array  # [C, 6] Q = Sigma_v^-1 (xx, xy, xz, yy, yz, zz)
    cof: jax.Array  # [C, 6] cofactors of Sigma_v (same order)
    det: jax.Array  # [C] det Sigma_v
    rho: jax.Array  # [C] density (0 when culled)
    block_lo: jax.Array  # [C, 3] int32 first block index per axis
    block_cnt: jax.Array  # [C, 3] int32 number of blocks per axis (all 0 when culled)
    start: jax.Array  # [C] int32 first pair index of each Gaussian
    ends: jax.Array  # [C] int32 one past its last pair index
    total: jax.Array  # [] int32 number of pairs
    overflow: jax.Array  # [] bool, pair count exceeds int32
    lo: jax.Array  # [C, 3] int32 first voxel of the support box (tile box ∩ grid ∩ {ρ exp(E) ≥ 1e-6}) per axis
    hi: jax.Array  # [C, 3] int32 one past its last voxel (meaningful where block_cnt > 0)


def _sym6(m: jax.Array) -> jax.Array:
    """[..., 3, 3] symmetric -> [..., 6] (xx, xy, xz, yy, yz, zz)."""
    return jnp.stack([m[..., 0, 0], m[..., 0, 1], m[..., 0, 2], m[..., 1, 1], m[..., 1, 2], m[..., 2, 2]], -1)


def _full(s: jax.Array) -> jax.Array:
    """[..., 6] -> symmetric [..., 3, 3]."""
    xx, xy, xz, yy, yz, zz = (s[..., i] for i in range(6))
    return jnp.stack([jnp.stack([xx, xy, xz], -1), jnp.stack([xy, yy, yz], -1), jnp.stack([xz, yz, zz], -1)], -2)


def _cofactors(s: jax.Array):
    """Cofactors [..., 6] and determinant [...] of symmetric 3x3 matrices given as [..., 6] (explicit expansion)."""
    xx, xy, xz, yy, yz, zz = (s[..., i] for i in range(6))
    cof = jnp.stack([yy * zz - yz * yz, xz * yz - xy * zz, xy * yz - yy * xz,
                     xx * zz - xz * xz, xy * xz - xx * yz, xx * yy - xy * xy], -1)
    det = xx * cof[..., 0] + xy * cof[..., 1] + xz * cof[..., 2]
    return cof, det


def gaussian_setup(means, scales, rotations, densities, size, center, n: tuple, culling: str) -> Setup:
    """Voxel-unit geometry, reference culling and the (Gaussian, block) pair numbering.

    Args: means/scales [C, 3], rotations [C, 4], densities [C] (float32, world units); size/center [3];
    n static (nx, ny, nz); culling "extent" or "center".
    """
    n_f = jnp.asarray(n, jnp.float32)
    h = size / n_f
    v = (means - (center - 0.5 * size)) / h
    cov_v = _sym6(covariance(scales, rotations) / (h[:, None] * h[None, :]))
    cof, det = _cofactors(cov_v)
    safe_det = jnp.where(det == 0, 1.0, det)
    q = cof / safe_det[:, None]

    # Radius (voxels) and culling, rasterizer.md §7.2 / §7.3.
    if culling == "extent":
        r = jnp.ceil(3.0 * jnp.max(scales, axis=-1, keepdims=True) / h)  # [C, 3]
        culled = jnp.any((v + r < 0) | (v - r > n_f), axis=-1)
    else:
        r = jnp.ceil(3.0 * jnp.max(scales / h, axis=-1, keepdims=True)) * jnp.ones((1, 3), jnp.float32)
        culled = jnp.any((v < 0) | (v > n_f), axis=-1)
    n_tiles = jnp.asarray([-(-a // TILE) for a in n], jnp.float32)
    tile_lo = jnp.clip(jnp.trunc((v - r) / TILE), 0, n_tiles)
    tile_hi = jnp.clip(jnp.trunc((v + r + (TILE - 1)) / TILE), 0, n_tiles)
    culled = culled | jnp.any(tile_hi <= tile_lo, axis=-1) | (det == 0)
    finite = jnp.all(jnp.isfinite(v), -1) & jnp.all(jnp.isfinite(q), -1) & jnp.isfinite(densities)
    culled = culled | ~finite

    # Bounding box of {rho exp(E) >= ALPHA_MIN}: |delta_a| <= sqrt(2 ln(rho/ALPHA_MIN) Sigma_v,aa).
    log_ratio = jnp.log(jnp.maximum(densities, 1e-30)) - _LOG_ALPHA_MIN
    reach = densities >= ALPHA_MIN  # below it every voxel is skipped
    diag = jnp.stack([cov_v[:, 0], cov_v[:, 3], cov_v[:, 5]], -1)
    half = jnp.sqrt(2.0 * jnp.maximum(log_ratio, 0.0)[:, None] * jnp.maximum(diag, 0.0))
    half = half * (1.0 + _BBOX_REL_MARGIN) + _BBOX_ABS_MARGIN
    # Voxel i (centre i + 1/2) is inside when |i + 1/2 - v| <= half.
    lo = jnp.maximum(TILE * tile_lo, jnp.ceil(v - 0.5 - half))
    hi = jnp.minimum(jnp.minimum(TILE * tile_hi, n_f), jnp.floor(v - 0.5 + half) + 1.0)
    lo = jnp.clip(jnp.nan_to_num(lo), 0, n_f).astype(jnp.int32)
    hi = jnp.clip(jnp.nan_to_num(hi), 0, n_f).astype(jnp.int32)
    keep = ~culled & reach & jnp.all(hi > lo, axis=-1)
    block_lo = lo // BLOCK
    block_cnt = jnp.where(keep[:, None], (hi + BLOCK - 1) // BLOCK - block_lo, 0)

    count = block_cnt[:, 0] * block_cnt[:, 1] * block_cnt[:, 2]  # <= (n/4)^3 each: fits int32
    total_f = jnp.sum(count.astype(jnp.float32))
    overflow = total_f > 2.0 ** 31 - 2.0 ** 25  # float32 sum is approximate: keep a margin
    ends = jnp.cumsum(count)
    start = ends - count
    rho = jnp.where(keep, densities, 0.0)
    total = jnp.where(overflow, 0, ends[-1]) if count.shape[0] else jnp.int32(0)
    return Setup(v, q, cof, det, rho, block_lo, block_cnt, start, ends, total.astype(jnp.int32), overflow, lo, hi)


@partial(jax.jit, static_argnames=("n", "culling"))
def pair_count(means, scales, rotations, densities, size, center, *, n: tuple, culling: str) -> jax.Array:
    """Number of (Gaussian, block) pairs (int32 []), -1 when it overflows int32."""
    st = gaussian_setup(means, scales, rotations, densities, size, center, n, culling)
    return jnp.where(st.overflow, -1, st.total)


def _pair_geometry(st: Setup, p: jax.Array, n_blocks: tuple):
    """For pair indices p [K]: Gaussian id [K], validity [K], block id [K] and c = v - block centre [K, 3]."""
    c = st.v.shape[0]
    valid = p < st.total
    g = jnp.minimum(jnp.searchsorted(st.ends, p, side="right"), c - 1)
    local = p - st.start[g]
    cnt = jnp.maximum(st.block_cnt[g], 1)
    plane = cnt[:, 1] * cnt[:, 2]
    bx = local // plane
    rem = local - bx * plane
    by = rem // cnt[:, 2]
    bz = rem - by * cnt[:, 2]
    blk = st.block_lo[g] + jnp.stack([bx, by, bz], -1)  # [K, 3]
    nb = jnp.asarray(n_blocks, jnp.int32)
    blk = jnp.clip(blk, 0, nb - 1)  # only matters for invalid pairs (their contribution is masked)
    bid = (blk[:, 0] * n_blocks[1] + blk[:, 1]) * n_blocks[2] + blk[:, 2]
    rel = st.v[g] - (blk.astype(jnp.float32) * BLOCK + BLOCK / 2)
    return g, valid, bid, rel


def _contrib(st: Setup, p: jax.Array, n_blocks: tuple):
    """Per-pair voxel terms for pair indices p [K]: (g, bid, c [K, 3], q [K, 6], G = exp(E) [K, 64], keep [K, 64])."""
    g, valid, bid, c = _pair_geometry(st, p, n_blocks)
    q = st.q[g]
    # E per voxel from delta = c - u directly (as the kernel does): exactly 0 at delta = 0 and never > 0 for a
    # positive-definite Q, so the reference's "skip if E > 0" rule keeps its meaning (an expanded quadratic
    # form can round to tiny positive values next to the centre).
    d = c[:, None, :] - jnp.asarray(_U, jnp.float32)  # [K, 64, 3]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    qq = [q[:, i:i + 1] for i in range(6)]
    e = (-0.5 * (qq[0] * dx * dx + qq[3] * dy * dy + qq[5] * dz * dz)
         - (qq[1] * dx * dy + qq[2] * dx * dz + qq[4] * dy * dz))  # [K, 64]
    gauss = jnp.exp(e)
    keep = valid[:, None] & (e <= 0) & (st.rho[g][:, None] * gauss >= ALPHA_MIN)
    return g, bid, c, q, gauss, keep


def _n_blocks(n: tuple) -> tuple:
    return tuple(-(-a // BLOCK) for a in n)


def _forward_volume(st: Setup, n: tuple, chunk: int) -> jax.Array:
    nb = _n_blocks(n)
    n_chunks = (st.total + chunk - 1) // chunk
    ar = jnp.arange(chunk, dtype=jnp.int32)

    def body(carry):
        j, vol = carry
        g, bid, _, _, gauss, keep = _contrib(st, j * chunk + ar, nb)
        vals = jnp.where(keep, st.rho[g][:, None] * gauss, 0.0)
        return j + 1, vol.at[bid].add(vals)

    vol0 = jnp.zeros((nb[0] * nb[1] * nb[2], BLOCK ** 3), jnp.float32)
    _, vol = jax.lax.while_loop(lambda cr: cr[0] < n_chunks, body, (jnp.int32(0), vol0))
    vol = vol.reshape(nb + (BLOCK,) * 3).transpose(0, 3, 1, 4, 2, 5)
    vol = vol.reshape(nb[0] * BLOCK, nb[1] * BLOCK, nb[2] * BLOCK)[: n[0], : n[1], : n[2]]
    return jnp.where(st.overflow, jnp.nan, vol)


def _pair_grads(st: Setup, cot_blocks: jax.Array, n: tuple, chunk: int) -> jax.Array:
    """Per-Gaussian sums [C, 10] = (dL/drho, dL/dQ (xx, xy, xz, yy, yz, zz; off-diagonals w.r.t. the shared
    symmetric entry), dL/dv (3)) over all contributing voxels (rasterizer.md §7.4).

    With delta = c - u per voxel and w = rho G dL/dvol: sum w delta_a delta_b and sum w delta_a follow from the
    moments M = sum w F(u) (one matmul per chunk): sum w delta_a = c_a M_1 - M_a,
    sum w delta_a delta_b = c_a c_b M_1 - c_a M_b - c_b M_a + M_ab.
    """
    nb = _n_blocks(n)
    n_g = st.v.shape[0]
    n_chunks = (st.total + chunk - 1) // chunk
    ar = jnp.arange(chunk, dtype=jnp.int32)
    feats = jnp.asarray(_FEATURES)

    def body(carry):
        j, acc = carry
        g, bid, c, q, gauss, keep = _contrib(st, j * chunk + ar, nb)
        up = jnp.where(keep, cot_blocks[bid], 0.0)  # dL/dvol, 0 where skipped
        gg = gauss * up  # dL/drho per voxel
        mom = jnp.matmul(st.rho[g][:, None] * gg, feats, precision=_HIGHEST)  # [K, 10]
        m0 = mom[:, 0:1]
        m1 = mom[:, 1:4]  # sum w u_a
        m2 = mom[:, 4:10]  # sum w (u_x^2, u_y^2, u_z^2, u_x u_y, u_x u_z, u_y u_z)
        sd = c * m0 - m1  # sum w delta_a

        def sdd(a, b, m_ab):
            return c[:, a] * c[:, b] * m0[:, 0] - c[:, a] * m1[:, b] - c[:, b] * m1[:, a] + m_ab

        xx, xy, xz, yy, yz, zz = (q[:, i] for i in range(6))
        sums = jnp.stack([
            jnp.sum(gg, axis=1),
            -0.5 * sdd(0, 0, m2[:, 0]), -sdd(0, 1, m2[:, 3]), -sdd(0, 2, m2[:, 4]),
            -0.5 * sdd(1, 1, m2[:, 1]), -sdd(1, 2, m2[:, 5]), -0.5 * sdd(2, 2, m2[:, 2]),
            -(xx * sd[:, 0] + xy * sd[:, 1] + xz * sd[:, 2]),
            -(xy * sd[:, 0] + yy * sd[:, 1] + yz * sd[:, 2]),
            -(xz * sd[:, 0] + yz * sd[:, 1] + zz * sd[:, 2]),
        ], -1)  # [K, 10]
        return j + 1, acc.at[g].add(sums, indices_are_sorted=True)

    acc0 = jnp.zeros((n_g, 10), jnp.float32)
    _, acc = jax.lax.while_loop(lambda cr: cr[0] < n_chunks, body, (jnp.int32(0), acc0))
    return acc


def _blocks_of(vol: jax.Array, n: tuple) -> jax.Array:
    """[nx, ny, nz] -> block-major [n_blocks, 64] (zero padded)."""
    nb = _n_blocks(n)
    pad = [(0, b * BLOCK - a) for a, b in zip(n, nb)]
    v = jnp.pad(vol, pad).reshape(nb[0], BLOCK, nb[1], BLOCK, nb[2], BLOCK).transpose(0, 2, 4, 1, 3, 5)
    return v.reshape(-1, BLOCK ** 3)


@partial(jax.jit, static_argnames=("n", "culling", "mean_grad", "chunk_pairs"))
def voxelize_reference(means, scales, rotations, densities, size, center, *, n: tuple, culling: str,
                       mean_grad: str, chunk_pairs: int) -> jax.Array:
    """Reference voxelizer: volume [nx, ny, nz] float32 (see voxelize.voxelize_points for the contract).

    Differentiable (custom VJP) w.r.t. means, scales, rotations, densities; size/center get zero cotangents.
    """

    if means.shape[0] == 0:
        return jnp.zeros(n, jnp.float32)

    @jax.custom_vjp
    def vox(m, s, r, rho, sz, ct):
        return _forward_volume(gaussian_setup(m, s, r, rho, sz, ct, n, culling), n, chunk_pairs)

    def vox_fwd(m, s, r, rho, sz, ct):
        st = gaussian_setup(m, s, r, rho, sz, ct, n, culling)
        return _forward_volume(st, n, chunk_pairs), (st, s, r, sz, ct)

    def vox_bwd(res, cot):
        st, s, r, sz, ct = res
        h = sz / jnp.asarray(n, jnp.float32)
        acc = _pair_grads(st, _blocks_of(cot, n), n, chunk_pairs)
        d_rho = acc[:, 0]
        # dL/dQ as a full matrix with independent slots: off-diagonal shared-entry gradients split in two.
        g_q = _full(acc[:, 1:7] * jnp.asarray([1.0, 0.5, 0.5, 1.0, 0.5, 1.0], jnp.float32))
        # Q = cof / det  =>  dL/dSigma_v = -cof G_Q cof / det^2, with the reference's guard on 1/det^2.
        cof = _full(st.cof)
        inv_det2 = 1.0 / (st.det * st.det + DET_EPS)
        g_cov_v = -mm(mm(cof, g_q), cof) * inv_det2[:, None, None]
        g_cov = g_cov_v / (h[:, None] * h[None, :])  # Sigma_v = H^-1 Sigma H^-1
        _, cov_vjp = jax.vjp(covariance, s, r)
        d_s, d_r = cov_vjp(g_cov)
        d_v = acc[:, 7:10]
        # v = (m - origin) / h: the true gradient divides by h; the reference multiplies (h^2 x true).
        d_m = d_v / h if mean_grad == "true" else d_v * h
        return d_m, d_s, d_r, d_rho, jnp.zeros_like(sz), jnp.zeros_like(ct)

    vox.defvjp(vox_fwd, vox_bwd)
    return vox(means, scales, rotations, densities, size, center)
