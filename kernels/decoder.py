"""The deformation decoder's heads on the GPU as one fused Triton kernel forward and two backward.

`decoder_heads(params, features)` = the "dx", "ds", "dr" outputs of `x2gs_jax.fields.decoder.DeformationDecoder`
(depth 1: trunk Linear(F, W), then per head Linear(W, W) → ReLU → Linear(W, k) on ReLU(h)). Why: as XLA ops the
decoder of the X2 fine step is seven GEMMs forward, their transposes backward and a dozen elementwise / bias
reductions over [2·C, 64] activations (H200, 200k Gaussians, 256²: ~1.8 ms of the 8.6 ms of kernels per step,
`bench/profile_step.py`); every activation is written and read back. Here the forward reads the features once
and writes [M, 16] outputs; the backward recomputes the activations from the features in registers (kernel 1:
the heads' gradients and d loss / d h, [M, W]; kernel 2: the trunk's gradients and d loss / d features), so no
[M, W] activation is saved between forward and backward.

The weights are packed here (plain JAX, differentiable): the heads' first layers side by side [W, H] (zero
columns up to a power of two), their output layers as one block-diagonal [H, 16] matrix. The trunk output h
("hidden", used by PhysX-Boosted's uncertainty head) is not a kernel output: `decode` computes it as its own
x·W0 + b0, which XLA removes when nothing reads it.
Float sums in another order than XLA's GEMMs, at TF32 on a GPU (XLA's default float32 GEMM precision there).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.linalg import block_diag

from kernels._launch import launch, merge_batch, on_gpu

BM = 32  # rows per block
OUT = 16  # the heads' outputs padded to one tl.dot tile
PROGRAMS = 264  # persistent programs per batch element (2 per H200 SM); fewer when there are fewer blocks
NUM_WARPS = 4  # forward
BWD_WARPS = 8  # backward: the weight-gradient accumulators ([W, H] + [H, 16] + [FP, W] floats) live in registers


def _pow2(c: int) -> int:
    return 1 << max(0, (int(c) - 1).bit_length())


def _meta(f: int, w: int, h: int, m: int, p: int) -> dict:
    return dict(F=f, FP=_pow2(f), W=w, H=h, BM=BM, ITERS=_iters(m, p), PREC="tf32" if on_gpu() else "ieee")


def _programs(m: int) -> int:
    return max(1, min(PROGRAMS, -(-m // BM)))


def _iters(m: int, p: int) -> int:
    """Row blocks per program (a constexpr: one Triton binary per capacity, as XLA's one program per capacity)."""
    return -(-(-(-m // BM)) // p)


def _forward(x, w0, b0, w1, b1, w3, b3):
    from kernels import decoder_kernels as dk  # lazy: imports triton

    m, f = (int(s) for s in x.shape)
    w, h = (int(s) for s in w1.shape)
    if m == 0:
        return jnp.zeros((0, OUT), jnp.float32)
    p = _programs(m)

    def run(x, w0, b0, w1, b1, w3, b3):
        nb = x.shape[0]
        (z,) = launch(dk.decoder_fwd_kernel, (p, nb), [jax.ShapeDtypeStruct((nb, m, OUT), jnp.float32)],
                      x, w0[0], b0[0], w1[0], b1[0], w3[0], b3[0], scalars=(m, p), num_warps=NUM_WARPS,
                      O=OUT, **_meta(f, w, h, m, p))
        return z

    return merge_batch(run)(*(a[None] for a in (x, w0, b0, w1, b1, w3, b3)))[0]


def _backward(res, gz):
    from kernels import decoder_kernels as dk  # lazy: imports triton

    x, w0, b0, w1, b1, w3, b3 = res
    m, f = (int(s) for s in x.shape)
    w, h = (int(s) for s in w1.shape)
    if m == 0:
        return tuple(jnp.zeros_like(a) for a in res)
    p = _programs(m)
    meta = _meta(f, w, h, m, p)

    def run(x, w0, b0, w1, b1, w3, gz):
        nb = x.shape[0]
        shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
                  ((nb, m, w), (nb, p, w, h), (nb, p, h), (nb, p, h, OUT), (nb, p, OUT))]
        gh, dw1, db1, dw3, db3 = launch(dk.decoder_bwd_heads_kernel, (p, nb), shapes, x, w0[0], b0[0], w1[0], b1[0],
                                        w3[0], gz, scalars=(m, p), num_warps=BWD_WARPS, O=OUT, **meta)
        shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
                  ((nb, m, f), (nb, p, meta["FP"], w), (nb, p, w))]
        trunk = {k: v for k, v in meta.items() if k != "H"}
        gx, dw0, db0 = launch(dk.decoder_bwd_trunk_kernel, (p, nb), shapes, x, w0[0], gh, scalars=(m, p),
                              num_warps=BWD_WARPS, **trunk)
        # The programs' partial sums; rows of dw0 past F are the zero padding of the feature tile.
        return gx, dw0.sum(1)[:, :f], db0.sum(1), dw1.sum(1), db1.sum(1), dw3.sum(1), db3.sum(1)

    # Inside merge_batch every input carries the batch axis; the weights are broadcast (they are small).
    outs = merge_batch(run)(*(a[None] for a in (x, w0, b0, w1, b1, w3, gz)))
    return tuple(o[0] for o in outs)


@jax.custom_vjp
def _heads(x, w0, b0, w1, b1, w3, b3):
    return _forward(x, w0, b0, w1, b1, w3, b3)


def _heads_fwd(x, w0, b0, w1, b1, w3, b3):
    res = (x, w0, b0, w1, b1, w3, b3)
    return _forward(*res), res  # the activations are recomputed in the backward


def _heads_bwd(res, gz):
    return _backward(res, gz.astype(jnp.float32))


_heads.defvjp(_heads_fwd, _heads_bwd)


def pack(params, heads: Sequence[tuple]) -> tuple:
    """(w0 [F, W], b0 [W], w1 [W, H], b1 [H], w3 [H, 16], b3 [16]) from the decoder's parameter dict: the heads'
    first layers side by side and zero-padded to H = a power of two, their output layers block-diagonal, padded."""
    first = [params[f"{name}_1"] for name, _, _ in heads]
    last = [params[f"{name}_3"] for name, _, _ in heads]
    w1 = jnp.concatenate([q["kernel"] for q in first], axis=1)
    b1 = jnp.concatenate([q["bias"] for q in first])
    w3 = block_diag(*[q["kernel"] for q in last])
    b3 = jnp.concatenate([q["bias"] for q in last])
    hp = _pow2(w1.shape[1])
    w1 = jnp.pad(w1, ((0, 0), (0, hp - w1.shape[1])))
    b1 = jnp.pad(b1, (0, hp - b1.shape[0]))
    w3 = jnp.pad(w3, ((0, hp - w3.shape[0]), (0, OUT - w3.shape[1])))
    b3 = jnp.pad(b3, (0, OUT - b3.shape[0]))
    t0 = params["feature_out_0"]
    return tuple(jnp.asarray(a, jnp.float32) for a in (t0["kernel"], t0["bias"], w1, b1, w3, b3))


def supported(params, heads: Sequence[tuple], depth: int) -> bool:
    """Whether the fused kernels implement this decoder: depth 1, a power-of-two trunk width ≥ 16, ≤ 16 outputs."""
    w = int(params["feature_out_0"]["kernel"].shape[1])
    return depth == 1 and w >= 16 and w == _pow2(w) and sum(k for _, _, k in heads) <= OUT


def decode(params, features: jax.Array, heads: Sequence[tuple]) -> dict:
    """`DeformationDecoder(depth=1).apply({"params": params}, features)` through the fused kernels.

    Args:
      params: the module's parameter dict (feature_out_0, {head}_1, {head}_3).
      features: [N, F] float32 HexPlane features (any N ≥ 0; works under jax.vmap).
      heads: the module's heads ((name, key, k), ...), Σ k ≤ 16.
    Returns {"hidden": [N, W], key: [N, k] per head}, differentiable w.r.t. params and features (custom VJP).
    """
    if not supported(params, heads, 1):
        raise ValueError("kernels.decoder.decode: the fused decoder takes depth 1, a power-of-two width >= 16 and "
                         f"<= {OUT} outputs in all")
    x = jnp.asarray(features, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"kernels.decoder.decode: features must be [N, F], got {x.shape}")
    w0, b0, w1, b1, w3, b3 = pack(params, heads)
    z = _heads(x, w0, b0, w1, b1, w3, b3)
    out = {"hidden": x @ w0 + b0}  # removed by XLA unless read (PhysX-Boosted's uncertainty head)
    col = 0
    for _, key, k in heads:
        out[key] = z[:, col:col + k]
        col += k
    return out
