"""Triton kernels of the HexPlane field's spatial product (kernels/field.py).

One level's spatial part: S[n, :] = s_xy(n) · s_xz(n) · s_yz(n), each s a bilinear sample [C] of one plane at the
point's grid coordinates, with `x2gs_jax.fields.hexplane._axis_lookup`'s semantics (align_corners=True, border
clamp, i0 in [0, size-2], frac = pos - i0, coordinate derivative zero where the clamp is active).

Layouts (B = batch, N = points, C = features, CP = C rounded up to a power of two; sizes are the level's):
  t_xy [B, R_y·R_x, C], t_xz [B, R_z·R_x, C], t_yz [B, R_z·R_y, C] float32: plane (a, b) as a row-major table,
      row = j·R_a + i (j along b, i along a), so each corner is C contiguous floats (one coalesced row).
  g [B, N, 3] float32: grid coordinates (x, y, z) in [-1, 1] (clamped outside).
  forward:  out [B, N, C] float32 = S (every element of the N rows written).
  backward: ds [B, N, C] float32 cotangent of S;
            d_xy / d_xz / d_yz [B, R, C] float32, zeroed: Σ_n w_k(n) · cot_plane(n) added into each point's four
              corner rows (relaxed atomics), cot_plane = ds · (product of the other two samples);
            dg [B, N, 3] float32: coordinate gradient (every element of the N rows written).
One program handles BLOCK points × C channels of one batch element (grid = (cdiv(N, BLOCK), B)); N, R_x, R_y, R_z
are runtime int32 scalars so capacity changes re-use the compiled binary.
"""
from kernels._launch import prepare_triton

prepare_triton()  # CPU: Triton's interpreter (tests); must precede the triton import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _axis(g, size):
    """(i0 int32 in [0, size-2], frac, d_pos/d_g) of coordinates g [BLOCK] along an axis of `size` nodes.

    Float32 operations in `_axis_lookup`'s order, so the weights agree to the bit with the pure-JAX path. The
    clamps are written as `where` so a NaN coordinate stays NaN (a NaN sample, as in JAX); the integer clamp keeps
    its corner reads in bounds."""
    sf = size.to(tl.float32)
    scale = 0.5 * (sf - 1.0)
    raw = (g + 1.0) * scale
    pos = tl.where(raw < 0.0, 0.0, raw)
    pos = tl.where(pos > sf - 1.0, sf - 1.0, pos)
    i0f = tl.floor(pos)
    i0f = tl.where(i0f < 0.0, 0.0, i0f)
    i0f = tl.where(i0f > sf - 2.0, sf - 2.0, i0f)  # i0+1 stays a valid node; at the last node frac = 1
    frac = pos - i0f
    dpos = tl.where((raw > 0.0) & (raw < sf - 1.0), scale, 0.0)  # strictly inside only (PyTorch's rule)
    # NaN → node 0 before the cast (a NaN float→int conversion is undefined), then clamp in integer space.
    i0 = tl.minimum(tl.maximum(tl.where(i0f == i0f, i0f, 0.0).to(tl.int32), 0), size - 2)
    return i0, frac, dpos


@triton.jit
def _corners(tab, i0, j0, ra, cols, ok2, C: tl.constexpr):
    """The four corner rows [BLOCK, CP] (j0,i0) (j0,i0+1) (j0+1,i0) (j0+1,i0+1) of a table and their offsets."""
    off = (j0 * ra + i0)[:, None] * C + cols[None, :]
    p00 = tl.load(tab + off, mask=ok2, other=0.0)
    p01 = tl.load(tab + off + C, mask=ok2, other=0.0)
    p10 = tl.load(tab + off + ra * C, mask=ok2, other=0.0)
    p11 = tl.load(tab + off + ra * C + C, mask=ok2, other=0.0)
    return p00, p01, p10, p11, off


@triton.jit
def _sample(tab, i0, j0, fi, fj, ra, cols, ok2, C: tl.constexpr):
    """Bilinear sample [BLOCK, CP], in `_sample_fwd`'s operation order."""
    p00, p01, p10, p11, _ = _corners(tab, i0, j0, ra, cols, ok2, C)
    fi2 = fi[:, None]
    fj2 = fj[:, None]
    return (1.0 - fj2) * ((1.0 - fi2) * p00 + fi2 * p01) + fj2 * ((1.0 - fi2) * p10 + fi2 * p11)


@triton.jit
def _plane_bwd(tab, dtab, i0, j0, fi, fj, ra, cot, cols, ok2, C: tl.constexpr):
    """Scatter w_k · cot into the four corner rows of `dtab`; returns (d/d frac_i, d/d frac_j) [BLOCK].

    The corners are re-read here rather than kept from the samples' pass (12 [BLOCK, CP] tiles would not fit in
    registers); the second read of the same rows hits the cache."""
    p00, p01, p10, p11, off = _corners(tab, i0, j0, ra, cols, ok2, C)
    fi2 = fi[:, None]
    fj2 = fj[:, None]
    d_fi = tl.sum(cot * ((1.0 - fj2) * (p01 - p00) + fj2 * (p11 - p10)), axis=1)
    d_fj = tl.sum(cot * ((1.0 - fi2) * (p10 - p00) + fi2 * (p11 - p01)), axis=1)
    tl.atomic_add(dtab + off, cot * ((1.0 - fi2) * (1.0 - fj2)), mask=ok2, sem="relaxed")
    tl.atomic_add(dtab + off + C, cot * (fi2 * (1.0 - fj2)), mask=ok2, sem="relaxed")
    tl.atomic_add(dtab + off + ra * C, cot * ((1.0 - fi2) * fj2), mask=ok2, sem="relaxed")
    tl.atomic_add(dtab + off + ra * C + C, cot * (fi2 * fj2), mask=ok2, sem="relaxed")
    return d_fi, d_fj


@triton.jit
def spatial_fwd_kernel(xy_ptr, xz_ptr, yz_ptr, g_ptr, N, RX, RY, RZ, out_ptr, C: tl.constexpr, CP: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # batch offsets in int64: B·R·C may exceed int32
    pts = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, CP)
    ok = pts < N
    ok2 = ok[:, None] & (cols[None, :] < C)
    gb = g_ptr + b * N * 3
    ix, fx, _ = _axis(tl.load(gb + pts * 3, mask=ok, other=0.0), RX)
    iy, fy, _ = _axis(tl.load(gb + pts * 3 + 1, mask=ok, other=0.0), RY)
    iz, fz, _ = _axis(tl.load(gb + pts * 3 + 2, mask=ok, other=0.0), RZ)
    s = _sample(xy_ptr + b * (RY * RX * C), ix, iy, fx, fy, RX, cols, ok2, C)
    s = s * _sample(xz_ptr + b * (RZ * RX * C), ix, iz, fx, fz, RX, cols, ok2, C)
    s = s * _sample(yz_ptr + b * (RZ * RY * C), iy, iz, fy, fz, RY, cols, ok2, C)
    tl.store(out_ptr + b * N * C + pts[:, None] * C + cols[None, :], s, mask=ok2)


@triton.jit
def spatial_bwd_kernel(xy_ptr, xz_ptr, yz_ptr, g_ptr, ds_ptr, N, RX, RY, RZ, dxy_ptr, dxz_ptr, dyz_ptr, dg_ptr,
                       C: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pts = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, CP)
    ok = pts < N
    ok2 = ok[:, None] & (cols[None, :] < C)
    gb = g_ptr + b * N * 3
    ix, fx, dx = _axis(tl.load(gb + pts * 3, mask=ok, other=0.0), RX)
    iy, fy, dy = _axis(tl.load(gb + pts * 3 + 1, mask=ok, other=0.0), RY)
    iz, fz, dz = _axis(tl.load(gb + pts * 3 + 2, mask=ok, other=0.0), RZ)
    o_xy = b * (RY * RX * C)
    o_xz = b * (RZ * RX * C)
    o_yz = b * (RZ * RY * C)
    s_xy = _sample(xy_ptr + o_xy, ix, iy, fx, fy, RX, cols, ok2, C)
    s_xz = _sample(xz_ptr + o_xz, ix, iz, fx, fz, RX, cols, ok2, C)
    s_yz = _sample(yz_ptr + o_yz, iy, iz, fy, fz, RY, cols, ok2, C)
    ds = tl.load(ds_ptr + b * N * C + pts[:, None] * C + cols[None, :], mask=ok2, other=0.0)  # 0 off the mask
    # Cotangent of each sample: ds times the other two samples (no division: samples may be 0).
    fxa, fya = _plane_bwd(xy_ptr + o_xy, dxy_ptr + o_xy, ix, iy, fx, fy, RX, ds * (s_xz * s_yz), cols, ok2, C)
    fxb, fzb = _plane_bwd(xz_ptr + o_xz, dxz_ptr + o_xz, ix, iz, fx, fz, RX, ds * (s_xy * s_yz), cols, ok2, C)
    fyc, fzc = _plane_bwd(yz_ptr + o_yz, dyz_ptr + o_yz, iy, iz, fy, fz, RY, ds * (s_xy * s_xz), cols, ok2, C)
    # Each axis is used by two planes: d g = Σ d_frac · d_pos/d_g over them (as `_sample_bwd` per plane).
    dgb = dg_ptr + b * N * 3
    tl.store(dgb + pts * 3, fxa * dx + fxb * dx, mask=ok)
    tl.store(dgb + pts * 3 + 1, fya * dy + fyc * dy, mask=ok)
    tl.store(dgb + pts * 3 + 2, fzb * dz + fzc * dz, mask=ok)
