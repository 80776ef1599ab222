"""Triton GPU backend of the X-ray Gaussian rasterizer and voxelizer (launched through jax-triton).

Modules (import them explicitly; this package imports nothing heavy so `import kernels` works on a CPU):
  kernels.rasterize   rasterize_points(...) -> (image, RenderAux), the "triton" rasterizer backend
  kernels.voxelize    voxelize_points(...) -> volume, the "triton" voxelizer backend
  kernels.binning     static-capacity (Gaussian, tile) binning shared by both
  kernels._launch     jax-triton launch (GPU) / Triton-interpreter launch (CPU, tests only), vmap folding
The @triton.jit kernels live in raster_kernels.py and voxel_kernels.py and are imported lazily.
"""
