"""Triton kernel of the HexPlane plane-gradient scatter (kernels/plane_scatter.py).

Layouts (B = batch, N = points, R = plane cells R_b·R_a, C = features, CP = C rounded up to a power of two):
  idx [B, 4, N] int32 (corner rows), w [B, 4, N] float32 (bilinear weights), g [B, N, C] float32 (cotangent)
  out [B, R, C] float32, zeroed; out[b, idx[b,k,n], :] += w[b,k,n] · g[b,n,:] for every corner k and point n.
One program adds BLOCK points' four corner rows with vectorised relaxed atomics (C contiguous floats per row).
"""
from kernels._launch import prepare_triton

prepare_triton()  # CPU: Triton's interpreter (tests); must precede the triton import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def plane_scatter_kernel(idx_ptr, w_ptr, g_ptr, N, R, out_ptr, C: tl.constexpr, CP: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    pts = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, CP)
    ok = pts < N
    ok2 = ok[:, None] & (cols[None, :] < C)
    g = tl.load(g_ptr + b * (N * C) + pts[:, None] * C + cols[None, :], mask=ok2, other=0.0)
    for k in tl.static_range(4):
        row = tl.load(idx_ptr + b * (4 * N) + k * N + pts, mask=ok, other=0)
        w = tl.load(w_ptr + b * (4 * N) + k * N + pts, mask=ok, other=0.0)
        tl.atomic_add(out_ptr + b * (R * C) + row[:, None] * C + cols[None, :], g * w[:, None], mask=ok2,
                      sem="relaxed")
