"""Exact float32 small matrix products.

On GPUs XLA computes float32 matmuls in TF32 (~1e-3 relative error) unless told otherwise, which breaks
parity with the reference at the 1e-4 level. The products here are tiny (3x3, 4x4, points x 3), so they
are written as elementwise products and a sum: exact float32 everywhere, and fused by XLA.
"""
import jax.numpy as jnp


def mm(a, b):
    """a [..., n, k] @ b [..., k, m] for small k, exact in float32."""
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def apply_rows(points, mat):
    """points [..., k] @ mat.T for mat [m, k] (row vectors transformed by a small matrix), exact in float32."""
    return jnp.sum(points[..., None, :] * mat, axis=-1)
