"""PhysX-Gaussian, pure anchor mode (physx.md §1), registered as `physx`.

Coarse stage: the canonical Gaussians (the static model). Fine stage: M anchors, chosen once by farthest-point
sampling over the initial Gaussians and fixed from then on, are displaced by the spacetime transformer at the
view's time; every Gaussian moves by the skinning-weighted sum of its K anchors' displacements
(Δμ_i = Σ_j w_ij Δa_j); scale and rotation are not deformed. Training masks ⌊M·mask_ratio⌋ random anchor tokens
(BERT-style) in the render pass and adds

  L_phys   = mean over masked anchors x 3 of |Δa_render - stopgrad(Δa_teacher)|   (teacher: an unmasked pass with
             its own dropout), for global iterations >= phys_warmup_steps, weight lambda_phys;
  L_smooth = mean over the M x 8 (anchor, nearest other anchor) pairs of |Δa_j - Δa_n|^2 on the render pass,
             weight lambda_anchor_smooth.

No period, no periodic loss and no HexPlane regularisers; the reference also skips the 3D TV loss in both stages
in pure mode, which `configs/physx.py` reproduces with loss.lambda_tv = 0 (a config value, not a special case). The caches the reference keeps on the module are explicit values here: `view_gaussians` returns
the render pass's Δa and masked indices, `extra_losses` consumes them.

Parameters: params["anchor_net"] (Flax; groups "anchor_deformation" and "anchor_transformer", constant learning
rates). State (TrainState.model_state): "anchors" [M,3], "anchor_nbrs" [M,8], "knn_idx" [C,K] int32,
"knn_w" [C,K]; the binding is recomputed after every densify/prune/grow (so it is frozen after the last
densification, as the reference's).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from x2gs_jax.fields import apply_offsets
from x2gs_jax.models import anchors as A
from x2gs_jax.models.base import (ConfigError, DeformationModel, canonical_at_views, check_eval_phases,
                                  four_d_eval_times, register)
from x2gs_jax.models.transformer import TransformerConfig, anchor_displacements, init_transformer, transformer_labels
from x2gs_jax.train_state import gaussians_from_params

GROUPS = ("anchor_deformation", "anchor_transformer")


@dataclasses.dataclass(frozen=True)
class PhysXSettings:
    """PhysX-Gaussian settings (defaults = the reference flags, physx.md §1.1)."""

    transformer: TransformerConfig = TransformerConfig()
    num_anchors: int = 1024
    anchor_k: int = 10
    knn_tau: float = 0.01  # skinning softmax temperature (squared world units)
    smooth_k: int = 8  # neighbours of each anchor in L_smooth
    mask_ratio: float = 0.25
    lambda_phys: float = 0.1
    lambda_anchor_smooth: float = 0.01
    phys_warmup_steps: int = 2000  # global iteration
    dropout_at_eval: bool = False  # the reference keeps dropout on at evaluation (its figures include that noise)
    scan_s: float = 60.0
    eval_cycle_s: float = 3.0

    def n_anchors(self, n_points: int) -> int:
        """M: num_anchors, or every point when the initial cloud has fewer."""
        return int(min(self.num_anchors, n_points))

    def n_masked(self, m: int) -> int:
        return int(math.floor(m * self.mask_ratio))


class PhysXModel(DeformationModel):
    """PhysX-Gaussian in pure anchor mode (see the module docstring)."""

    kind = "physx"
    is_4d = True
    has_period = False

    def __init__(self, settings: PhysXSettings):
        self.s = settings

    # -- parameters and state
    def init_params(self, key, case) -> dict:
        return {"anchor_net": init_transformer(key, self.s.transformer)}

    def param_labels(self, params) -> dict:
        return {"anchor_net": transformer_labels(params["anchor_net"])}

    def init_model_state(self, key, gaussians) -> dict:
        """FPS over the active (initial) Gaussians, their 8-neighbour table, and the binding of every slot."""
        active = np.asarray(gaussians.active)
        m = self.s.n_anchors(int(active.sum()))
        if m < 2:
            raise ConfigError(f"PhysX needs at least 2 initial points for its anchors, got {int(active.sum())}")
        idx = A.farthest_point_sampling(gaussians.xyz, m, key, gaussians.active)
        anchors = jnp.asarray(gaussians.xyz)[idx]
        state = {"anchors": anchors, "anchor_nbrs": A.anchor_neighbours(anchors, self.s.smooth_k)}
        return self.rebind(state, gaussians)

    def rebind(self, model_state, gaussians) -> dict:
        idx, w = A.knn_bind(gaussians.xyz, model_state["anchors"], self.s.anchor_k, self.s.knn_tau, gaussians.active)
        return {**model_state, "knn_idx": idx, "knn_w": w}

    # -- geometry
    def _deform(self, params, model_state, canonical, t, mask=None, dropout_key=None):
        """(Gaussians at t, Δa [M, 3])."""
        da = anchor_displacements(params["anchor_net"], self.s.transformer, model_state["anchors"], t, mask=mask,
                                  dropout_key=dropout_key)
        dx = A.skin(da, model_state["knn_idx"], model_state["knn_w"])
        return apply_offsets(canonical, dx, None, None), da

    def gaussians_at(self, params, model_state, canonical, t, key, stage):
        if stage != "fine":
            return canonical
        return self._deform(params, model_state, canonical, t, dropout_key=key if self.s.dropout_at_eval else None)[0]

    def view_gaussians(self, params, model_state, canonical, times, key, it, settings):
        if settings.stage != "fine":
            return canonical_at_views(canonical, times), None
        m = model_state["anchors"].shape[0]
        n_mask = self.s.n_masked(m)

        def one(t, k):
            k_mask, k_drop = jax.random.split(k)
            if n_mask > 0:
                masked = jax.random.permutation(k_mask, m)[:n_mask]
                mask = jnp.zeros((m,), bool).at[masked].set(True)
            else:
                masked, mask = jnp.zeros((0,), jnp.int32), None
            g, da = self._deform(params, model_state, canonical, t, mask=mask, dropout_key=k_drop)
            return g, da, masked

        keys = jax.random.split(key, times.shape[0])
        g, da, masked = jax.vmap(one)(times, keys)
        return g, {"delta_a": da, "masked": masked}

    # -- losses and gates
    def phys_loss(self, params, model_state, times, cache, key):
        """L_phys per view [V]: L1 between the render pass's masked-anchor Δa and an unmasked teacher pass that
        gets no gradient (its own dropout sample)."""
        def one(t, da, masked, k):
            teacher = jax.lax.stop_gradient(anchor_displacements(
                params["anchor_net"], self.s.transformer, model_state["anchors"], t, dropout_key=k))
            return jnp.mean(jnp.abs(da[masked] - teacher[masked]))

        keys = jax.random.split(key, times.shape[0])
        return jax.vmap(one)(times, cache["delta_a"], cache["masked"], keys)

    def extra_losses(self, params, model_state, active, batch, key, it, settings, render_fn, cache=None):
        if settings.stage != "fine":
            return jnp.zeros(()), {}
        if cache is None:
            canonical = gaussians_from_params(params, active, settings.scale_bound)
            _, cache = self.view_gaussians(params, model_state, canonical, batch["time"], key, it, settings)
        smooth = jnp.mean(jax.vmap(lambda da: A.smoothness_loss(da, model_state["anchor_nbrs"]))(cache["delta_a"]))
        total = self.s.lambda_anchor_smooth * smooth
        metrics = {"loss_anchor_smooth": smooth}
        if self.s.lambda_phys > 0 and cache["masked"].shape[1] > 0:
            phys = jnp.mean(self.phys_loss(params, model_state, batch["time"], cache, key))
            phys = jnp.where(it >= self.s.phys_warmup_steps, phys, 0.0)  # warmup on the global iteration
            total = total + self.s.lambda_phys * phys
            metrics["loss_phys"] = phys
        return total, metrics

    def gates(self, it, settings) -> dict:
        fine = jnp.asarray(settings.stage == "fine")
        return {g: fine for g in GROUPS}

    def eval_times(self, case) -> np.ndarray:
        return four_d_eval_times(case, self.s.eval_cycle_s, self.s.scan_s)


def settings_from_config(config) -> PhysXSettings:
    """PhysXSettings from config.physx (+ data.scan_s, eval.cycle_s); ConfigError on values that cannot work."""
    p = config.physx
    try:
        tr = TransformerConfig(dim=int(p.transformer_dim), heads=int(p.transformer_heads),
                               layers=int(p.transformer_layers), pos_embed_dim=int(p.anchor_pos_embed_dim),
                               time_embed_dim=int(p.anchor_time_embed_dim), dropout=float(p.dropout),
                               time_freq_scale=float(p.time_freq_scale))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    checks = [("num_anchors", p.num_anchors >= 2, ">= 2"), ("anchor_k", p.anchor_k >= 1, ">= 1"),
              ("knn_tau", p.knn_tau > 0, "> 0"), ("smooth_k", p.smooth_k >= 1, ">= 1"),
              ("mask_ratio", 0.0 <= p.mask_ratio < 1.0, "in [0, 1)"), ("lambda_phys", p.lambda_phys >= 0, ">= 0"),
              ("lambda_anchor_smooth", p.lambda_anchor_smooth >= 0, ">= 0"),
              ("phys_warmup_steps", p.phys_warmup_steps >= 0, ">= 0")]
    for name, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"config.physx.{name}={getattr(p, name)!r}: must be {allowed}")
    return PhysXSettings(transformer=tr, num_anchors=int(p.num_anchors), anchor_k=int(p.anchor_k),
                         knn_tau=float(p.knn_tau), smooth_k=int(p.smooth_k), mask_ratio=float(p.mask_ratio),
                         lambda_phys=float(p.lambda_phys), lambda_anchor_smooth=float(p.lambda_anchor_smooth),
                         phys_warmup_steps=int(p.phys_warmup_steps), dropout_at_eval=bool(p.dropout_at_eval),
                         scan_s=float(config.data.scan_s), eval_cycle_s=float(config.eval.cycle_s))


@register("physx")
def make_physx(config, case) -> PhysXModel:
    check_eval_phases(config, case)
    return PhysXModel(settings_from_config(config))
