"""X2-Gaussian deformation: HexPlane field + decoder -> additive offsets on the canonical Gaussians.

Interface (x2gaussian.md §4-§5):

  params = init_deformation_params(key, config)      {"grid": [levels][6 planes], "deformation": flax params}
  deformed, aux = deform(params, canonical, t, key)   pure; jit- and vmap-able over t

The top-level keys "grid" and "deformation" are the optimiser group names (x2gaussian.md §9).
The field is evaluated at the canonical positions; the offsets are added in pre-activation space:

  xyz' = xyz + Δμ      scaling' = scaling + Δs (log-scale)      rotation' = rotation + Δq (raw quaternion)

density and the active mask are unchanged. Inactive slots are evaluated at the origin and get zero
offsets, so whatever they hold cannot produce NaN or receive gradient through the field.

Lower-level pieces for other deformation models (e.g. PhysX's anchor/fusion modes):
`deformation_offsets` (field + decoder only) and `apply_offsets` (the additive update).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp

from x2gs_jax.fields import hexplane
from x2gs_jax.fields.decoder import DeformationDecoder, decode_fused, num_decoder_params
from x2gs_jax.gaussians import Gaussians


@dataclasses.dataclass(frozen=True)
class DeformationConfig:
    """Settings of the X2 deformation (defaults = the reference `ModelHiddenParams`). Hashable (jit-static).

    resolution: base (Rx, Ry, Rz, Rt) cells of the planes.
    multires: spatial resolution factors per level (time resolution is Rt at every level).
    features: channels per plane (the feature vector has len(multires) * features entries).
    bounds: half-size of the field box, world units (g_xyz = -p / bounds).
    net_width, defor_depth: decoder width W and trunk depth D.
    no_dx, no_ds, no_dr: disable the position / scale / rotation offsets.
    time_mapping: "reference" (g_t = t: half the time axis is used) or "full" (g_t = 2t - 1: the whole axis;
      configs/x2_gaussian.py uses it, README difference 18).
    remat: recompute plane samples in the backward pass (memory for compute; same values).
    """

    resolution: tuple = (64, 64, 64, 150)
    multires: tuple = (1, 2, 4, 8)
    features: int = 32
    bounds: float = 1.6
    net_width: int = 64
    defor_depth: int = 1
    no_dx: bool = False
    no_ds: bool = False
    no_dr: bool = False
    time_mapping: str = "reference"
    remat: bool = False

    def __post_init__(self):
        # Normalise list-valued settings (e.g. from ml_collections / YAML) to hashable tuples.
        object.__setattr__(self, "resolution", tuple(int(r) for r in self.resolution))
        object.__setattr__(self, "multires", tuple(int(m) for m in self.multires))
        hexplane._check_sizes(self.resolution, self.multires, self.features)
        if not self.bounds > 0:
            raise ValueError(f"DeformationConfig.bounds must be > 0 (world units), got {self.bounds}")
        if self.net_width < 1 or self.defor_depth < 1:
            raise ValueError(f"DeformationConfig: net_width and defor_depth must be >= 1, got "
                             f"{self.net_width}, {self.defor_depth}")
        if self.time_mapping not in hexplane.TIME_MAPPINGS:
            raise ValueError(f"DeformationConfig.time_mapping must be one of {hexplane.TIME_MAPPINGS}, "
                             f"got {self.time_mapping!r}")

    @property
    def feature_dim(self) -> int:
        return len(self.multires) * int(self.features)

    @classmethod
    def from_config(cls, config: Union[None, "DeformationConfig", Mapping[str, Any]]) -> "DeformationConfig":
        """From None (defaults), a DeformationConfig, a dict or an ml_collections.ConfigDict.

        Unknown keys raise a ValueError naming them (typos must not silently fall back to defaults).
        """
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if hasattr(config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise TypeError(f"DeformationConfig.from_config: expected a mapping, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"DeformationConfig: unknown key(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(config))


def _decoder(cfg: DeformationConfig) -> DeformationDecoder:
    return DeformationDecoder(in_features=cfg.feature_dim, width=cfg.net_width, depth=cfg.defor_depth)


def init_deformation_params(key: jax.Array, config=None) -> dict:
    """{"grid": [levels][6] planes [C, R_b, R_a], "deformation": decoder params} with the reference init."""
    # One compiled program instead of one eager dispatch (and compile) per plane shape.
    return _init_params(key, DeformationConfig.from_config(config))


@functools.partial(jax.jit, static_argnums=1)
def _init_params(key: jax.Array, cfg: DeformationConfig) -> dict:
    k_grid, k_dec = jax.random.split(key)
    grid = hexplane.init_grid(k_grid, cfg.resolution, cfg.multires, cfg.features)
    dec = _decoder(cfg).init(k_dec, jnp.zeros((1, cfg.feature_dim), jnp.float32))["params"]
    return {"grid": grid, "deformation": dec}


def num_deformation_params(config=None) -> int:
    """Closed-form number of floats in `init_deformation_params(key, config)`."""
    cfg = DeformationConfig.from_config(config)
    return (hexplane.num_grid_params(cfg.resolution, cfg.multires, cfg.features)
            + num_decoder_params(cfg.feature_dim, cfg.net_width, cfg.defor_depth))


def deformation_offsets(params: Mapping[str, Any], xyz: jax.Array, t, config=None) -> dict:
    """Raw decoder outputs at (xyz, t): {"dx": [N,3], "ds": [N,3], "dr": [N,4], "hidden": [N,W]}.

    xyz: [N, 3] canonical positions (world units); t: [] normalised time. The no_d* flags are not
    applied here (see `apply_offsets`).
    """
    cfg = DeformationConfig.from_config(config)
    f = hexplane.hexplane_features(params["grid"], xyz, t, bounds=cfg.bounds, time_mapping=cfg.time_mapping,
                                   remat=cfg.remat)
    if _fused_decoder():
        return decode_fused(params["deformation"], f, cfg.defor_depth)
    return _decoder(cfg).apply({"params": params["deformation"]}, f)


def _fused_decoder() -> bool:
    """X2GS_DECODER, read at trace time: "split" (default: one product per layer and head, as the module) or "fused"
    (`decode_fused`: the heads' products merged; an A/B: −2 % on an H200, within the noise, BENCHMARKS.md)."""
    mode = os.environ.get("X2GS_DECODER", "split")
    if mode not in ("split", "fused"):
        raise ValueError(f"X2GS_DECODER={mode!r}: expected split or fused")
    return mode == "fused"


def apply_offsets(canonical: Gaussians, dx: Optional[jax.Array], ds: Optional[jax.Array],
                  dr: Optional[jax.Array]) -> Gaussians:
    """canonical with xyz + dx, scaling + ds, rotation + dr (raw, pre-activation); None = no offset.

    Offsets of inactive slots are zeroed, so inactive slots keep their canonical values. Density,
    the active mask and scale_bound are unchanged.
    """
    mask = canonical.active[:, None]

    def add(raw, d):
        return raw if d is None else raw + jnp.where(mask, d, 0.0)

    return canonical.replace(xyz=add(canonical.xyz, dx), scaling=add(canonical.scaling, ds),
                             rotation=add(canonical.rotation, dr))


def deform(params: Mapping[str, Any], canonical: Gaussians, t, key: Optional[jax.Array] = None,
           config=None) -> tuple[Gaussians, dict]:
    """Deform the canonical Gaussians to normalised time t (x2gaussian.md §5).

    Args:
      params: {"grid", "deformation"} from `init_deformation_params`.
      canonical: fixed-capacity Gaussians (raw parameters, `active` mask).
      t: [] normalised time (seconds / 60 in the reference); differentiable.
      key: PRNG key, unused here (part of the shared deformation interface).
      config: DeformationConfig / mapping; None = defaults. Must match the params' shapes.

    Returns (deformed Gaussians, aux) with aux = {"dx", "ds", "dr"} the applied offsets ([C,3], [C,3],
    [C,4]; zero where disabled or inactive) and "hidden" the trunk output [C, W].
    """
    del key  # deterministic model
    cfg = DeformationConfig.from_config(config)
    # Inactive slots may hold stale values; evaluate them at the origin so they stay finite.
    xyz = jnp.where(canonical.active[:, None], canonical.xyz, 0.0)
    out = deformation_offsets(params, xyz, t, cfg)
    mask = canonical.active[:, None]
    offsets = {
        name: jnp.zeros_like(out[name]) if disabled else jnp.where(mask, out[name], 0.0)
        for name, disabled in (("dx", cfg.no_dx), ("ds", cfg.no_ds), ("dr", cfg.no_dr))
    }
    deformed = apply_offsets(canonical, None if cfg.no_dx else offsets["dx"], None if cfg.no_ds else offsets["ds"],
                             None if cfg.no_dr else offsets["dr"])
    return deformed, {**offsets, "hidden": out["hidden"]}


def make_deform(config=None) -> Callable:
    """`deform` with the config bound: (params, canonical, t, key) -> (deformed, aux)."""
    cfg = DeformationConfig.from_config(config)

    def bound(params, canonical, t, key=None):
        return deform(params, canonical, t, key, cfg)

    return bound
