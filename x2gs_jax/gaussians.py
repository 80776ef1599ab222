"""Radiative Gaussians as a fixed-capacity pytree of raw parameters with an `active` mask.

Shapes are static under `jax.jit`: a `Gaussians` holds `capacity` slots, of which those with
`active == True` exist. Inactive slots must contribute nothing anywhere (renderers multiply the
activated density by the mask) and receive zero gradient.

Raw parameters and activations (gaussians.md §1):
  xyz      [C, 3]  identity                                    (world units)
  scaling  [C, 3]  exp(x) (X2, scale_bound=None) or
                   sigmoid(x) (s_max - s_min) + s_min (R2)     (world units, std-devs)
  rotation [C, 4]  q / max(|q|, 1e-12), quaternion (w, x, y, z)
  density  [C]     softplus(x) (beta 1, identity above 20)     (GT-volume units)
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from x2gs_jax.mathutil import mm

ScaleBound = Optional[tuple]  # (s_min, s_max) in world units, or None for the exp activation


# ---------------------------------------------------------------------------------- activations
def softplus(x: jax.Array) -> jax.Array:
    """PyTorch's softplus with beta=1 and threshold=20 (returns x itself above 20)."""
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def inverse_softplus(y) -> np.ndarray:
    """log(exp(y) - 1), computed in float64 as the reference does; y > 0."""
    y = np.asarray(y, dtype=np.float64)
    return np.where(y > 20.0, y, np.log(np.expm1(np.maximum(y, 1e-30))))


def scale_activation(raw: jax.Array, scale_bound: ScaleBound) -> jax.Array:
    if scale_bound is None:
        return jnp.exp(raw)
    s_min, s_max = scale_bound
    return jax.nn.sigmoid(raw) * (s_max - s_min) + s_min


def inverse_scale_activation(scale, scale_bound: ScaleBound) -> np.ndarray:
    """Inverse of `scale_activation` (float64 numpy). R2's bounded form maps s <= s_min to -inf."""
    scale = np.asarray(scale, dtype=np.float64)
    if scale_bound is None:
        return np.log(scale)
    s_min, s_max = scale_bound
    p = np.maximum((scale - s_min) / (s_max - s_min), 0.0)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


# Raw value used where the bounded inverse would be -inf (s <= s_min, e.g. a split child of a
# Gaussian already near s_min). The float32 sigmoid underflows to exactly 0 below about -88, so the
# axis sits at s_min with exactly zero gradient, like the reference's -inf, but stays finite.
SCALE_RAW_FLOOR = -120.0


def inverse_softplus_jax(y: jax.Array) -> jax.Array:
    """float32, jit-able log(exp(y) - 1) for y > 0 (identity above 20, matching `softplus`)."""
    y = jnp.asarray(y, jnp.float32)
    safe = jnp.clip(y, 1e-30, 20.0)  # keeps the unused branch finite
    return jnp.where(y > 20.0, y, jnp.log(jnp.expm1(safe)))


def inverse_scale_activation_jax(scale: jax.Array, scale_bound: ScaleBound) -> jax.Array:
    """float32, jit-able inverse of `scale_activation`. Bounded form: s <= s_min maps to SCALE_RAW_FLOOR."""
    scale = jnp.asarray(scale, jnp.float32)
    if scale_bound is None:
        return jnp.log(scale)
    s_min, s_max = scale_bound
    p = jnp.clip((scale - s_min) / (s_max - s_min), 0.0, 1.0)
    logit = jnp.log(p) - jnp.log1p(-p)
    return jnp.maximum(logit, SCALE_RAW_FLOOR)


def normalize_quaternion(q: jax.Array) -> jax.Array:
    """q / max(|q|, 1e-12); written with rsqrt of the clamped squared norm so the gradient is finite at q = 0."""
    return q * jax.lax.rsqrt(jnp.maximum(jnp.sum(q * q, axis=-1, keepdims=True), 1e-24))


def quaternion_to_rotation(q: jax.Array) -> jax.Array:
    """Rotation matrices [..., 3, 3] from quaternions (w, x, y, z) [..., 4], used as given (rasterizer.md §4.1)."""
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def covariance(scale: jax.Array, rotation: jax.Array) -> jax.Array:
    """World covariance Sigma = R S^2 R^T [..., 3, 3] from scales [..., 3] and quaternions [..., 4]."""
    R = quaternion_to_rotation(rotation)
    M = R * scale[..., None, :]
    return mm(M, jnp.swapaxes(M, -1, -2))


# ---------------------------------------------------------------------------------- the pytree
@struct.dataclass
class Gaussians:
    """Fixed-capacity radiative Gaussians (raw parameters); see the module docstring for units."""

    xyz: jax.Array  # [C, 3]
    scaling: jax.Array  # [C, 3]
    rotation: jax.Array  # [C, 4]
    density: jax.Array  # [C]
    active: jax.Array  # [C] bool
    scale_bound: ScaleBound = struct.field(pytree_node=False, default=None)

    # -- sizes
    @property
    def capacity(self) -> int:
        return int(self.xyz.shape[-2])

    def num_active(self) -> jax.Array:
        return jnp.sum(self.active.astype(jnp.int32), axis=-1)

    # -- activated views (what the renderers see)
    def get_xyz(self) -> jax.Array:
        return self.xyz

    def get_scale(self) -> jax.Array:
        return scale_activation(self.scaling, self.scale_bound)

    def get_rotation(self) -> jax.Array:
        return normalize_quaternion(self.rotation)

    def get_density(self) -> jax.Array:
        """Activated density [C], exactly 0 on inactive slots."""
        return jnp.where(self.active, softplus(self.density), 0.0)

    def get_covariance(self) -> jax.Array:
        return covariance(self.get_scale(), self.get_rotation())

    # -- construction
    @classmethod
    def from_activated(cls, xyz, scale, rotation, density, capacity: Optional[int] = None,
                       scale_bound: ScaleBound = None) -> "Gaussians":
        """Build from activated arrays: xyz [N,3], scale [N,3] (> 0), rotation [N,4] (w,x,y,z), density [N] (> 0).

        Slots N..capacity-1 are inactive (zeros, identity rotation). Inverse activations run in float64.
        """
        xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        n = xyz.shape[0]
        scale = np.asarray(scale, dtype=np.float64).reshape(n, 3)
        rotation = np.asarray(rotation, dtype=np.float64).reshape(n, 4)
        density = np.asarray(density, dtype=np.float64).reshape(n)
        if np.any(scale <= 0):
            raise ValueError("Gaussians.from_activated: scales must be > 0")
        if np.any(density < 0):
            raise ValueError("Gaussians.from_activated: densities must be >= 0")
        capacity = n if capacity is None else int(capacity)
        if capacity < n:
            raise ValueError(f"Gaussians.from_activated: capacity {capacity} < number of points {n}")
        # The buffers are filled on the host and transferred once: eager `.at[:n].set` on the device compiled one
        # small program per array and shape (with the optimiser init, 81 compiles in a `:ref64` setup; now 12).
        # Same values: float64 -> float32 rounds to nearest in numpy as in JAX; empty slots as `empty`.
        def filled(values, fill, width):
            out = np.full((capacity,) + width, fill, np.float32)
            out[:n] = values
            return jax.device_put(out)  # (jnp.asarray compiles a copy program per shape)

        rot = np.zeros((capacity, 4), np.float32)
        rot[:, 0] = 1.0
        rot[:n] = rotation
        active = np.zeros((capacity,), bool)
        active[:n] = True
        return cls(xyz=filled(xyz, 0.0, (3,)), scaling=filled(inverse_scale_activation(scale, scale_bound), 0.0, (3,)),
                   rotation=jax.device_put(rot), density=filled(inverse_softplus(density), -30.0, ()),
                   active=jax.device_put(active), scale_bound=scale_bound)

    @classmethod
    def from_point_cloud(cls, points, *, capacity: Optional[int] = None, scale_bound: ScaleBound = None,
                         min_dist: float = 1e-3, k: int = 3) -> "Gaussians":
        """Initial Gaussians from a point cloud (gaussians.md §2.2, x2gaussian.md §2).

        Args:
          points: [N, 4] float (x, y, z in world units, density > 0), e.g. from `load_init_points`.
          capacity: number of slots (>= N); default N.
          scale_bound: None -> X2's exp scale activation, d = sqrt(max(d2, min_dist^2)) unclamped;
            (s_min, s_max) world units -> R2's bounded sigmoid, d additionally clamped to
            [s_min + 1e-5, s_max - 1e-5].
          min_dist: floor of the neighbour distance (world units); 1e-3 in both references
            (X2 writes it as max(d2, 1e-6), R2 as max(d2, 0.001^2)).
          k: neighbours in the mean squared distance d2 (3 in the references).

        Returns a `Gaussians` with isotropic scale d on all axes, rotation (1, 0, 0, 0) and raw density
        log(exp(rho) - 1) computed in float64 and stored in float32.
        """
        from x2gs_jax.knn import knn_mean_sq_dist  # local: knn is only needed at initialisation

        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 4:
            raise ValueError(f"Gaussians.from_point_cloud: points must have shape [N, 4] (x, y, z, density), "
                             f"got {pts.shape}")
        n = pts.shape[0]
        if n <= k:
            raise ValueError(f"Gaussians.from_point_cloud: need more than k={k} points, got {n}")
        if not np.all(np.isfinite(pts)):
            raise ValueError("Gaussians.from_point_cloud: points contain NaN or inf")
        if np.any(pts[:, 3] <= 0):
            raise ValueError("Gaussians.from_point_cloud: densities (column 3) must be > 0")
        if scale_bound is not None:
            s_min, s_max = (float(v) for v in scale_bound)
            if not 0 <= s_min < s_max - 2e-5:
                raise ValueError(f"Gaussians.from_point_cloud: scale_bound must be (s_min, s_max) with "
                                 f"0 <= s_min < s_max, got {scale_bound}")
            scale_bound = (s_min, s_max)
        d2 = np.asarray(knn_mean_sq_dist(pts[:, :3], k=k), dtype=np.float64)
        d = np.sqrt(np.maximum(d2, float(min_dist) ** 2))
        if scale_bound is not None:
            d = np.clip(d, scale_bound[0] + 1e-5, scale_bound[1] - 1e-5)
        rotation = np.zeros((n, 4))
        rotation[:, 0] = 1.0
        return cls.from_activated(pts[:, :3], np.repeat(d[:, None], 3, axis=1), rotation, pts[:, 3],
                                  capacity=capacity, scale_bound=scale_bound)

    @classmethod
    def empty(cls, capacity: int, scale_bound: ScaleBound = None) -> "Gaussians":
        """All-inactive buffers of the given capacity."""
        return cls(
            xyz=jnp.zeros((capacity, 3), jnp.float32),
            scaling=jnp.zeros((capacity, 3), jnp.float32),
            rotation=jnp.zeros((capacity, 4), jnp.float32).at[:, 0].set(1.0),
            density=jnp.full((capacity,), -30.0, jnp.float32),
            active=jnp.zeros((capacity,), bool),
            scale_bound=scale_bound,
        )


# ---------------------------------------------------------------------------------- init file
def load_init_points(path) -> np.ndarray:
    """Load an `init_<case>.npy` point cloud (data_format.md §6) as float64 [N, 4] (x, y, z world units, density).

    Raises FileNotFoundError if the file is missing, and `DataError` (a ValueError) naming the file if it
    is not a plain numeric .npy array of shape [N, 4] with N >= 1, finite values and densities > 0.
    """
    import os

    from x2gs_jax.data.naf import DataError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init point cloud not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)  # no pickles: the file is untrusted data
    except Exception as e:  # np.load raises several types for corrupt/unsupported files
        raise DataError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: expected a numeric array, got {getattr(arr, 'dtype', type(arr))}")
    if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] < 1:
        raise DataError(f"{path}: expected shape [N, 4] (x, y, z, density) with N >= 1, got {arr.shape}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if np.any(bad):
        raise DataError(f"{path}: {int(np.sum(np.any(bad, axis=1)))} rows contain NaN or inf "
                        f"(first row {int(np.argmax(np.any(bad, axis=1)))})")
    nonpos = arr[:, 3] <= 0
    if np.any(nonpos):
        raise DataError(f"{path}: column 3 (density) must be > 0; {int(np.sum(nonpos))} rows are not "
                        f"(first row {int(np.argmax(nonpos))}, value {arr[int(np.argmax(nonpos)), 3]})")
    return arr


# ---------------------------------------------------------------------------------- capacity growth
def next_capacity(needed: int, current: int) -> int:
    """Doubling policy: the smallest current * 2^j (j >= 0) that is >= needed."""
    needed, cap = int(needed), max(int(current), 1)
    while cap < needed:
        cap *= 2
    return cap


def _pad_leaf(x, new_capacity: int, old_capacity: int):
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) == 0 or shape[0] != old_capacity:
        return x  # not per-Gaussian (e.g. Adam's step count): unchanged
    widths = [(0, new_capacity - old_capacity)] + [(0, 0)] * (len(shape) - 1)
    if isinstance(x, np.ndarray):
        return np.pad(x, widths)
    return jnp.pad(x, widths)


def grow(tree, new_capacity: int, old_capacity: int):
    """Enlarge every per-Gaussian array in `tree` from old_capacity to new_capacity slots (outside jit).

    Every array leaf whose leading axis has length old_capacity is padded with zeros (values of the
    existing rows are kept, so Adam moments carry over); other leaves (scalars such as Adam's count,
    arrays of other sizes) are returned unchanged. `Gaussians` instances anywhere in the tree are padded
    with empty slots instead (inactive, zero position/scale, identity rotation, density raw -30).

    Caveats: an unrelated array whose leading axis happens to equal old_capacity would also be padded,
    so pass only per-Gaussian trees (Gaussians, DensifyStats, the Gaussian part of the optimiser state).
    Optimiser moments must be plain arrays/dicts/tuples, not `Gaussians` instances (they need zeros).
    """
    new_capacity, old_capacity = int(new_capacity), int(old_capacity)
    if new_capacity < old_capacity:
        raise ValueError(f"grow: new_capacity {new_capacity} < old_capacity {old_capacity}")
    if new_capacity == old_capacity:
        return tree

    def pad(x):
        if isinstance(x, Gaussians):
            if x.capacity != old_capacity:
                return x
            extra = Gaussians.empty(new_capacity - old_capacity, x.scale_bound)
            return jax.tree.map(lambda a, b: jnp.concatenate([jnp.asarray(a), b], axis=0), x, extra)
        return _pad_leaf(x, new_capacity, old_capacity)

    return jax.tree.map(pad, tree, is_leaf=lambda x: isinstance(x, Gaussians))
