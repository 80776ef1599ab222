"""Triton kernel of the time planes' line gradient (kernels/line.py), segmented over points sorted by column.

  out[b, i, :] = Σ_n ((1 - fi[b,n])·[i == i0[b,n]] + fi[b,n]·[i == i0[b,n] + 1]) · g[b, n, :]

Layouts (B = batch, N = points, R = line nodes R_a, C = features, CP = C rounded up to a power of two):
  perm [B, N] int32: a permutation of the points, ideally sorted by column (argsort of u): the kernel is correct
      for any permutation, the order only decides how many adds stay local;
  i0 [B, N] int32: left node of each point, in [0, R-2] (original point order);
  fi [B, N] float32: weight of the right node (original order); g [B, N, C] float32: cotangent (original order);
  out [B, R, C] float32, zeroed (accumulated with relaxed atomics).
DOT (constexpr): each sub-block's local sums as one tl.dot of the transposed weights [S, SUB] with the rows
[SUB, CP] at PREC ("tf32x3" on a GPU: three TF32 tensor-core products, float32 accuracy) instead of a [SUB, S, CP]
multiply reduced over SUB (a cross-thread reduction per sub-block); S, SUB, CP >= 16 then (tl.dot tiles).
One program takes CHUNK consecutive sorted positions of one batch element (grid = (cdiv(N, CHUNK), B)) and walks
them in sub-blocks of SUB points: it gathers n = perm[k], i0[n], fi[n] and the row g[n, :] (C contiguous floats),
and adds both corners into S local row accumulators relative to c0, the column of the chunk's first point. A
corner whose relative row falls outside [0, S) (a sparse region: the chunk spans many columns; or an unsorted
perm) goes straight to `out` with relaxed atomics. At the end the program adds its touched accumulator rows to
out[c0 + s]. Sorted, a chunk spans few columns, so almost every add is local and ~N/CHUNK·S row atomics remain,
instead of the N·R_a multiply-adds of a dense one-hot product or the N contended rows of a plain scatter.
"""
from kernels._launch import prepare_triton

prepare_triton()  # CPU: Triton's interpreter (tests); must precede the triton import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def line_grad_kernel(perm_ptr, i0_ptr, fi_ptr, g_ptr, N, R, out_ptr, C: tl.constexpr, CP: tl.constexpr,
                     CHUNK: tl.constexpr, SUB: tl.constexpr, S: tl.constexpr, DOT: tl.constexpr,
                     PREC: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # batch offsets in int64: B·N·C may exceed int32
    start = pid * CHUNK
    cols = tl.arange(0, CP)
    rows = tl.arange(0, S)
    cok = cols < C
    pb = perm_ptr + b * N
    ib = i0_ptr + b * N
    fb = fi_ptr + b * N
    gb = g_ptr + b * N * C
    ob = out_ptr + b * R * C
    c0 = tl.load(ib + tl.load(pb + start))  # start < N: the grid has cdiv(N, CHUNK) programs
    acc = tl.zeros((S, CP), tl.float32)
    hi = c0 * 0 - 1  # largest local row touched so far (-1: none)
    for k0 in range(0, CHUNK, SUB):
        k = start + k0 + tl.arange(0, SUB)
        ok = k < N  # ragged last chunk
        n = tl.load(pb + k, mask=ok, other=0)
        col = tl.load(ib + n, mask=ok, other=0)
        f = tl.load(fb + n, mask=ok, other=0.0)
        gr = tl.load(gb + n.to(tl.int64)[:, None] * C + cols[None, :], mask=ok[:, None] & cok[None, :], other=0.0)
        w0 = 1.0 - f
        r = col - c0
        near0 = ok & (r >= 0) & (r < S)
        near1 = ok & (r + 1 >= 0) & (r + 1 < S)
        if DOT:  # the weights transposed [S, SUB] times the rows [SUB, CP] (S, SUB, CP >= 16), at PREC
            wt = (tl.where(near0[None, :] & (rows[:, None] == r[None, :]), w0[None, :], 0.0)
                  + tl.where(near1[None, :] & (rows[:, None] == r[None, :] + 1), f[None, :], 0.0))
            acc = tl.dot(wt, gr, acc, input_precision=PREC)
        else:  # [SUB, S] weights of each point on each local row, one [SUB, S, CP] multiply-add reduced over SUB
            w = (tl.where(near0[:, None] & (rows[None, :] == r[:, None]), w0[:, None], 0.0)
                 + tl.where(near1[:, None] & (rows[None, :] == r[:, None] + 1), f[:, None], 0.0))
            acc += tl.sum(w[:, :, None] * gr[:, None, :], axis=0)
        hi = tl.maximum(hi, tl.max(tl.where(near1, r + 1, tl.where(near0, r, -1)), axis=0))
        far0 = ok & ((r < 0) | (r >= S))  # the complements of near0 / near1 among valid points
        far1 = ok & ((r + 1 < 0) | (r + 1 >= S))
        if tl.sum((far0 | far1).to(tl.int32), axis=0) > 0:  # uniform branch: dense regions skip the atomics
            dst = ob + col[:, None] * C + cols[None, :]
            tl.atomic_add(dst, gr * w0[:, None], mask=far0[:, None] & cok[None, :], sem="relaxed")
            tl.atomic_add(dst + C, gr * f[:, None], mask=far1[:, None] & cok[None, :], sem="relaxed")
    dest = c0 + rows
    keep = (rows <= hi) & (dest < R)
    tl.atomic_add(ob + dest[:, None] * C + cols[None, :], acc, mask=keep[:, None] & cok[None, :], sem="relaxed")
