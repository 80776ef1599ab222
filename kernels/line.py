"""Line gradient of a time plane sampled at one time (`x2gs_jax.fields.hexplane.sample_time_plane`) on the GPU.

The backward pass of a 1-D linear lookup of N points in a line [R_a, C] adds each point's cotangent row, times
(1 - fi) and fi, into its two nodes i0 and i0 + 1:

  d_line[i, :] = Σ_n ((1 - fi_n)·[i == i0_n] + fi_n·[i == i0_n + 1]) · g[n, :]

The pure path computes this as a dense one-hot product [R_a, N] x [N, C] (float32 HIGHEST: CUDA-core FMAs),
R_a / 2 times the necessary work, the largest item of the training step on an H200. A plain scatter-add would
instead put N / R_a points on every row (heavy atomic contention). Here the points are visited in column order
(a sort by u), so each program's chunk of points spans a few columns and sums them in local accumulators; only
~N / CHUNK · S row atomics remain (kernels/line_kernels.py). Float sums in a different order: the result agrees
with the one-hot product to rounding (order-dependent, as any atomic accumulation).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from kernels._launch import launch, merge_batch, on_gpu

CHUNK = 256  # sorted points per program
SUB = 32  # points per sub-block (one [SUB, S, CP] multiply-add tile)
S = 8  # local row accumulators per program (columns spanned by a chunk; the rest go to atomics)
NUM_WARPS = 4
# X2GS_LINE_KERNEL (read at trace time): "dot" (default) = each sub-block's local sums as a tl.dot [S, SUB] x
# [SUB, CP] at "tf32x3" (float32 accuracy on tensor cores); "reduce" = a [SUB, S, CP] multiply-reduce. H200,
# 2026-12-04, default field, 200k points: field forward + backward 3.26 -> 2.61 ms, X2 fine step 13.51 -> 12.16 ms/it
# (BENCHMARKS.md, Training, item 7).
DOT_S = 16  # tl.dot tiles are at least 16 x 16


def _pow2(c: int) -> int:
    return 1 << max(0, (int(c) - 1).bit_length())


def line_gradient(perm: jax.Array, i0: jax.Array, fi: jax.Array, g: jax.Array, n_cols: int) -> jax.Array:
    """d_line [n_cols, C] float32 = Σ_n ((1 - fi_n)·onehot(i0_n) + fi_n·onehot(i0_n + 1)) ⊗ g[n].

    Args:
      perm: [N] int32, the point order to walk (`jnp.argsort(u)`: sorted by column); any permutation of
        range(N) gives the same sums, the sort only makes them local (fast).
      i0: [N] int32 left node of each point, in [0, n_cols - 2] (`hexplane._axis_lookup`), original order.
      fi: [N] float32 weight of the right node i0 + 1, original order.
      g: [N, C] float32 cotangent of the N samples, original order.
      n_cols: R_a >= 2, the number of line nodes.
    Works under jax.vmap (typically g batched over times, perm / i0 / fi not: merge_batch broadcasts them, they
    are small); N may be 0.
    """
    from kernels import line_kernels as lk  # lazy: imports triton

    n, c = (int(s) for s in g.shape)
    n_cols = int(n_cols)
    if n == 0:  # an empty grid cannot produce the (non-empty) output; nothing to add
        return jnp.zeros((n_cols, c), jnp.float32)

    variant = os.environ.get("X2GS_LINE_KERNEL", "dot")
    if variant not in ("reduce", "dot"):
        raise ValueError(f"X2GS_LINE_KERNEL={variant!r}: expected reduce or dot")

    dot = variant == "dot"
    sizes = dict(CP=max(16, _pow2(c)), S=DOT_S) if dot else dict(CP=_pow2(c), S=S)

    def run(perm, i0, fi, g):
        b = g.shape[0]
        (out,) = launch(lk.line_grad_kernel, (-(-n // CHUNK), b), [jax.ShapeDtypeStruct((b, n_cols, c), jnp.float32)],
                        perm, i0, fi, g, scalars=(n, n_cols), zeroed=(0,), num_warps=NUM_WARPS, C=c, CHUNK=CHUNK,
                        SUB=SUB, DOT=dot, PREC="tf32x3" if on_gpu() else "ieee", **sizes)
        return out

    return merge_batch(run)(perm.astype(jnp.int32)[None], i0.astype(jnp.int32)[None], fi.astype(jnp.float32)[None],
                            g.astype(jnp.float32)[None])[0]
