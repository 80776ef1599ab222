"""Triton kernels of the voxelizer (rasterizer.md §7.2 step 4, §7.4), one program per (8³ tile, batch row).

Layouts (B = batch of Gaussian states, C = Gaussians, T = 8³ tiles, grid of tiles (GX, GY, GZ), P = pairs):
  params [B, C, 12] f32   (v_x, v_y, v_z, Q_xx, Q_xy, Q_xz, Q_yy, Q_yz, Q_zz, ρ, 0, 0): centre in voxel units,
                          Q = Σ_v⁻¹ (voxel units), density (0 when culled)
  box    [B, C, 8] int32  tile box (x0, y0, z0, x1, y1, z1, 0, 0) of the binning; empty = no pairs
  tstart [B, T·SUB + 1], gids [B, P] int32: the binning of kernels/binning.py (tile t: slots tstart[t·SUB] ..)
  volume [B, NX, NY, NZ] f32, flat index ((i·NY) + j)·NZ + k
Exactness: a tile whose slots run past P tests every Gaussian's box instead of its partial pair list.
All offsets are int32: B·NX·NY·NZ, B·C·12 and B·P must stay below 2³¹. INTERP: see raster_kernels.py.
"""
from kernels._launch import prepare_triton

prepare_triton()  # CPU: Triton's interpreter (tests); must precede the triton import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.split_kernels import split_range  # noqa: E402


@triton.jit
def _voxels(t, GY: tl.constexpr, GZ: tl.constexpr):
    """Voxel indices (i, j, k) [512] of tile t, z fastest (8 consecutive floats per row of the volume)."""
    lin = tl.arange(0, 512)
    i = (t // (GY * GZ)) * 8 + lin // 64
    j = ((t // GZ) % GY) * 8 + (lin // 8) % 8
    k = (t % GZ) * 8 + lin % 8
    return i, j, k


@triton.jit
def _params(params_ptr, b, g, ok, C):
    base = params_ptr + (b * C + g) * 12
    vx = tl.load(base + 0, mask=ok, other=0.0)
    vy = tl.load(base + 1, mask=ok, other=0.0)
    vz = tl.load(base + 2, mask=ok, other=0.0)
    qxx = tl.load(base + 3, mask=ok, other=0.0)
    qxy = tl.load(base + 4, mask=ok, other=0.0)
    qxz = tl.load(base + 5, mask=ok, other=0.0)
    qyy = tl.load(base + 6, mask=ok, other=0.0)
    qyz = tl.load(base + 7, mask=ok, other=0.0)
    qzz = tl.load(base + 8, mask=ok, other=0.0)
    rho = tl.load(base + 9, mask=ok, other=0.0)
    return vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho


@triton.jit
def _pairs(params_ptr, gid_ptr, b, k, end, C, P, BLOCK_G: tl.constexpr):
    j = k + tl.arange(0, BLOCK_G)
    ok = j < end
    g = tl.load(gid_ptr + b * P + j, mask=ok, other=0)
    vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = _params(params_ptr, b, g, ok, C)
    return ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho


@triton.jit
def _members(params_ptr, box_ptr, b, c0, cend, ta, tb, tc, C, BLOCK_G: tl.constexpr):
    """Fallback: Gaussians c0 .. c0+BLOCK_G−1 (below cend) whose tile box holds tile (ta, tb, tc)."""
    g = c0 + tl.arange(0, BLOCK_G)
    inb = g < cend
    base = box_ptr + (b * C + g) * 8
    ok = (inb & (tl.load(base + 0, mask=inb, other=0) <= ta) & (ta < tl.load(base + 3, mask=inb, other=0))
          & (tl.load(base + 1, mask=inb, other=0) <= tb) & (tb < tl.load(base + 4, mask=inb, other=0))
          & (tl.load(base + 2, mask=inb, other=0) <= tc) & (tc < tl.load(base + 5, mask=inb, other=0)))
    vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = _params(params_ptr, b, g, ok, C)
    return ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho


@triton.jit
def _fwd_eval(acc, ok, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho, cx, cy, cz):
    """acc [512, BLOCK_G] += [E ≤ 0][ρ exp(E) ≥ 1e-6] ρ exp(E) for the chunk's pairs (axis 1; voxels on axis 0
    so each thread loads few pair records; the pair sum is taken once after the loop)."""
    dx = vx[None, :] - cx[:, None]
    dy = vy[None, :] - cy[:, None]
    dz = vz[None, :] - cz[:, None]
    e = (-0.5 * (qxx[None, :] * dx * dx + qyy[None, :] * dy * dy + qzz[None, :] * dz * dz)
         - (qxy[None, :] * dx * dy + qxz[None, :] * dx * dz + qyz[None, :] * dy * dz))
    val = rho[None, :] * tl.exp(e)
    keep = ok[None, :] & (e <= 0.0) & (val >= 1e-6)
    return acc + tl.where(keep, val, 0.0)


@triton.jit
def voxel_fwd_kernel(params_ptr, box_ptr, tstart_ptr, gid_ptr, init_ptr, C, P, SPLIT, vol_ptr,
                     T: tl.constexpr, GY: tl.constexpr, GZ: tl.constexpr, NX: tl.constexpr, NY: tl.constexpr,
                     NZ: tl.constexpr, BLOCK_G: tl.constexpr, SUB: tl.constexpr, INTERP: tl.constexpr):
    """vol = Σ_pairs [E ≤ 0][ρ exp(E) ≥ 1e-6] ρ exp(E) over the tile's 512 voxels (§7.2); `init` aliases `vol`
    and is never read (every in-grid voxel is written). Next chunk prefetched as in raster_fwd_kernel."""
    t = tl.program_id(0) // SPLIT
    s = tl.program_id(0) % SPLIT
    b = tl.program_id(1)
    i, j, k = _voxels(t, GY, GZ)
    cx = i.to(tl.float32) + 0.5
    cy = j.to(tl.float32) + 0.5
    cz = k.to(tl.float32) + 0.5
    start = tl.load(tstart_ptr + b * (T * SUB + 1) + t * SUB)
    end = tl.load(tstart_ptr + b * (T * SUB + 1) + (t + 1) * SUB)
    acc = tl.zeros((512, BLOCK_G), dtype=tl.float32)
    if end <= P:
        lo, hi = split_range(start, end, s, SPLIT, BLOCK_G)
        ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = _pairs(params_ptr, gid_ptr, b, lo, hi, C, P,
                                                                     BLOCK_G)
        if INTERP:
            p = lo
            while p < hi:
                n = _pairs(params_ptr, gid_ptr, b, p + BLOCK_G, hi, C, P, BLOCK_G)
                acc = _fwd_eval(acc, ok, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho, cx, cy, cz)
                ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = n
                p += BLOCK_G
        else:
            for p in range(lo, hi, BLOCK_G):
                n = _pairs(params_ptr, gid_ptr, b, p + BLOCK_G, hi, C, P, BLOCK_G)
                acc = _fwd_eval(acc, ok, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho, cx, cy, cz)
                ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = n
    else:  # capacity overflow on this tile: test every Gaussian's box
        ta = t // (GY * GZ)
        tb = (t // GZ) % GY
        tc = t % GZ
        c_lo, c_hi = split_range(0, C, s, SPLIT, BLOCK_G)
        if INTERP:
            c0 = c_lo
            while c0 < c_hi:
                ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = _members(params_ptr, box_ptr, b, c0, c_hi, ta, tb,
                                                                               tc, C, BLOCK_G)
                acc = _fwd_eval(acc, ok, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho, cx, cy, cz)
                c0 += BLOCK_G
        else:
            for c0 in range(c_lo, c_hi, BLOCK_G):
                ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = _members(params_ptr, box_ptr, b, c0, c_hi, ta, tb,
                                                                               tc, C, BLOCK_G)
                acc = _fwd_eval(acc, ok, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho, cx, cy, cz)
    inside = (i < NX) & (j < NY) & (k < NZ)
    tl.store(vol_ptr + (b * SPLIT + s) * (NX * NY * NZ) + (i * NY + j) * NZ + k, tl.sum(acc, axis=1), mask=inside)


@triton.jit
def _bwd_eval(mom_ptr, b, ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho, cx, cy, cz, up, C):
    """Ten moments per pair (voxels on axis 0: per-pair sums stay inside threads), relaxed atomics into
    mom[b, g, 0:10]: Σ Gg, Σ Gg δ (x, y, z), Σ Gg δδᵀ (xx, xy, xz, yy, yz, zz)."""
    dx = vx[None, :] - cx[:, None]
    dy = vy[None, :] - cy[:, None]
    dz = vz[None, :] - cz[:, None]
    e = (-0.5 * (qxx[None, :] * dx * dx + qyy[None, :] * dy * dy + qzz[None, :] * dz * dz)
         - (qxy[None, :] * dx * dy + qxz[None, :] * dx * dz + qyz[None, :] * dy * dz))
    gauss = tl.exp(e)
    keep = ok[None, :] & (e <= 0.0) & (rho[None, :] * gauss >= 1e-6)
    gg = tl.where(keep, gauss * up[:, None], 0.0)
    gx = gg * dx
    gy = gg * dy
    gz = gg * dz
    out = mom_ptr + (b * C + g) * 16
    tl.atomic_add(out + 0, tl.sum(gg, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 1, tl.sum(gx, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 2, tl.sum(gy, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 3, tl.sum(gz, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 4, tl.sum(gx * dx, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 5, tl.sum(gx * dy, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 6, tl.sum(gx * dz, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 7, tl.sum(gy * dy, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 8, tl.sum(gy * dz, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 9, tl.sum(gz * dz, axis=0), mask=ok, sem="relaxed")


@triton.jit
def voxel_bwd_kernel(params_ptr, box_ptr, tstart_ptr, gid_ptr, cot_ptr, C, P, SPLIT, mom_ptr,
                     T: tl.constexpr, GY: tl.constexpr, GZ: tl.constexpr, NX: tl.constexpr, NY: tl.constexpr,
                     NZ: tl.constexpr, BLOCK_G: tl.constexpr, SUB: tl.constexpr, INTERP: tl.constexpr):
    """Per pair, the ten moments of the cotangent-weighted Gaussian over the tile's contributing voxels
    (G = exp(E), g = ∂L/∂vol), added into mom[b, g, 0:10] (zeroed before); §7.4's sums are linear in them."""
    t = tl.program_id(0) // SPLIT
    s = tl.program_id(0) % SPLIT
    b = tl.program_id(1)
    i, j, k = _voxels(t, GY, GZ)
    cx = i.to(tl.float32) + 0.5
    cy = j.to(tl.float32) + 0.5
    cz = k.to(tl.float32) + 0.5
    inside = (i < NX) & (j < NY) & (k < NZ)
    up = tl.load(cot_ptr + b * (NX * NY * NZ) + (i * NY + j) * NZ + k, mask=inside, other=0.0)
    start = tl.load(tstart_ptr + b * (T * SUB + 1) + t * SUB)
    end = tl.load(tstart_ptr + b * (T * SUB + 1) + (t + 1) * SUB)
    if end <= P:
        lo, hi = split_range(start, end, s, SPLIT, BLOCK_G)
        ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = _pairs(params_ptr, gid_ptr, b, lo, hi, C, P,
                                                                     BLOCK_G)
        if INTERP:
            p = lo
            while p < hi:
                n = _pairs(params_ptr, gid_ptr, b, p + BLOCK_G, hi, C, P, BLOCK_G)
                _bwd_eval(mom_ptr, b, ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho, cx, cy, cz, up, C)
                ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = n
                p += BLOCK_G
        else:
            for p in range(lo, hi, BLOCK_G):
                n = _pairs(params_ptr, gid_ptr, b, p + BLOCK_G, hi, C, P, BLOCK_G)
                _bwd_eval(mom_ptr, b, ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho, cx, cy, cz, up, C)
                ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = n
    else:
        ta = t // (GY * GZ)
        tb = (t // GZ) % GY
        tc = t % GZ
        c_lo, c_hi = split_range(0, C, s, SPLIT, BLOCK_G)
        if INTERP:
            c0 = c_lo
            while c0 < c_hi:
                ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = _members(params_ptr, box_ptr, b, c0, c_hi, ta, tb,
                                                                               tc, C, BLOCK_G)
                _bwd_eval(mom_ptr, b, ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho, cx, cy, cz, up, C)
                c0 += BLOCK_G
        else:
            for c0 in range(c_lo, c_hi, BLOCK_G):
                ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho = _members(params_ptr, box_ptr, b, c0, c_hi, ta, tb,
                                                                               tc, C, BLOCK_G)
                _bwd_eval(mom_ptr, b, ok, g, vx, vy, vz, qxx, qxy, qxz, qyy, qyz, qzz, rho, cx, cy, cz, up, C)
