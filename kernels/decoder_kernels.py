"""Triton kernels of the fused deformation decoder (kernels/decoder.py): one MLP trunk layer and three heads.

  h = x·W0 + b0 [BM, W];  y = relu(h)·W1 + b1 [BM, H];  z = relu(y)·W3 + b3 [BM, O]

Layouts (B = batch, M = rows, F = features, FP = F rounded up to a power of two, W = trunk width, H = the heads'
first layers side by side (zero columns pad it to a power of two), O = the heads' outputs side by side (padded to
16: tl.dot tiles are at least 16 wide); every matrix row-major, float32):
  x [B, M, F]; w0 [F, W]; b0 [W]; w1 [W, H]; b1 [H]; w3 [H, O] (block diagonal: head k's rows only feed its
  columns; the padding is zero); b3 [O]; z / gz [B, M, O]; gh [B, M, W]; gx [B, M, F].
Every kernel is persistent: grid (P, B), program p walks the row blocks p, p + P, ... (ITERS, a constexpr: Triton's
interpreter cannot range() over a runtime bound; the last ones possibly past M: masked) of batch element b and sums
the weight gradients in registers over its blocks; each program writes its partial sums to row p of a [B, P, ...]
output (summed by the caller: no atomics, deterministic).
PREC: tl.dot's input precision ("tf32" on a GPU, as XLA's default float32 GEMMs there; "ieee" in the interpreter).
"""
from kernels._launch import prepare_triton

prepare_triton()  # CPU: Triton's interpreter (tests); must precede the triton import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _mat(ptr, R: tl.constexpr, C: tl.constexpr, RP: tl.constexpr):
    """A row-major [R, C] matrix as an [RP, C] tile (rows past R read as 0)."""
    r = tl.arange(0, RP)
    c = tl.arange(0, C)
    return tl.load(ptr + r[:, None] * C + c[None, :], mask=(r < R)[:, None], other=0.0)


@triton.jit
def _weights(w0_ptr, w1_ptr, w3_ptr, b0_ptr, b1_ptr, F: tl.constexpr, FP: tl.constexpr, W: tl.constexpr,
             H: tl.constexpr, O: tl.constexpr):
    """The packed weights and the first two biases. Loaded inside the row loop (L1/L2 hits after the first block),
    not once before it: ~28k floats held across the loop would take most of a program's registers."""
    return (_mat(w0_ptr, F, W, FP), _mat(w1_ptr, W, H, W), _mat(w3_ptr, H, O, H), tl.load(b0_ptr + tl.arange(0, W)),
            tl.load(b1_ptr + tl.arange(0, H)))


@triton.jit
def _row_block(xb, pid, i, P, M, F: tl.constexpr, FP: tl.constexpr, BM: tl.constexpr):
    """Block i of program pid's rows: (ok [BM], rows as int64 [BM, 1], x [BM, FP] with zeros past M and F)."""
    rows = (pid + i * P) * BM + tl.arange(0, BM)
    ok = rows < M
    r64 = rows.to(tl.int64)[:, None]
    fc = tl.arange(0, FP)
    x = tl.load(xb + r64 * F + fc[None, :], mask=ok[:, None] & (fc < F)[None, :], other=0.0)
    return ok, r64, x


@triton.jit
def decoder_fwd_kernel(x_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w3_ptr, b3_ptr, M, P, z_ptr,
                       F: tl.constexpr, FP: tl.constexpr, W: tl.constexpr, H: tl.constexpr, O: tl.constexpr,
                       BM: tl.constexpr, ITERS: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # batch offsets in int64: B·M·F may exceed int32
    oc = tl.arange(0, O)
    xb = x_ptr + b * M * F
    zb = z_ptr + b * M * O
    for i in range(0, ITERS):  # ITERS = cdiv(cdiv(M, BM), P): blocks past the last are fully masked
        ok, r64, x = _row_block(xb, pid, i, P, M, F, FP, BM)
        w0, w1, w3, b0, b1 = _weights(w0_ptr, w1_ptr, w3_ptr, b0_ptr, b1_ptr, F, FP, W, H, O)
        b3 = tl.load(b3_ptr + oc)
        h = tl.dot(x, w0, input_precision=PREC) + b0[None, :]
        y = tl.dot(tl.maximum(h, 0.0), w1, input_precision=PREC) + b1[None, :]
        z = tl.dot(tl.maximum(y, 0.0), w3, input_precision=PREC) + b3[None, :]
        tl.store(zb + r64 * O + oc[None, :], z, mask=ok[:, None])


@triton.jit
def decoder_bwd_heads_kernel(x_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w3_ptr, gz_ptr, M, P,
                             gh_ptr, dw1_ptr, db1_ptr, dw3_ptr, db3_ptr,
                             F: tl.constexpr, FP: tl.constexpr, W: tl.constexpr, H: tl.constexpr, O: tl.constexpr,
                             BM: tl.constexpr, ITERS: tl.constexpr, PREC: tl.constexpr):
    """Recomputes h and y, writes gh = d loss / d h (through the heads only) and the heads' weight gradients."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    wc = tl.arange(0, W)
    hc = tl.arange(0, H)
    oc = tl.arange(0, O)
    dw1 = tl.zeros((W, H), tl.float32)
    dw3 = tl.zeros((H, O), tl.float32)
    db1 = tl.zeros((H,), tl.float32)
    db3 = tl.zeros((O,), tl.float32)
    xb = x_ptr + b * M * F
    gzb = gz_ptr + b * M * O
    ghb = gh_ptr + b * M * W
    for i in range(0, ITERS):  # ITERS = cdiv(cdiv(M, BM), P): blocks past the last are fully masked
        ok, r64, x = _row_block(xb, pid, i, P, M, F, FP, BM)
        w0, w1, w3, b0, b1 = _weights(w0_ptr, w1_ptr, w3_ptr, b0_ptr, b1_ptr, F, FP, W, H, O)
        gz = tl.load(gzb + r64 * O + oc[None, :], mask=ok[:, None], other=0.0)  # rows past M add nothing
        h = tl.dot(x, w0, input_precision=PREC) + b0[None, :]
        a1 = tl.maximum(h, 0.0)
        y = tl.dot(a1, w1, input_precision=PREC) + b1[None, :]
        a2 = tl.maximum(y, 0.0)
        dw3 = tl.dot(tl.trans(a2), gz, dw3, input_precision=PREC)
        db3 += tl.sum(gz, axis=0)
        gy = tl.where(y > 0.0, tl.dot(gz, tl.trans(w3), input_precision=PREC), 0.0)
        dw1 = tl.dot(tl.trans(a1), gy, dw1, input_precision=PREC)
        db1 += tl.sum(gy, axis=0)
        gh = tl.where(h > 0.0, tl.dot(gy, tl.trans(w1), input_precision=PREC), 0.0)
        tl.store(ghb + r64 * W + wc[None, :], gh, mask=ok[:, None])
    part = b * P + pid  # this program's row of the [B, P, ...] partial sums
    tl.store(dw1_ptr + part * W * H + wc[:, None] * H + hc[None, :], dw1)
    tl.store(dw3_ptr + part * H * O + hc[:, None] * O + oc[None, :], dw3)
    tl.store(db1_ptr + part * H + hc, db1)
    tl.store(db3_ptr + part * O + oc, db3)


@triton.jit
def decoder_bwd_trunk_kernel(x_ptr, w0_ptr, gh_ptr, M, P, gx_ptr, dw0_ptr, db0_ptr,
                             F: tl.constexpr, FP: tl.constexpr, W: tl.constexpr, BM: tl.constexpr,
                             ITERS: tl.constexpr, PREC: tl.constexpr):
    """gx = gh·W0ᵀ and the trunk's weight gradients from gh (the total d loss / d h)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    fc = tl.arange(0, FP)
    wc = tl.arange(0, W)
    dw0 = tl.zeros((FP, W), tl.float32)
    db0 = tl.zeros((W,), tl.float32)
    xb = x_ptr + b * M * F
    ghb = gh_ptr + b * M * W
    gxb = gx_ptr + b * M * F
    for i in range(0, ITERS):  # ITERS = cdiv(cdiv(M, BM), P): blocks past the last are fully masked
        ok, r64, x = _row_block(xb, pid, i, P, M, F, FP, BM)
        gh = tl.load(ghb + r64 * W + wc[None, :], mask=ok[:, None], other=0.0)
        dw0 = tl.dot(tl.trans(x), gh, dw0, input_precision=PREC)
        db0 += tl.sum(gh, axis=0)
        gx = tl.dot(gh, tl.trans(_mat(w0_ptr, F, W, FP)), input_precision=PREC)
        tl.store(gxb + r64 * F + fc[None, :], gx, mask=ok[:, None] & (fc < F)[None, :])
    part = b * P + pid
    tl.store(dw0_ptr + part * FP * W + fc[:, None] * W + wc[None, :], dw0)
    tl.store(db0_ptr + part * W + wc, db0)
