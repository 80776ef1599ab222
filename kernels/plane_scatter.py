"""HexPlane plane gradient on the GPU: the backward scatter-add of bilinear sampling as one Triton kernel.

The plane gradient of `x2gs_jax.fields.hexplane.sample_plane` adds each point's cotangent row (C features),
times its four bilinear weights, into four rows of the plane's [R_b·R_a, C] table. XLA's generic scatter
emitter ran these adds at ~6 G floats/s on an H200 (the X2 fine stage's bottleneck); here one program adds
BLOCK points' rows with vectorised relaxed atomics. Float sums in a different order: results agree with the
XLA scatter to rounding (order-dependent, as any atomic accumulation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._launch import launch, merge_batch

BLOCK = 64  # points per program


def scatter_rows(idx: jax.Array, w: jax.Array, g: jax.Array, n_rows: int) -> jax.Array:
    """Σ_k Σ_n w[k, n] · g[n] added at row idx[k, n] of a zero [n_rows, C] table.

    Args: idx [4, N] int32 rows in [0, n_rows); w [4, N] float32; g [N, C] float32. Returns [n_rows, C] float32.
    Works under jax.vmap (batch axes are folded into the launch grid).
    """
    from kernels import plane_kernels as pk  # lazy: imports triton

    n, c = g.shape
    cp = 1 << max(0, (int(c) - 1).bit_length())
    n_rows = int(n_rows)

    def run(idx, w, g):
        b = g.shape[0]
        (out,) = launch(pk.plane_scatter_kernel, (-(-n // BLOCK), b),
                        [jax.ShapeDtypeStruct((b, n_rows, c), jnp.float32)], idx, w, g, scalars=(n, n_rows),
                        zeroed=(0,), C=c, CP=cp, BLOCK=BLOCK)
        return out

    if n == 0:
        return jnp.zeros((n_rows, c), jnp.float32)
    return merge_batch(run)(idx.astype(jnp.int32)[None], w.astype(jnp.float32)[None],
                            g.astype(jnp.float32)[None])[0]
