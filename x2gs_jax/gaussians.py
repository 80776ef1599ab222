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


def normalize_quaternion(q: jax.Array) -> jax.Array:
    return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)


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
    return M @ jnp.swapaxes(M, -1, -2)


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
        raw = cls.empty(capacity, scale_bound)
        return raw.replace(
            xyz=raw.xyz.at[:n].set(jnp.asarray(xyz, jnp.float32)),
            scaling=raw.scaling.at[:n].set(jnp.asarray(inverse_scale_activation(scale, scale_bound), jnp.float32)),
            rotation=raw.rotation.at[:n].set(jnp.asarray(rotation, jnp.float32)),
            density=raw.density.at[:n].set(jnp.asarray(inverse_softplus(density), jnp.float32)),
            active=raw.active.at[:n].set(True),
        )

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
