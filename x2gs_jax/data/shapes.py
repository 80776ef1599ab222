"""Convex primitives (ellipsoids, z-aligned elliptic cylinders) with exact chords and volumes.

A `Shape` is the image of a unit ball (ellipsoid) or of the unit disk x unbounded z (cylinder) under
x = center + axes @ u, intersected with the slab zlo <= z <= zhi (a z-capped cylinder; ellipsoids
may be capped too). Every shape is convex, so a ray meets it in one interval [t0, t1] of its
parameter t (x = o + t d); its chord is t1 - t0 (times |d|). A `Primitive` is a shape minus an
optional convex *cutter* shape, carrying an additive attenuation increment; its chord along a ray is
|I_A| - |I_A ∩ I_B|, still exact. Line integrals of a sum of primitives are therefore exact sums of
closed-form chord lengths.

Numpy (float64) code here builds and moves shapes; the jax (float32) functions evaluate packed
primitive arrays at points (`densities`) and along rays (`line_integrals`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# Slab bound standing for "unbounded" (world or box units; far beyond any scanner geometry).
UNBOUNDED = 1.0e4
# A ray whose quadratic coefficient is below this is treated as parallel to a cylinder's axis.
_PARALLEL_EPS = 1e-12


def rotation_z(angle: float) -> np.ndarray:
    """[3, 3] rotation by `angle` radians about +z."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotation_to(direction) -> np.ndarray:
    """[3, 3] rotation whose first column is the unit vector along `direction` (others orthonormal)."""
    e0 = np.asarray(direction, dtype=np.float64)
    e0 = e0 / np.linalg.norm(e0)
    helper = np.array([0.0, 0.0, 1.0]) if abs(e0[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(helper, e0)
    e1 /= np.linalg.norm(e1)
    return np.stack([e0, e1, np.cross(e0, e1)], axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class Shape:
    """A convex shape (see module docstring). Lengths in the units of the caller (box or world).

    Attributes:
      kind: "ellipsoid" or "cylinder" (z-aligned; axes[:, :2] must have zero z components and
        axes[:, 2] = (0, 0, 1) is a placeholder).
      center: [3]; axes: [3, 3] columns = semi-axis vectors; zlo, zhi: slab bounds.
    """

    kind: str
    center: np.ndarray
    axes: np.ndarray
    zlo: float = -UNBOUNDED
    zhi: float = UNBOUNDED

    def __post_init__(self):
        if self.kind not in ("ellipsoid", "cylinder"):
            raise ValueError(f"Shape.kind must be 'ellipsoid' or 'cylinder', got {self.kind!r}")
        if self.kind == "cylinder" and (np.any(np.abs(self.axes[2, :2]) > 1e-12) or np.any(np.abs(self.axes[:2, 2]) > 1e-12)):
            raise ValueError("a cylinder's cross-section axes must be horizontal (z-aligned cylinder)")

    @property
    def bounded(self) -> bool:
        return self.zlo > -UNBOUNDED and self.zhi < UNBOUNDED

    def transformed(self, scale, shift) -> "Shape":
        """Image under x -> diag(scale) x + shift (scale > 0); keeps cylinders z-aligned, slabs slabs."""
        scale = np.asarray(scale, dtype=np.float64)
        shift = np.asarray(shift, dtype=np.float64)
        axes = scale[:, None] * self.axes
        if self.kind == "cylinder":
            axes[:, 2] = (0.0, 0.0, 1.0)

        def z(v):
            return v if abs(v) >= UNBOUNDED else scale[2] * v + shift[2]

        return Shape(self.kind, scale * self.center + shift, axes, z(self.zlo), z(self.zhi))

    def clipped(self, zlo: float, zhi: float) -> "Shape":
        """Intersection with the slab [zlo, zhi]."""
        return dataclasses.replace(self, zlo=max(self.zlo, zlo), zhi=min(self.zhi, zhi))

    def scaled_about_center(self, factor: float) -> "Shape":
        """The shape shrunk/grown by `factor` about its centre (a subset of self when factor <= 1)."""
        axes = self.axes * factor
        if self.kind == "cylinder":
            axes[:, 2] = (0.0, 0.0, 1.0)
        cz = self.center[2]
        lo = self.zlo if self.zlo <= -UNBOUNDED else cz + factor * (self.zlo - cz)
        hi = self.zhi if self.zhi >= UNBOUNDED else cz + factor * (self.zhi - cz)
        return Shape(self.kind, self.center.copy(), axes, lo, hi)

    def volume(self) -> float:
        """Exact volume. Ellipsoids must be uncapped (a capped ellipsoid's volume is not needed)."""
        if self.kind == "ellipsoid":
            if self.zlo > -UNBOUNDED or self.zhi < UNBOUNDED:
                raise ValueError("volume of a z-capped ellipsoid is not implemented")
            return 4.0 / 3.0 * np.pi * abs(np.linalg.det(self.axes))
        if not self.bounded:
            raise ValueError("an uncapped cylinder has infinite volume")
        return np.pi * abs(np.linalg.det(self.axes[:2, :2])) * (self.zhi - self.zlo)

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box (lo [3], hi [3])."""
        cols = self.axes if self.kind == "ellipsoid" else self.axes[:, :2]
        half = np.sqrt(np.sum(cols**2, axis=1))
        lo, hi = self.center - half, self.center + half
        if self.kind == "cylinder":
            lo[2], hi[2] = self.zlo, self.zhi
        else:
            lo[2], hi[2] = max(lo[2], self.zlo), min(hi[2], self.zhi)
        return lo, hi

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask [...] of points [..., 3] inside the shape (float64 reference)."""
        u = (np.asarray(points, dtype=np.float64) - self.center) @ np.linalg.inv(self.axes).T
        w = np.array([1.0, 1.0, 1.0 if self.kind == "ellipsoid" else 0.0])
        z = np.asarray(points)[..., 2]
        return (np.sum(w * u**2, axis=-1) <= 1.0) & (z >= self.zlo) & (z <= self.zhi)


def ellipsoid(center, semi_axes, rotation: Optional[np.ndarray] = None) -> Shape:
    """Ellipsoid with semi-axes [3] along the columns of `rotation` (default: x, y, z)."""
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    return Shape("ellipsoid", np.asarray(center, dtype=np.float64), rot @ np.diag(np.asarray(semi_axes, dtype=np.float64)))


def cylinder(center, semi_xy, half_z: float, angle_z: float = 0.0) -> Shape:
    """z-aligned elliptic cylinder: cross-section semi-axes [2] rotated by angle_z, z = center_z +- half_z."""
    center = np.asarray(center, dtype=np.float64)
    axes = rotation_z(angle_z) @ np.diag([semi_xy[0], semi_xy[1], 1.0])
    return Shape("cylinder", center, axes, center[2] - half_z, center[2] + half_z)


@dataclasses.dataclass(frozen=True, eq=False)
class Primitive:
    """An attenuation increment `value` on `shape` minus `cutter` (both convex)."""

    name: str
    shape: Shape
    value: float
    cutter: Optional[Shape] = None

    def contains(self, points: np.ndarray) -> np.ndarray:
        inside = self.shape.contains(points)
        if self.cutter is not None:
            inside &= ~self.cutter.contains(points)
        return inside


def _pack_shapes(shapes: list[Shape]) -> dict[str, np.ndarray]:
    if not shapes:
        return {"center": np.zeros((0, 3), np.float32), "inv": np.zeros((0, 3, 3), np.float32),
                "wz": np.zeros(0, np.float32), "zlo": np.zeros(0, np.float32), "zhi": np.zeros(0, np.float32)}
    return {
        "center": np.stack([s.center for s in shapes]).astype(np.float32),
        "inv": np.stack([np.linalg.inv(s.axes) for s in shapes]).astype(np.float32),
        "wz": np.array([1.0 if s.kind == "ellipsoid" else 0.0 for s in shapes], dtype=np.float32),
        "zlo": np.array([s.zlo for s in shapes], dtype=np.float32),
        "zhi": np.array([s.zhi for s in shapes], dtype=np.float32),
    }


def pack(primitives: list[Primitive]) -> dict:
    """Float32 arrays of the primitives, in two groups so that cutters cost nothing where absent.

    Returns {"plain": {"a": shape arrays, "value": [P0]}, "cut": {"a": ..., "b": cutter arrays,
    "value": [P1]}}; shape arrays: center [P, 3], inv [P, 3, 3] (axes^-1), wz [P] (1 ellipsoid,
    0 cylinder), zlo, zhi [P]. A group may be empty (leading size 0).
    """
    plain = [p for p in primitives if p.cutter is None]
    cut = [p for p in primitives if p.cutter is not None]
    return {
        "plain": {"a": _pack_shapes([p.shape for p in plain]), "value": np.array([p.value for p in plain], np.float32)},
        "cut": {
            "a": _pack_shapes([p.shape for p in cut]),
            "b": _pack_shapes([p.cutter for p in cut]),
            "value": np.array([p.value for p in cut], np.float32),
        },
    }


def stack_packed(packs: list[dict]) -> dict:
    """Stack packed primitive sets of the same layout along a new leading axis (e.g. views)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *packs)


# ----------------------------------------------------------------------------------------- jax side
# Points and rays are handled as lists of 3 component arrays and the 3x3 products are written out,
# so each primitive's work is one fused elementwise loop. Primitives are visited with `lax.scan`
# (one compiled body, short compile times) and accumulated into a single [...] array.
def _local(shape: dict, x: list) -> list:
    """u = axes^-1 (x - center) for one packed shape; x: 3 arrays [...]."""
    inv, c = shape["inv"], shape["center"]
    rel = [x[j] - c[j] for j in range(3)]
    return [rel[0] * inv[i, 0] + rel[1] * inv[i, 1] + rel[2] * inv[i, 2] for i in range(3)]


def _linear(shape: dict, d: list) -> list:
    inv = shape["inv"]
    return [d[0] * inv[i, 0] + d[1] * inv[i, 1] + d[2] * inv[i, 2] for i in range(3)]


def _inside(shape: dict, x: list) -> jnp.ndarray:
    """Points x (3 arrays [...]) inside one packed shape -> bool [...]."""
    u = _local(shape, x)
    r2 = u[0] * u[0] + u[1] * u[1] + shape["wz"] * u[2] * u[2]
    return (r2 <= 1.0) & (x[2] >= shape["zlo"]) & (x[2] <= shape["zhi"])


def densities(packed: dict, x: jnp.ndarray) -> jnp.ndarray:
    """Attenuation sum_p value_p 1[x in A_p \\ B_p] at points x [..., 3] -> [...] float32."""
    xs = [x[..., 0], x[..., 1], x[..., 2]]

    def plain(total, prim):
        return total + jnp.where(_inside(prim["a"], xs), prim["value"], 0.0), None

    def cut(total, prim):
        inside = _inside(prim["a"], xs) & ~_inside(prim["b"], xs)
        return total + jnp.where(inside, prim["value"], 0.0), None

    total, _ = jax.lax.scan(plain, jnp.zeros(x.shape[:-1], jnp.float32), packed["plain"])
    total, _ = jax.lax.scan(cut, total, packed["cut"])
    return total


def _interval(shape: dict, o: list, d: list):
    """Ray parameter interval [t0, t1] (t1 < t0: empty) of rays o + t d in one packed shape.

    The quadric part is solved around the closest approach t* = -B/A, where the squared distance is
    |u_perp|^2 + A (t - t*)^2; this avoids the cancellation of the textbook discriminant in float32.
    """
    wz = shape["wz"]
    po, q = _local(shape, o), _linear(shape, d)
    a = q[0] * q[0] + q[1] * q[1] + wz * q[2] * q[2]
    parallel = a < _PARALLEL_EPS
    a_safe = jnp.where(parallel, 1.0, a)
    t_mid = -(po[0] * q[0] + po[1] * q[1] + wz * po[2] * q[2]) / a_safe
    perp = [po[i] + t_mid * q[i] for i in range(3)]
    gap = 1.0 - (perp[0] * perp[0] + perp[1] * perp[1] + wz * perp[2] * perp[2])
    half = jnp.sqrt(jnp.maximum(gap, 0.0) / a_safe)
    big = jnp.float32(UNBOUNDED * 100)
    inside_axis = (po[0] * po[0] + po[1] * po[1] + wz * po[2] * po[2]) <= 1.0  # parallel: all t or none
    t0 = jnp.where(parallel, jnp.where(inside_axis, -big, big), jnp.where(gap >= 0, t_mid - half, big))
    t1 = jnp.where(parallel, jnp.where(inside_axis, big, -big), jnp.where(gap >= 0, t_mid + half, -big))
    # Slab zlo <= o_z + t d_z <= zhi.
    flat = jnp.abs(d[2]) < 1e-12
    dz_safe = jnp.where(flat, 1.0, d[2])
    ta, tb = (shape["zlo"] - o[2]) / dz_safe, (shape["zhi"] - o[2]) / dz_safe
    in_slab = (o[2] >= shape["zlo"]) & (o[2] <= shape["zhi"])
    s0 = jnp.where(flat, jnp.where(in_slab, -big, big), jnp.minimum(ta, tb))
    s1 = jnp.where(flat, jnp.where(in_slab, big, -big), jnp.maximum(ta, tb))
    return jnp.maximum(t0, s0), jnp.minimum(t1, s1)


def line_integrals(packed: dict, o: jnp.ndarray, d: jnp.ndarray) -> jnp.ndarray:
    """Exact integral of `densities` along rays from o [..., 3] in unit directions d [..., 3], t >= 0.

    Returns [...] float32 (density x length, lengths in the units of o and d).
    """
    # o is not broadcast: a cone beam's single source [1, 1, 3] keeps the per-origin work per view.
    shape = jnp.broadcast_shapes(o.shape, d.shape)[:-1]
    os_, ds = [o[..., i] for i in range(3)], [d[..., i] for i in range(3)]

    def chord(shape_arrays):
        t0, t1 = _interval(shape_arrays, os_, ds)
        return jnp.maximum(t0, 0.0), t1  # rays start at the origin

    def plain(total, prim):
        a0, a1 = chord(prim["a"])
        return total + prim["value"] * jnp.maximum(a1 - a0, 0.0), None

    def cut(total, prim):
        a0, a1 = chord(prim["a"])
        b0, b1 = _interval(prim["b"], os_, ds)
        len_ab = jnp.maximum(jnp.minimum(a1, b1) - jnp.maximum(a0, b0), 0.0)
        return total + prim["value"] * (jnp.maximum(a1 - a0, 0.0) - len_ab), None

    total, _ = jax.lax.scan(plain, jnp.zeros(shape, jnp.float32), packed["plain"])
    total, _ = jax.lax.scan(cut, total, packed["cut"])
    return total


# ------------------------------------------------------------------------------- closed-form volumes
def ellipsoid_minus_coaxial_ellipsoid_volume(outer: Shape, cutter: Shape) -> float:
    """Exact volume of `outer` minus `cutter`, two axis-aligned uncapped ellipsoids whose horizontal
    cross-sections are concentric and similar (same x, y centre; same x:y semi-axis ratio).

    At height z both cross-sections are concentric similar ellipses, so the area of the difference is
    pi a b max(0, f(z) - max(g(z), 0)) with f = 1 - ((z - z_o) / c_o)^2 and g = k^2 (1 - ((z - z_c) / c_c)^2),
    k = a_cutter / a_outer: piecewise quadratic in z. Simpson's rule is exact on each piece between the
    roots of f, g and f - g.
    """
    for s, name in ((outer, "outer"), (cutter, "cutter")):
        if s.kind != "ellipsoid" or s.zlo > -UNBOUNDED or s.zhi < UNBOUNDED:
            raise ValueError(f"{name} must be an uncapped ellipsoid")
        if np.any(np.abs(s.axes - np.diag(np.diag(s.axes))) > 1e-12):
            raise ValueError(f"{name} must be axis-aligned")
    a, b, c = np.abs(np.diag(outer.axes))
    ac, bc, cc = np.abs(np.diag(cutter.axes))
    if not np.allclose(outer.center[:2], cutter.center[:2], atol=1e-12) or not np.isclose(ac / a, bc / b, rtol=1e-10):
        raise ValueError("cutter cross-sections must be concentric and similar to the outer ellipsoid's")
    k2 = (ac / a) ** 2
    zo, zc = outer.center[2], cutter.center[2]

    def f(z):
        return 1.0 - ((z - zo) / c) ** 2

    def g(z):
        return k2 * (1.0 - ((z - zc) / cc) ** 2)

    def area(z):
        return np.pi * a * b * np.maximum(0.0, f(z) - np.maximum(g(z), 0.0)) * (f(z) > 0)

    # Roots of f - g: (quadratic in z) -(z-zo)^2/c^2 + k2 (z-zc)^2/cc^2 + 1 - k2 = 0.
    qa = -1.0 / c**2 + k2 / cc**2
    qb = 2.0 * zo / c**2 - 2.0 * k2 * zc / cc**2
    qc = -(zo**2) / c**2 + k2 * zc**2 / cc**2 + 1.0 - k2
    roots = [zo - c, zo + c, zc - cc, zc + cc]
    if abs(qa) > 1e-14:
        disc = qb**2 - 4 * qa * qc
        if disc >= 0:
            roots += [(-qb - np.sqrt(disc)) / (2 * qa), (-qb + np.sqrt(disc)) / (2 * qa)]
    elif abs(qb) > 1e-14:
        roots.append(-qc / qb)
    knots = np.unique(np.clip(np.array(roots), zo - c, zo + c))
    lo, hi = knots[:-1], knots[1:]
    mid = 0.5 * (lo + hi)
    return float(np.sum((hi - lo) / 6.0 * (area(lo) + 4.0 * area(mid) + area(hi))))
