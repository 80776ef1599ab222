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
from x2gs_jax.models import masking
from x2gs_jax.models.base import (ConfigError, DeformationModel, canonical_at_views, check_eval_phases,
                                  four_d_eval_times, register)
from x2gs_jax.models.transformer import TransformerConfig, anchor_displacements, init_transformer, transformer_labels
from x2gs_jax.train_state import gaussians_from_params

@dataclasses.dataclass(frozen=True)
class PhysXSettings:
    """PhysX-Gaussian settings (defaults = the reference flags, physx.md §1.1, §3)."""

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
    # V10 (§3.1): the render pass is never masked; L_phys compares a separate masked pass with the teacher.
    use_decoupled_mask: bool = False
    # V16 (§3.2): spatio-temporal (time, anchor) token masking with L_lagbert.
    use_spatiotemporal_mask: bool = False
    lambda_lagbert: float = 0.5
    st_window_size: int = 3
    st_time_delta: float = 0.1
    st_mask_ratio: float = 0.3
    st_coupled_render: bool = False  # the render uses the full ST pass's centre slice
    st_mask_embed_scale: float = 1.0
    # True: evaluation of a coupled-render run uses the plain anchor pass, as the reference (a train/test
    # mismatch); False: the same full ST pass the training renders used (dropout off).
    st_eval_faithful: bool = False
    scan_s: float = 60.0
    eval_cycle_s: float = 3.0

    def n_anchors(self, n_points: int) -> int:
        """M: num_anchors, or every point when the initial cloud has fewer."""
        return int(min(self.num_anchors, n_points))

    def n_masked(self, m: int) -> int:
        return int(math.floor(m * self.mask_ratio))

    def n_st_masked(self, m: int) -> int:
        return int(math.floor(self.st_window_size * m * self.st_mask_ratio))

    @property
    def st_coupled(self) -> bool:
        return self.use_spatiotemporal_mask and self.st_coupled_render


class PhysXModel(DeformationModel):
    """PhysX-Gaussian in pure anchor mode (see the module docstring). `PhysXBoostedModel` reuses its anchor
    stream: the render pass (`anchor_pass`), the anchor losses (`anchor_terms`) and the evaluation pass."""

    kind = "physx"
    is_4d = True
    has_period = False
    GROUPS = ("anchor_deformation", "anchor_transformer")

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

    # -- the anchor stream
    def displacements(self, params, model_state, t, *, mask=None, dropout_key=None, flags=None):
        """Δa [M, 3] at time t ([K, M, 3] for times [K])."""
        return anchor_displacements(params["anchor_net"], self.s.transformer, model_state["anchors"], t, mask=mask,
                                    dropout_key=dropout_key, flags=flags, flag_scale=self.s.st_mask_embed_scale)

    def st_pass(self, params, model_state, t, key):
        """V16 (§3.2): (full pass Δa [K, M, 3] over the window around t, L_lagbert []). Both passes have
        dropout and gradient; the masked one flags ⌊K·M·r⌋ random tokens, the full one flags none (E[0] added to
        every token); the target is the full pass under stop-gradient."""
        m = model_state["anchors"].shape[0]
        times = masking.window_times(t, self.s.st_window_size, self.s.st_time_delta)
        k_flag, k_full, k_masked = jax.random.split(key, 3)
        zeros = jnp.zeros((self.s.st_window_size, m), jnp.int32)
        full = self.displacements(params, model_state, times, dropout_key=k_full, flags=zeros)
        n = self.s.n_st_masked(m)
        if n == 0:
            return full, jnp.zeros(())
        idx, flags = masking.token_flags(k_flag, self.s.st_window_size, m, n)
        masked = self.displacements(params, model_state, times, dropout_key=k_masked, flags=flags)
        return full, masking.l1_on(idx, masked.reshape(-1, 3), full.reshape(-1, 3))

    def anchor_pass(self, params, model_state, t, key):
        """The render pass's anchor displacements at one view time: (Δa [M, 3], cache of this view).

        Default: BERT-masked (⌊M·mask_ratio⌋ anchors) with dropout. V10: unmasked. V16 coupled: the centre slice of
        the full spatio-temporal pass (L_lagbert computed here, before the render, as the reference)."""
        m = model_state["anchors"].shape[0]
        k_mask, k_drop, k_st = jax.random.split(key, 3)
        empty = jnp.zeros((0,), jnp.int32)
        if self.s.st_coupled:
            full, lagbert = self.st_pass(params, model_state, t, k_st)
            da = full[self.s.st_window_size // 2]
            return da, {"delta_a": da, "masked": empty, "lagbert": lagbert}
        n_mask = self.s.n_masked(m)
        if n_mask > 0 and not self.s.use_decoupled_mask:
            masked, mask = masking.bert_mask(k_mask, m, n_mask)
        else:
            masked, mask = empty, None
        da = self.displacements(params, model_state, t, mask=mask, dropout_key=k_drop)
        return da, {"delta_a": da, "masked": masked}

    def eval_displacements(self, params, model_state, t, key):
        """Δa [M, 3] for evaluation/inference: unmasked, dropout only with `dropout_at_eval`."""
        drop = key if self.s.dropout_at_eval else None
        if self.s.st_coupled and not self.s.st_eval_faithful:
            zeros = jnp.zeros((self.s.st_window_size, model_state["anchors"].shape[0]), jnp.int32)
            times = masking.window_times(t, self.s.st_window_size, self.s.st_time_delta)
            return self.displacements(params, model_state, times, dropout_key=drop, flags=zeros)[
                self.s.st_window_size // 2]
        return self.displacements(params, model_state, t, dropout_key=drop)

    def skin(self, model_state, delta_a):
        return A.skin(delta_a, model_state["knn_idx"], model_state["knn_w"])

    # -- geometry
    def gaussians_at(self, params, model_state, canonical, t, key, stage):
        if stage != "fine":
            return canonical
        da = self.eval_displacements(params, model_state, t, key)
        return apply_offsets(canonical, self.skin(model_state, da), None, None)

    def view_gaussians(self, params, model_state, canonical, times, key, it, settings):
        if settings.stage != "fine":
            return canonical_at_views(canonical, times), None

        def one(t, k):
            da, cache = self.anchor_pass(params, model_state, t, k)
            return apply_offsets(canonical, self.skin(model_state, da), None, None), cache

        return jax.vmap(one)(times, jax.random.split(key, times.shape[0]))

    # -- losses and gates
    def phys_loss(self, params, model_state, times, cache, key):
        """L_phys per view [V]: L1 over the masked anchors between the student (the render pass's masked Δa, or with
        V10 a separate masked pass) and an unmasked teacher pass that gets no gradient (its own dropout sample)."""
        m = model_state["anchors"].shape[0]

        def one(t, da, masked, k):
            k_teacher, k_mask, k_student = jax.random.split(k, 3)
            teacher = self.displacements(params, model_state, t, dropout_key=k_teacher)
            if self.s.use_decoupled_mask:
                masked, mask = masking.bert_mask(k_mask, m, self.s.n_masked(m))
                da = self.displacements(params, model_state, t, mask=mask, dropout_key=k_student)
            return masking.l1_on(masked, da, teacher)

        keys = jax.random.split(key, times.shape[0])
        return jax.vmap(one)(times, cache["delta_a"], cache["masked"], keys)

    def anchor_terms(self, params, model_state, times, cache, key, it) -> dict:
        """Unweighted anchor losses of a batch ({name: []}): smooth, and phys / lagbert where the variant has them
        (phys already gated by the warmup on the global iteration)."""
        k_phys, k_st = jax.random.split(key)
        m = model_state["anchors"].shape[0]
        terms = {"anchor_smooth": jnp.mean(jax.vmap(lambda da: A.smoothness_loss(da, model_state["anchor_nbrs"]))(
            cache["delta_a"]))}
        if self.s.lambda_phys > 0 and self.s.n_masked(m) > 0 and not self.s.st_coupled:
            phys = jnp.mean(self.phys_loss(params, model_state, times, cache, k_phys))
            terms["phys"] = jnp.where(it >= self.s.phys_warmup_steps, phys, 0.0)  # warmup on the global iteration
        if self.s.use_spatiotemporal_mask:
            if self.s.st_coupled:
                terms["lagbert"] = jnp.mean(cache["lagbert"])
            else:
                keys = jax.random.split(k_st, times.shape[0])
                terms["lagbert"] = jnp.mean(jax.vmap(lambda t, k: self.st_pass(params, model_state, t, k)[1])(
                    times, keys))
        return terms

    def weighted(self, terms: dict):
        lam = {"anchor_smooth": self.s.lambda_anchor_smooth, "phys": self.s.lambda_phys,
               "lagbert": self.s.lambda_lagbert}
        return sum((lam[k] * v for k, v in terms.items()), jnp.zeros(()))

    def extra_losses(self, params, model_state, active, batch, key, it, settings, render_fn, cache=None):
        if settings.stage != "fine":
            return jnp.zeros(()), {}
        k_view, k_terms = jax.random.split(key)
        if cache is None:
            canonical = gaussians_from_params(params, active, settings.scale_bound)
            _, cache = self.view_gaussians(params, model_state, canonical, batch["time"], k_view, it, settings)
        terms = self.anchor_terms(params, model_state, batch["time"], cache, k_terms, it)
        return self.weighted(terms), {f"loss_{k}": v for k, v in terms.items()}

    def gates(self, it, settings) -> dict:
        fine = jnp.asarray(settings.stage == "fine")
        return {g: fine for g in self.GROUPS}

    def eval_times(self, case) -> np.ndarray:
        return four_d_eval_times(case, self.s.eval_cycle_s, self.s.scan_s)


def transformer_from_config(p, flag_embed: bool) -> TransformerConfig:
    try:
        return TransformerConfig(dim=int(p.transformer_dim), heads=int(p.transformer_heads),
                                 layers=int(p.transformer_layers), pos_embed_dim=int(p.anchor_pos_embed_dim),
                                 time_embed_dim=int(p.anchor_time_embed_dim), dropout=float(p.dropout),
                                 time_freq_scale=float(p.time_freq_scale), flag_embed=flag_embed)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def fields_from_config(cls, p, skip=()) -> dict:
    """{field: config.physx.<field> cast to the field's default type} for every field of the settings dataclass
    that the config holds (so every flag is a `--config.physx.<name>` key)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in p:
            continue
        default = f.default
        value = getattr(p, f.name)
        out[f.name] = type(default)(value) if isinstance(default, (bool, int, float, str)) else value
    return out


def check_fields(p, checks) -> None:
    """Raise ConfigError naming config.physx.<name>, its value and what is allowed, for the first failed check."""
    for name, ok, allowed in checks:
        if name in p and not ok(getattr(p, name)):
            raise ConfigError(f"config.physx.{name}={getattr(p, name)!r}: must be {allowed}")


PHYSX_CHECKS = [
    ("num_anchors", lambda v: v >= 2, ">= 2"), ("anchor_k", lambda v: v >= 1, ">= 1"),
    ("knn_tau", lambda v: v > 0, "> 0"), ("smooth_k", lambda v: v >= 1, ">= 1"),
    ("mask_ratio", lambda v: 0.0 <= v < 1.0, "in [0, 1)"), ("lambda_phys", lambda v: v >= 0, ">= 0"),
    ("lambda_anchor_smooth", lambda v: v >= 0, ">= 0"), ("phys_warmup_steps", lambda v: v >= 0, ">= 0"),
    ("lambda_lagbert", lambda v: v >= 0, ">= 0"), ("st_window_size", lambda v: v >= 1, ">= 1"),
    ("st_time_delta", lambda v: v >= 0, ">= 0"), ("st_mask_ratio", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("st_mask_embed_scale", lambda v: v >= 0, ">= 0"),
]


def settings_from_config(config, cls=PhysXSettings, checks=()) -> PhysXSettings:
    """Settings from config.physx (+ data.scan_s, eval.cycle_s); ConfigError on values that cannot work."""
    p = config.physx
    check_fields(p, PHYSX_CHECKS + list(checks))
    flag_embed = bool(p.get("use_spatiotemporal_mask", False))
    return cls(transformer=transformer_from_config(p, flag_embed), scan_s=float(config.data.scan_s),
               eval_cycle_s=float(config.eval.cycle_s),
               **fields_from_config(cls, p, skip=("transformer", "scan_s", "eval_cycle_s")))


@register("physx")
def make_physx(config, case) -> PhysXModel:
    check_eval_phases(config, case)
    return PhysXModel(settings_from_config(config))
