"""Public X-ray Gaussian rasterizer entry points and backend dispatch (rasterizer.md §3-§6).

Backends share one signature and one semantics:
  * "reference": `x2gs_jax.render.rasterize_ref` (pure JAX, CPU/GPU).
  * "triton": `kernels.rasterize.rasterize_points(means, scales, rotations, densities, camera, *, ndc_offset,
    max_pairs) -> (image, RenderAux)`, imported lazily (GPU only).
  * "auto": "triton" when a GPU is the default JAX backend and `kernels.rasterize` imports, else "reference".
"""
from __future__ import annotations

import importlib
from typing import Optional

import jax
import jax.numpy as jnp

from x2gs_jax.render.rasterize_ref import RenderAux, rasterize_points_ref

BACKENDS = ("auto", "reference", "triton")


def _load_triton():
    """The Triton backend module, or raise a RuntimeError saying why it is unavailable."""
    try:
        return importlib.import_module("kernels.rasterize")
    except ImportError as err:
        raise RuntimeError(f"rasterizer backend 'triton' is unavailable: cannot import kernels.rasterize ({err})") from err


def resolve_backend(backend: str) -> str:
    """Map a backend name to "reference" or "triton" (decided at trace time; the device is static)."""
    if backend not in BACKENDS:
        raise ValueError(f"rasterizer backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if jax.default_backend() != "gpu":
        return "reference"
    try:
        _load_triton()
    except RuntimeError:
        return "reference"
    return "triton"


def rasterize_points(means: jax.Array, scales: jax.Array, rotations: jax.Array, densities: jax.Array, camera, *,
                     ndc_offset: Optional[jax.Array] = None, backend: str = "auto",
                     max_pairs: Optional[int] = None):
    """Render one X-ray projection of activated Gaussians.

    Args:
      means: [C, 3] world centres (world units).
      scales: [C, 3] activated std-devs (world units, > 0).
      rotations: [C, 4] quaternions (w, x, y, z), used as given (normalise before calling, like the kernel).
      densities: [C] activated densities ρ ≥ 0 (0 for inactive slots: no contribution, zero gradient).
      camera: `x2gs_jax.geometry.Camera` for one view (use `jax.vmap` over a batched Camera for several).
      ndc_offset: optional [C, 2] zeros; ∂L/∂ndc_offset is the screen-space (NDC) mean gradient of §6.3.
      backend: "auto", "reference" or "triton".
      max_pairs: None = exact (every (Gaussian, tile) pair rendered, also under jit for the reference backend);
        an int = static work cap, `aux.overflow` is True when more pairs were needed (size it with `count_pairs`
        and `pair_capacity`, re-jit when overflow is reported).
    Returns:
      image [H, W] float32 (line integrals, row 0 = top), aux `RenderAux` (radii [C] int32, overflow, num_pairs).
    Differentiable w.r.t. means, scales, rotations, densities and ndc_offset with the reference backward (§6).
    """
    chosen = resolve_backend(backend)
    if chosen == "triton":
        return _load_triton().rasterize_points(means, scales, rotations, densities, camera,
                                               ndc_offset=ndc_offset, max_pairs=max_pairs)
    return rasterize_points_ref(means, scales, rotations, densities, camera, ndc_offset=ndc_offset,
                                max_pairs=max_pairs)


def rasterize(gaussians, camera, *, backend: str = "auto", ndc_offset: Optional[jax.Array] = None,
              return_aux: bool = False, max_pairs: Optional[int] = None):
    """Render a `Gaussians` pytree (raw parameters) for one camera.

    Activates the parameters (xyz, scale activation, normalised rotation, softplus density with 0 on inactive
    slots) and calls `rasterize_points`. Inactive slots report radius 0.
    Returns image [H, W] float32, or (image, RenderAux) with `return_aux=True`.
    """
    image, aux = rasterize_points(gaussians.get_xyz(), gaussians.get_scale(), gaussians.get_rotation(),
                                  gaussians.get_density(), camera, ndc_offset=ndc_offset, backend=backend,
                                  max_pairs=max_pairs)
    aux = aux._replace(radii=jnp.where(gaussians.active, aux.radii, 0))
    return (image, aux) if return_aux else image
