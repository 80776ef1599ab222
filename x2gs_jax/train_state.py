"""The whole training state as one pytree, and the parameter groups of the optimiser.

`TrainState.params` is a flat dict of raw parameters:
  "xyz" [C,3], "scaling" [C,3], "rotation" [C,4], "density" [C]   canonical Gaussians (fixed capacity C)
  + the deformation model's own keys (x2gs_jax/models), e.g. "field" and "period" (X2), "anchor_net" (PhysX)
The Gaussians' `active` mask, the densification statistics, the optimiser state, the model's non-trained state
(`model_state`, e.g. PhysX's anchors and KNN binding), the completed-iteration counter and the base PRNG key
complete the state; nothing that affects training lives outside it.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import struct

from x2gs_jax.densify import DensifyStats
from x2gs_jax.gaussians import Gaussians

GAUSSIAN_KEYS = ("xyz", "scaling", "rotation", "density")


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: iterations completed (the next one is step + 1, 1-based like the reference)
    params: dict
    active: jax.Array  # [C] bool
    opt_state: Any
    stats: DensifyStats
    model_state: dict  # the model's non-trained state (flat dict of arrays; {} for static / X2)
    key: jax.Array  # base PRNG key; per-iteration keys are fold_in(key, iteration)
    scale_bound: Any = struct.field(pytree_node=False, default=None)

    @property
    def capacity(self) -> int:
        return int(self.params["xyz"].shape[0])

    def gaussians(self) -> Gaussians:
        """The canonical Gaussians (raw parameters + active mask)."""
        return gaussians_from_params(self.params, self.active, self.scale_bound)


def gaussians_from_params(params: Mapping[str, Any], active, scale_bound) -> Gaussians:
    return Gaussians(xyz=params["xyz"], scaling=params["scaling"], rotation=params["rotation"],
                     density=params["density"], active=active, scale_bound=scale_bound)


def params_from_gaussians(g: Gaussians) -> dict:
    return {"xyz": g.xyz, "scaling": g.scaling, "rotation": g.rotation, "density": g.density}


def param_labels(params: Mapping[str, Any], model) -> dict:
    """Optimiser group label of every parameter leaf: one group per Gaussian attribute, and the model's own
    labels for its keys (`DeformationModel.param_labels`)."""
    labels = {k: k for k in GAUSSIAN_KEYS}
    labels.update(model.param_labels(params))
    missing = set(params) - set(labels)
    if missing:
        raise KeyError(f"parameters {sorted(missing)} have no optimiser label (model {model.kind!r})")
    return labels
