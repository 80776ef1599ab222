"""Triton helper shared by the rasterizer and voxelizer kernels: splitting a tile's pair range over programs."""
from kernels._launch import prepare_triton

prepare_triton()  # CPU: Triton's interpreter (tests); must precede the triton import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def split_range(start, end, s, SPLIT, BLOCK_G: tl.constexpr):
    """Part s of SPLIT of the slot range [start, end): contiguous, a multiple of BLOCK_G long (the last may be
    shorter or empty). Splitting a tile's pairs over several programs keeps the GPU busy when there are few
    tiles (small detectors, the 32³ TV patch) and each holds many pairs."""
    per = ((end - start + SPLIT - 1) // SPLIT + BLOCK_G - 1) // BLOCK_G * BLOCK_G
    lo = start + s * per
    return lo, tl.minimum(end, lo + per)
