"""Voxelizer: Gaussians -> density volume on a regular grid (rasterizer.md §7, gaussians.md §5/§7).

    vol(x) = sum_i rho_i exp(-1/2 (x - m_i)^T Sigma_i^-1 (x - m_i))      at every voxel centre x

with the reference's support rules (a Gaussian only touches the 8x8x8 voxel tiles inside its radius
box, and a voxel skips a Gaussian when E > 0 or rho exp(E) < 1e-6). Two culling rules exist:

  "extent" ([R2], default): per-axis radius r_a = ceil(3 max(s) / h_a); culled when, on any axis,
           v_a + r_a < 0 or v_a - r_a > n_a (v = centre in voxel units).
  "center" ([X2], what X2-Gaussian trains with): isotropic radius r = ceil(3 max_a(s_a / h_a));
           culled when the centre lies outside the grid on any axis (v_a < 0 or v_a > n_a).

Gradients come from a custom VJP (the analytic backward of rasterizer.md §7.4, including the
reference's 1/(det^2 + 1e-7) guard). By default the mean gradient is the TRUE one; the reference
returns h_a^2 times it (a bug, §7.4): `mean_grad="reference_h2"` reproduces that.

Backends: "reference" (pure JAX, this package, `voxelize_ref.py`), "triton" (the `kernels` package,
imported lazily), "auto" (triton on a GPU when importable, else reference).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from x2gs_jax.gaussians import Gaussians
from x2gs_jax.render import voxelize_ref

CULLING_MODES = ("extent", "center")
MEAN_GRAD_MODES = ("true", "reference_h2")
BACKENDS = ("auto", "reference", "triton")


def _is_concrete_container(x: Any) -> bool:
    """True for user-supplied Python/numpy values (converted in __post_init__), False for jax values/tracers
    and for the arbitrary placeholders jax may put in a pytree while (un)flattening."""
    return isinstance(x, (tuple, list, np.ndarray, float, int, np.floating, np.integer))


@struct.dataclass
class Grid:
    """A regular voxel grid (rasterizer.md §7.1), a pytree.

    Attributes:
      n: (nx, ny, nz) voxel counts, static (part of the tree structure; changing it recompiles).
      size: [3] float32, the grid's extent (sx, sy, sz) in world units (a leaf: may be traced).
      center: [3] float32, the grid's centre in world units (a leaf: a jitted step can move a TV
        patch without recompiling).

    Voxel (i, j, k) has its centre at center - size/2 + (i + 1/2, j + 1/2, k + 1/2) * h, h = size / n.
    """

    n: tuple = struct.field(pytree_node=False)
    size: jax.Array
    center: jax.Array

    def __post_init__(self):
        n = tuple(int(v) for v in np.asarray(self.n).reshape(-1))
        if len(n) != 3 or any(v <= 0 for v in n):
            raise ValueError(f"Grid.n: expected 3 positive voxel counts, got {self.n!r}")
        object.__setattr__(self, "n", n)
        for name in ("size", "center"):
            value = getattr(self, name)
            if _is_concrete_container(value):
                arr = np.asarray(value, dtype=np.float64).reshape(-1)
                if arr.size != 3 or not np.all(np.isfinite(arr)):
                    raise ValueError(f"Grid.{name}: expected 3 finite numbers, got {value!r}")
                if name == "size" and np.any(arr <= 0):
                    raise ValueError(f"Grid.size: expected positive extents, got {value!r}")
                object.__setattr__(self, name, jnp.asarray(arr, jnp.float32))

    # ------------------------------------------------------------------ derived quantities
    @property
    def shape(self) -> tuple:
        return self.n

    @property
    def h(self) -> jax.Array:
        """Voxel size [3] (world units), computed in float32 like the reference kernel."""
        return jnp.asarray(self.size, jnp.float32) / jnp.asarray(self.n, jnp.float32)

    voxel_size = h

    @property
    def origin(self) -> jax.Array:
        """Low corner [3] of the grid (world units): center - size/2."""
        return jnp.asarray(self.center, jnp.float32) - 0.5 * jnp.asarray(self.size, jnp.float32)

    def voxel_centers(self) -> jax.Array:
        """World coordinates [nx, ny, nz, 3] of the voxel centres."""
        axes = [self.origin[a] + (jnp.arange(self.n[a], dtype=jnp.float32) + 0.5) * self.h[a] for a in range(3)]
        return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_scanner(cls, scanner) -> "Grid":
        """The full reconstruction volume of a `Scanner`: n = nVoxel, size = sVoxel, centre = offOrigin."""
        return cls(n=tuple(scanner.n_voxel), size=tuple(scanner.s_voxel), center=tuple(scanner.off_origin))

    @classmethod
    def patch(cls, scanner, center, n: int | Sequence[int] = 32) -> "Grid":
        """A TV patch (gaussians.md §5): n voxels per axis at the scanner's full-resolution spacing dVoxel,
        centred at `center` ([3], may be traced)."""
        n = (int(n),) * 3 if np.ndim(n) == 0 else tuple(int(v) for v in n)
        size = np.asarray(n, np.float64) * np.asarray(scanner.d_voxel, np.float64)
        center = center if not _is_concrete_container(center) else np.asarray(center, np.float64)
        return cls(n=n, size=tuple(size), center=jnp.asarray(center, jnp.float32))


# ---------------------------------------------------------------------------------- validation
def _check_inputs(means, scales, rotations, densities, grid, culling, mean_grad, backend):
    if not isinstance(grid, Grid):
        raise TypeError(f"voxelize: grid must be a Grid, got {type(grid).__name__}")
    if culling not in CULLING_MODES:
        raise ValueError(f"voxelize: culling must be one of {CULLING_MODES}, got {culling!r}")
    if mean_grad not in MEAN_GRAD_MODES:
        raise ValueError(f"voxelize: mean_grad must be one of {MEAN_GRAD_MODES}, got {mean_grad!r}")
    if backend not in BACKENDS:
        raise ValueError(f"voxelize: backend must be one of {BACKENDS}, got {backend!r}")
    c = np.shape(means)[0] if np.ndim(means) == 2 else None
    expect = {"means": (means, (c, 3)), "scales": (scales, (c, 3)), "rotations": (rotations, (c, 4)),
              "densities": (densities, (c,))}
    for name, (x, shape) in expect.items():
        if c is None or tuple(np.shape(x)) != shape:
            raise ValueError(f"voxelize: {name} must have shape {shape if c is not None else '[C, 3]'} "
                             f"(C = number of Gaussians), got {tuple(np.shape(x))}")
    if np.shape(grid.size) != (3,) or np.shape(grid.center) != (3,):
        raise ValueError(f"voxelize: grid.size and grid.center must have shape (3,), got "
                         f"{np.shape(grid.size)} and {np.shape(grid.center)}")


def _resolve_backend(backend: str) -> str:
    """'auto' -> 'triton' only on a GPU with the kernels package importable, else 'reference'."""
    if backend != "auto":
        return backend
    if jax.default_backend() != "gpu":
        return "reference"
    try:
        import kernels.voxelize  # noqa: F401  (lazy: optional GPU package)
    except ImportError:
        return "reference"
    return "triton"


# ---------------------------------------------------------------------------------- public API
def voxelize_points(means, scales, rotations, densities, grid: Grid, *, culling: str = "extent",
                    mean_grad: str = "true", backend: str = "auto", chunk_pairs: int | None = None) -> jax.Array:
    """Voxelize activated Gaussians on `grid`; differentiable w.r.t. the four Gaussian inputs.

    Args:
      means: [C, 3] centres (world units).
      scales: [C, 3] standard deviations (world units, > 0).
      rotations: [C, 4] quaternions (w, x, y, z), used as given (normalise before if needed; the
        gradient is w.r.t. the quaternion as given).
      densities: [C] activated peak densities (0 on inactive slots: they then touch no voxel and get
        zero gradient).
      grid: the `Grid` (gradients w.r.t. grid.size / grid.center are not computed: zero).
      culling: "extent" ([R2], default) or "center" ([X2] variant), see the module docstring.
      mean_grad: "true" (default) or "reference_h2" (the reference's h^2-scaled mean gradient).
      backend: "auto", "reference" or "triton".
      chunk_pairs: reference backend only: (Gaussian, 4^3-block) pairs evaluated per loop step
        (memory ~ 64 * chunk_pairs floats per temporary); None = default.

    Returns:
      volume [nx, ny, nz] float32, indexed [x, y, z]. Filled with NaN if the number of
      (Gaussian, block) pairs overflows int32 (never a silent truncation).

    Works under jit and vmap (e.g. over a batch of Gaussian states).
    """
    _check_inputs(means, scales, rotations, densities, grid, culling, mean_grad, backend)
    backend = _resolve_backend(backend)
    args = (jnp.asarray(means, jnp.float32), jnp.asarray(scales, jnp.float32),
            jnp.asarray(rotations, jnp.float32), jnp.asarray(densities, jnp.float32))
    if backend == "triton":
        try:
            from kernels import voxelize as kvox  # lazy: GPU-only optional package
        except ImportError as err:
            raise ImportError("voxelize: backend='triton' needs the top-level `kernels` package "
                              "(kernels.voxelize)") from err
        return kvox.voxelize_points(*args, grid, culling=culling, mean_grad=mean_grad)
    chunk = voxelize_ref.DEFAULT_CHUNK_PAIRS if chunk_pairs is None else int(chunk_pairs)
    if chunk <= 0:
        raise ValueError(f"voxelize: chunk_pairs must be positive, got {chunk_pairs}")
    return voxelize_ref.voxelize_reference(*args, grid.size, grid.center, n=grid.n, culling=culling,
                                           mean_grad=mean_grad, chunk_pairs=chunk)


def voxelize(gaussians: Gaussians, grid: Grid, **options) -> jax.Array:
    """Voxelize a `Gaussians` pytree of raw parameters: activates them (xyz, scale, normalised rotation,
    density with 0 on inactive slots) and calls `voxelize_points` with the same keyword options.

    Returns volume [nx, ny, nz] float32. Gradients flow to the raw parameters; inactive slots get zero.
    """
    return voxelize_points(gaussians.get_xyz(), gaussians.get_scale(), gaussians.get_rotation(),
                           gaussians.get_density(), grid, **options)


def voxel_pair_count(means, scales, rotations, densities, grid: Grid, *, culling: str = "extent") -> jax.Array:
    """Number of (Gaussian, 4^3-voxel-block) pairs the reference backend evaluates (int32 []; -1 on int32
    overflow). A cost estimate / inspection hook; the voxelizer itself needs no capacity."""
    _check_inputs(means, scales, rotations, densities, grid, culling, "true", "reference")
    return voxelize_ref.pair_count(jnp.asarray(means, jnp.float32), jnp.asarray(scales, jnp.float32),
                                   jnp.asarray(rotations, jnp.float32), jnp.asarray(densities, jnp.float32),
                                   jnp.asarray(grid.size, jnp.float32), jnp.asarray(grid.center, jnp.float32),
                                   n=grid.n, culling=culling)
