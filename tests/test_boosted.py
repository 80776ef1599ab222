"""PhysX-Boosted: fusion formulas of every mode against closed-form twins (limits α→0/1, ε bounds, residual norms,
the uncertainty gates), M3/M4 losses against brute force (orthogonal fields give zero), V10/V16 masks and which
passes get gradient, the balance / ρ optimiser groups (frozen ρ neither moves nor counts, warmup_cap values), the
boosted model against X2 and PhysX in its limits, the configs' variants; exact continuation of a
`physx_boosted:tiny` run across a densification; `physx_boosted:demo` through train.py and eval.py."""
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import physx_boosted as boosted_config
from x2gs_jax.fields import DeformationConfig, deform, deformation_offsets
from x2gs_jax.gaussians import Gaussians
from x2gs_jax.models import ConfigError, make_model
from x2gs_jax.models import anchors as A
from x2gs_jax.models import fusion as F
from x2gs_jax.models import masking
from x2gs_jax.models import regularisers as R
from x2gs_jax.models.boosted import BoostedSettings, PhysXBoostedModel
from x2gs_jax.models.transformer import TransformerConfig, anchor_displacements
from x2gs_jax.optim import group_specs_from_config, group_state, make_optimizer
from x2gs_jax.train_state import gaussians_from_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = TransformerConfig(dim=16, heads=2, layers=1, pos_embed_dim=8, time_embed_dim=4)
FIELD = DeformationConfig(resolution=(4, 4, 4, 6), multires=(1,), features=4, net_width=8)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------------ fusion
def test_fusion_weights_and_combine_match_closed_forms():
    rng = np.random.default_rng(0)
    dx_l, dx_e, ds_e = (rng.normal(size=(7, 3)).astype(np.float32) for _ in range(3))
    dr_e = rng.normal(size=(7, 4)).astype(np.float32)
    # fixed_alpha: α = sigmoid(τ), τ0 = logit(α_init); the exact limits ignore τ; no balance = plain sum.
    assert F.balance_tau0(0.99) == pytest.approx(4.5951, abs=1e-4)
    assert F.balance_tau0(0.985) == pytest.approx(4.1846, abs=1e-4) and F.balance_tau0(0.5) == 0.0
    w_l, w_e = F.fixed_alpha_weights(jnp.float32(F.balance_tau0(0.99)), 0.99, True)
    assert float(w_l) == pytest.approx(0.99, abs=1e-6) and float(w_e) == pytest.approx(0.01, abs=1e-6)
    for alpha_init, want in ((0.0, (0, 1)), (1.0, (1, 0))):
        w = F.fixed_alpha_weights(jnp.float32(123.0), alpha_init, True)
        assert (float(w[0]), float(w[1])) == want
    assert tuple(map(float, F.fixed_alpha_weights(None, 0.3, False))) == (1.0, 1.0)
    dx, ds, dr = F.combine(0.99, 0.01, dx_l, dx_e, ds_e, dr_e)
    np.testing.assert_allclose(dx, 0.99 * dx_l + 0.01 * dx_e, rtol=1e-6)
    np.testing.assert_allclose(ds, 0.01 * ds_e, rtol=1e-6)
    np.testing.assert_allclose(dr, 0.01 * dr_e, rtol=1e-6)
    dx, ds, dr = F.combine(1.0, 0.0, dx_l, dx_e, ds_e, dr_e)  # pure anchor: no scale / rotation change
    np.testing.assert_array_equal(dx, dx_l)
    assert float(jnp.abs(ds).max()) == 0 and float(jnp.abs(dr).max()) == 0
    # Residual normalisers: tanh elementwise, RMS 1 / norm 1 per point, identity.
    np.testing.assert_allclose(F.normalise_residual(dr_e, "tanh"), np.tanh(dr_e), rtol=1e-6)
    rms = np.sqrt(np.mean(np.asarray(F.normalise_residual(dr_e, "rmsnorm")) ** 2, -1))
    np.testing.assert_allclose(rms, 1.0, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(F.normalise_residual(dx_e, "unitnorm"), axis=-1), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(F.normalise_residual(dx_e, "identity"), dx_e)
    np.testing.assert_allclose(F.normalise_residual(dx_e, "rmsnorm", 1e-6),
                               dx_e / np.sqrt((dx_e ** 2).mean(-1, keepdims=True) + 1e-6), rtol=1e-5)
    dx, ds, _ = F.combine(0.97, 0.03, dx_l, dx_e, ds_e, dr_e, "tanh")
    np.testing.assert_allclose(dx, 0.97 * dx_l + 0.03 * np.tanh(dx_e), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ds, 0.03 * np.tanh(ds_e), rtol=1e-5, atol=1e-7)


def test_uncertainty_gates_and_perturbation_bounds():
    s_e = np.linspace(-8, 3, 12, dtype=np.float32)[:, None]
    kw = dict(gamma_max=0.005, gate_tau=0.0, gate_lambda=1.0, sigma_l2=0.01, beta_min=0.0, beta_max=1.0,
              alpha_init=0.99)
    w_l, w_e = F.uncertainty_weights(jnp.asarray(s_e), "m1_2", **kw)
    gamma = 0.005 * np.tanh((0.0 - s_e) / (1.0 + 1e-8))
    np.testing.assert_allclose(w_e, 0.01 + gamma, rtol=1e-5)
    np.testing.assert_allclose(w_l, 0.99 - gamma, rtol=1e-5)
    assert float(jnp.max(w_e)) <= 0.015 + 1e-7 and float(jnp.min(w_e)) >= 0.005 - 1e-7  # |γ| <= γ_max
    _, beta = F.uncertainty_weights(jnp.asarray(s_e), "bayes", **kw)
    np.testing.assert_allclose(beta, 0.01 / (0.01 + np.exp(s_e) + 1e-8), rtol=1e-5)
    assert float(F.uncertainty_weights(jnp.zeros((1, 1)), "bayes", **kw)[1][0, 0]) == pytest.approx(0.01 / 1.01)
    w_l, beta = F.uncertainty_weights(jnp.asarray(s_e), "sigmoid", **{**kw, "gate_tau": -4.6, "beta_max": 0.5})
    np.testing.assert_allclose(beta, np.clip(_sig((-4.6 - s_e) / (1.0 + 1e-8)), 0, 0.5), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w_l) + np.asarray(beta), 1.0, rtol=1e-6)
    w_l, w_e = F.uncertainty_weights(jnp.asarray(s_e), "fixed", **kw)  # M1.3: the gate replaced by α
    np.testing.assert_allclose(w_e, 0.01, rtol=1e-5)
    np.testing.assert_allclose(w_l, 0.99, rtol=1e-6)
    # M2: ε = ε_max sigmoid(ρ) lies in (0, ε_max); ρ0 gives ε_init (0.015/0.03 and 0.01/0.02 both give ρ0 = 0).
    assert F.rho_init(0.015, 0.03) == 0.0 and F.rho_init(0.01, 0.02) == 0.0
    rho = jnp.linspace(-30, 30, 61)
    eps = F.perturb_bound(rho, 0.03)
    assert float(eps.min()) >= 0 and float(eps.max()) <= 0.03
    assert float(F.perturb_bound(jnp.float32(F.rho_init(0.012, 0.03)), 0.03)) == pytest.approx(0.012, rel=1e-5)
    # warmup_cap: min(ε, ε_max min(s / warmup, 1)) with s = it - 1 (the reference's off-by-one).
    for it, want in ((1, 0.0), (11, 0.03 * 10 / 100), (51, 0.015), (500, 0.015)):
        got = F.scheduled_eps(jnp.float32(0.015), jnp.int32(it), "warmup_cap", 0.03, 100)
        assert float(got) == pytest.approx(want, abs=1e-7), it
    assert float(F.scheduled_eps(jnp.float32(0.015), 1, "freeze_rho", 0.03, 100)) == pytest.approx(0.015)


# ------------------------------------------------------------------------------------------ M3 / M4
def test_lp_loss_matches_brute_force_and_subsample_is_valid():
    rng = np.random.default_rng(1)
    p = rng.normal(size=(30, 3)).astype(np.float32)
    d = rng.normal(size=(30, 3)).astype(np.float32)
    valid = np.ones(30, bool)
    valid[[3, 17]] = False
    for mode in ("knn_mean", "graph_laplacian"):
        got = float(R.lp_loss(jnp.asarray(d), jnp.asarray(p), jnp.asarray(valid), 4, mode))
        vals = []
        for i in np.flatnonzero(valid):
            dist = ((p - p[i]) ** 2).sum(-1)
            dist[i] = np.inf
            dist[~valid] = np.inf
            mean = d[np.argsort(dist)[:4]].mean(0)
            lp = mean if mode == "knn_mean" else d[i] - mean
            vals.append((lp ** 2).sum())
        assert got == pytest.approx(np.mean(vals), rel=1e-5), mode
    # Gradient reaches Δ, never the positions.
    g = jax.grad(lambda x: R.lp_loss(jnp.asarray(d), x, jnp.asarray(valid), 4))(jnp.asarray(p))
    assert float(jnp.abs(g).max()) == 0
    idx, ok = R.subsample(jax.random.PRNGKey(0), jnp.asarray(valid), 20)
    assert len(set(np.asarray(idx).tolist())) == 20 and bool(ok.all()) and valid[np.asarray(idx)].all()
    idx, ok = R.subsample(jax.random.PRNGKey(0), jnp.asarray(valid), 30)  # more picks than valid slots
    assert int(ok.sum()) == 28 and set(np.asarray(idx)[np.asarray(ok)].tolist()) == set(np.flatnonzero(valid))


def test_decoupling_penalty_vanishes_for_orthogonal_fields():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(50, 3)).astype(np.float32)
    b = np.cross(a, rng.normal(size=(50, 3))).astype(np.float32)  # orthogonal to a, row by row
    valid = jnp.ones(50, bool)
    assert float(R.cos_penalty(jnp.asarray(a), jnp.asarray(b), valid)) < 1e-10
    assert float(R.cos_penalty(jnp.asarray(a), jnp.asarray(-3 * a), valid)) == pytest.approx(1.0, rel=1e-5)
    assert float(R.cos_penalty(jnp.asarray(a), jnp.asarray(-3 * a), valid, squared=False)) == pytest.approx(1.0)
    cos = (a * (a + b)).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(a + b, axis=-1))
    assert float(R.cos_penalty(jnp.asarray(a), jnp.asarray(a + b), valid)) == pytest.approx(np.mean(cos ** 2),
                                                                                             rel=1e-4)
    # A zero field (the Eulerian velocity at initialisation) gives zero, with finite gradients.
    z = jax.grad(lambda x: R.cos_penalty(x, jnp.asarray(a), valid))(jnp.zeros((50, 3)))
    assert bool(jnp.all(jnp.isfinite(z)))
    assert float(R.balance_loss(jnp.float32(0.8))) == pytest.approx(0.09)
    assert float(R.gate_loss(jnp.asarray([[0.2], [-0.4], [9.0]]), jnp.asarray([True, True, False]))) == \
        pytest.approx(0.3)


# ------------------------------------------------------------------------------------------ the model
class _Settings:
    def __init__(self, stage, lambda_tv=0.0):
        self.stage, self.scale_bound, self.lambda_tv = stage, None, lambda_tv


def _boosted(n=60, **kw):
    rng = np.random.default_rng(5)
    g = Gaussians.from_activated(rng.uniform(-0.6, 0.6, (n, 3)).astype(np.float32), np.full((n, 3), 0.05, np.float32),
                                 np.tile(np.array([[1.0, 0, 0, 0]], np.float32), (n, 1)),
                                 rng.uniform(0.2, 1.0, n).astype(np.float32), capacity=n + 6)
    s = dict(transformer=SMALL, field=FIELD, num_anchors=12, anchor_k=3, mask_ratio=0.0, balance_alpha_init=0.9)
    s.update(kw)
    if s.get("use_spatiotemporal_mask"):
        s["transformer"] = TransformerConfig(**{**SMALL.__dict__, "flag_embed": True})
    model = PhysXBoostedModel(BoostedSettings(**s))
    params = {"xyz": g.xyz, "scaling": g.scaling, "rotation": g.rotation, "density": g.density}
    params.update(model.init_params(jax.random.PRNGKey(0), None))
    # The time planes start at 1 (no time dependence): perturb the grid so that Eulerian velocities are non-zero.
    leaves, tree = jax.tree.flatten(params["field"]["grid"])
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    params["field"]["grid"] = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                                        for x, k in zip(leaves, keys)])
    return model, params, model.init_model_state(jax.random.PRNGKey(1), g), g


def test_boosted_deformation_in_its_limits_equals_x2_and_physx():
    t = 0.37
    model, params, ms, g = _boosted()
    assert set(params) >= {"anchor_net", "field", "balance"} and "rho" not in params and "uncertainty" not in params
    act = np.asarray(g.active)[:, None]
    da = anchor_displacements(params["anchor_net"], SMALL, ms["anchors"], t)
    dx_l = np.asarray(A.skin(da, ms["knn_idx"], ms["knn_w"]))
    out = deformation_offsets(params["field"], jnp.where(g.active[:, None], g.xyz, 0.0), t, FIELD)
    got = model.gaussians_at(params, ms, g, t, None, "fine")
    np.testing.assert_allclose(got.xyz, g.xyz + act * (0.9 * dx_l + 0.1 * np.asarray(out["dx"])), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(got.scaling, g.scaling + act * 0.1 * np.asarray(out["ds"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.rotation, g.rotation + act * 0.1 * np.asarray(out["dr"]), rtol=1e-5, atol=1e-6)
    # α_init = 0: the X2 deformation of the same field; α_init = 1: PhysX's pure anchor mode.
    m0, p0, ms0, _ = _boosted(balance_alpha_init=0.0)
    x2 = deform(p0["field"], g, t, None, FIELD)[0]
    chex.assert_trees_all_close(m0.gaussians_at(p0, ms0, g, t, None, "fine"), x2, rtol=1e-5, atol=1e-6)
    m1, p1, ms1, _ = _boosted(balance_alpha_init=1.0)
    pure = m1.gaussians_at(p1, ms1, g, t, None, "fine")
    da1 = anchor_displacements(p1["anchor_net"], SMALL, ms1["anchors"], t)
    np.testing.assert_allclose(pure.xyz, g.xyz + act * np.asarray(A.skin(da1, ms1["knn_idx"], ms1["knn_w"])),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pure.scaling, g.scaling)
    np.testing.assert_array_equal(pure.rotation, g.rotation)
    # Fusion fields for the visualisation: β = w_E everywhere.
    f = model.fusion_fields(params, ms, g, t)
    np.testing.assert_allclose(f["beta"], 0.1, rtol=1e-5)
    assert f["s_e"] is None and f["dx_e"].shape == (g.capacity, 3)


def _grads(model, params, ms, g, it=20, lambda_tv=0.0, stage="fine"):
    batch = {"time": jnp.asarray([0.2, 0.6], jnp.float32)}

    def total(p):
        canonical = gaussians_from_params(p, g.active, None)
        _, cache = model.view_gaussians(p, ms, canonical, batch["time"], jax.random.PRNGKey(3), it,
                                        _Settings(stage, lambda_tv))
        return model.extra_losses(p, ms, g.active, batch, jax.random.PRNGKey(4), it, _Settings(stage, lambda_tv),
                                  None, cache)

    (loss, metrics), grads = jax.value_and_grad(total, has_aux=True)(params)
    return loss, metrics, grads


def _zero(tree):
    return all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(tree))


def test_boosted_losses_and_gradients():
    # M1 + M3 + M4 on, BERT mask on: every term present, L_gate reaches the uncertainty head.
    model, params, ms, g = _boosted(fusion_mode="uncertainty_gated", m1_lambda_gate=1.0, lp_enable=True,
                                    lp_subsample=40, decouple_enable=True, decouple_subsample=30, mask_ratio=0.25,
                                    phys_warmup_steps=0)
    loss, m, grads = _grads(model, params, ms, g)
    for k in ("loss_phys", "loss_anchor_smooth", "loss_gate", "loss_lp", "loss_decouple", "loss_plane_tv"):
        assert k in m and np.isfinite(float(m[k])), k
    assert float(m["loss_lp"]) > 0 and float(m["loss_decouple"]) > 0
    assert not _zero(grads["uncertainty"]) and not _zero(grads["field"]["grid"])
    # Coarse stage: nothing.
    assert _grads(model, params, ms, g, stage="coarse")[0] == 0.0
    # The TV patch sees stop-gradient geometry: only the density gets gradient through it.
    def through_tv(p):
        r = model.regulariser_gaussians(gaussians_from_params(p, g.active, None))
        return jnp.sum(r.density) + jnp.sum(r.xyz) + jnp.sum(r.scaling) + jnp.sum(r.rotation)

    gt = jax.grad(through_tv)(params)
    assert _zero(gt["xyz"]) and _zero(gt["scaling"]) and _zero(gt["rotation"]) and not _zero(gt["density"])


@pytest.mark.slow
def test_faithful_cache_semantics_and_m34_switch():
    _, params, ms, g = _boosted(fusion_mode="uncertainty_gated", m1_lambda_gate=1.0, lp_enable=True,
                                lp_subsample=40, decouple_enable=True, decouple_subsample=30, mask_ratio=0.25,
                                phys_warmup_steps=0)
    # The reference's cache clobbering: a TV pass in the iteration zeroes L_phys and stops L_smooth / L_gate / L_LP.
    faithful, *_ = _boosted(fusion_mode="uncertainty_gated", m1_lambda_gate=1.0, lp_enable=True, lp_subsample=40,
                            mask_ratio=0.25, phys_warmup_steps=0, faithful_cache_semantics=True, disable_4d_tv=True,
                            lambda_anchor_smooth=1.0)
    _, m_tv, g_tv = _grads(faithful, params, ms, g, lambda_tv=0.05)
    _, m_no, g_no = _grads(faithful, params, ms, g, lambda_tv=0.0)
    assert float(m_tv["loss_phys"]) == 0.0 and float(m_no["loss_phys"]) > 0
    assert float(m_tv["loss_anchor_smooth"]) == pytest.approx(float(m_no["loss_anchor_smooth"]))
    assert _zero(g_tv["uncertainty"]) and not _zero(g_no["uncertainty"])
    assert _zero(g_tv["anchor_net"]) and not _zero(g_no["anchor_net"])
    # M3/M4 inert outside bounded_perturb only with the reference's switch.
    ref, *_ = _boosted(lp_enable=True, decouple_enable=True, m34_bounded_perturb_only=True)
    assert not {"loss_lp", "loss_decouple"} & set(_grads(ref, params | {"balance": jnp.float32(2.0)}, ms, g)[1])


@pytest.mark.slow
def test_decoupling_modes_fixed_vs_faithful():
    for mode in ("velocity_corr", "stochastic_jacobian_corr"):
        model, params, ms, g = _boosted(decouple_enable=True, decouple_mode=mode, decouple_subsample=25,
                                        transformer=TransformerConfig(**{**SMALL.__dict__, "dropout": 0.0}))
        canonical = gaussians_from_params(params, g.active, None)
        times = jnp.asarray([0.3], jnp.float32)
        dec = model.decouple_term(params, ms, canonical, times, jax.random.PRNGKey(0))
        assert 0 < float(dec) <= 1
        # stopgrad_L: the anchor network gets no gradient from L_decouple; the Eulerian field does.
        gr = jax.grad(lambda p: model.decouple_term(p, ms, canonical, times, jax.random.PRNGKey(0)))(params)
        assert _zero(gr["anchor_net"]) and not _zero(gr["field"])
    # The reference's Jacobian: L ignores positions, so without dropout g_L = 0 and the penalty is 0.
    model, params, ms, g = _boosted(decouple_enable=True, decouple_mode="stochastic_jacobian_corr",
                                    decouple_faithful=True, decouple_subsample=25,
                                    transformer=TransformerConfig(**{**SMALL.__dict__, "dropout": 0.0}))
    canonical = gaussians_from_params(params, g.active, None)
    assert float(model.decouple_term(params, ms, canonical, jnp.asarray([0.3]), jax.random.PRNGKey(0))) == 0.0


def test_v10_and_v16_masks_and_gradients():
    t = jnp.float32(0.5)
    np.testing.assert_allclose(masking.window_times(0.05, 3, 0.1), [0.0, 0.05, 0.15], atol=1e-7)
    np.testing.assert_allclose(masking.window_times(0.5, 4, 0.1), [0.3, 0.4, 0.5, 0.6], atol=1e-7)
    idx, flags = masking.token_flags(jax.random.PRNGKey(0), 3, 12, 10)
    assert int(flags.sum()) == 10 and len(set(np.asarray(idx).tolist())) == 10
    assert np.asarray(flags).reshape(-1)[np.asarray(idx)].all()
    # V10: the render pass is unmasked; L_phys comes from a separate masked pass.
    model, params, ms, g = _boosted(use_decoupled_mask=True, mask_ratio=0.25, phys_warmup_steps=0)
    da, cache = model.anchor_pass(params, ms, t, jax.random.PRNGKey(1))
    assert cache["masked"].shape == (0,)
    k_drop = jax.random.split(jax.random.PRNGKey(1), 3)[1]
    chex.assert_trees_all_close(da, model.displacements(params, ms, t, dropout_key=k_drop))
    _, m, _ = _grads(model, params, ms, g)
    assert float(m["loss_phys"]) > 0
    # V16 coupled: the render uses the full ST pass's centre slice; L_lagbert's target is detached.
    model, params, ms, g = _boosted(use_spatiotemporal_mask=True, st_window_size=3, st_mask_ratio=0.5,
                                    st_coupled_render=True, st_mask_embed_scale=0.1, lambda_lagbert=1.0)
    assert params["anchor_net"]["mask_flag_embed"].shape == (2, SMALL.dim)
    da, cache = model.anchor_pass(params, ms, t, jax.random.PRNGKey(2))
    k_st = jax.random.split(jax.random.PRNGKey(2), 3)[2]
    full, lagbert = model.st_pass(params, ms, t, k_st)
    chex.assert_trees_all_close(da, full[1])
    assert float(lagbert) > 0 and float(cache["lagbert"]) == pytest.approx(float(lagbert))
    # Full pass = plain tokens + 0.1 E[0]: differs from a pass without the flag embedding.
    plain = anchor_displacements(params["anchor_net"], model.s.transformer, ms["anchors"],
                                 masking.window_times(t, 3, 0.1))
    with_e0 = model.displacements(params, ms, masking.window_times(t, 3, 0.1), flags=jnp.zeros((3, 12), jnp.int32))
    assert float(jnp.abs(plain - with_e0).max()) > 1e-6

    def lag(p, frozen_full):
        k_flag, _, k_masked = jax.random.split(k_st, 3)
        idx, flags = masking.token_flags(k_flag, 3, 12, model.s.n_st_masked(12))
        masked = model.displacements(p, ms, masking.window_times(t, 3, 0.1), dropout_key=k_masked, flags=flags)
        return masking.l1_on(idx, masked.reshape(-1, 3), frozen_full.reshape(-1, 3))

    g_model = jax.grad(lambda p: model.st_pass(p, ms, t, k_st)[1])(params)
    g_twin = jax.grad(lambda p: lag(p, full))(params)  # the full pass as a constant
    chex.assert_trees_all_close(g_model, g_twin, atol=1e-6)
    assert float(jnp.abs(g_model["anchor_net"]["mask_flag_embed"][1]).max()) > 0


def test_balance_and_rho_groups_freeze_and_count():
    for kw, group, moves in ((dict(balance_lr=0.0), "balance", False), (dict(balance_lr=1e-2), "balance", True),
                             (dict(balance_lr=0.0, balance_lr_faithful=True), "balance", True)):
        model, params, *_ = _boosted(**kw)
        p = {"balance": params["balance"]}
        opt = make_optimizer(group_specs_from_config({}, {}, model.group_specs()), {"balance": "balance"})
        st = opt.init(p)
        up, st = opt.update({"balance": jnp.float32(1.0)}, st, p, step=100, gates=model.gates(100, _Settings("fine")))
        assert (float(jnp.abs(up["balance"])) > 0) == moves, kw
        assert int(group_state(st, "balance").count) == int(moves)
    # freeze_rho: ρ's gate is closed for global iterations < freeze_steps (no move, no Adam count), then opens.
    model, params, *_ = _boosted(fusion_mode="bounded_perturb", schedule_mode="freeze_rho", freeze_steps=50)
    p = {"rho": params["rho"]}
    assert float(p["rho"]) == 0.0
    opt = make_optimizer(group_specs_from_config({}, {}, model.group_specs()), {"rho": "rho"})
    st = opt.init(p)
    counts = []
    for it in (48, 49, 50, 51):
        up, st = opt.update({"rho": jnp.float32(-1.0)}, st, p, step=it, gates=model.gates(it, _Settings("fine")))
        p = {"rho": p["rho"] + up["rho"]}
        counts.append(int(group_state(st, "rho").count))
    assert counts == [0, 0, 1, 2] and float(p["rho"]) == pytest.approx(2e-3, rel=1e-3)
    faithful, *_ = _boosted(fusion_mode="bounded_perturb", rho_faithful=True)
    opt = make_optimizer(group_specs_from_config({}, {}, faithful.group_specs()), {"rho": "rho"})
    up, st = opt.update({"rho": jnp.float32(-1.0)}, opt.init(p), p, step=10 ** 6, gates={})
    assert float(up["rho"]) == 0.0 and int(group_state(st, "rho").count) == 0


def test_config_variants_and_validation(tmp_path):
    c = boosted_config.get_config()
    p = c.physx
    assert (c.model.kind, c.train.iterations, p.balance_alpha_init, p.balance_lr, p.lambda_balance, p.mask_ratio,
            c.loss.lambda_prior, c.loss.lambda_tv) == ("physx_boosted", 50000, 0.99, 0.0, 0.0, 0.0, 0.0, 0.0)
    seed_flags = {"use_learnable_balance", "balance_alpha_init", "balance_lr", "lambda_balance", "fusion_mode",
                  "gamma_max", "gate_tau", "gate_lambda", "m1_lambda_gate", "gate_mode", "sigma_L2", "beta_min",
                  "beta_max", "eps_max", "eps_init", "use_tanh", "residual_mode", "norm_eps", "schedule_mode",
                  "freeze_steps", "warmup_steps", "lp_enable", "lambda_lp", "lp_mode", "lp_k", "lp_subsample",
                  "decouple_enable", "lambda_decouple", "decouple_mode", "decouple_subsample", "decouple_stopgrad_L",
                  "decouple_dt", "decouple_num_dirs", "decouple_use_squared_cos", "use_decoupled_mask",
                  "use_spatiotemporal_mask", "lambda_lagbert", "st_window_size", "st_time_delta", "st_mask_ratio",
                  "st_coupled_render", "st_mask_embed_scale", "mask_ratio", "lambda_phys", "num_anchors"}
    assert seed_flags <= set(p.keys())
    names = ("v10", "v16", "m1_2", "m1_bayes", "m1_sigmoid", "m1_3a", "m2_05", "m2_1a_freeze", "m2_2a_rmsnorm",
             "m3_lp_knn", "m4_vel", "m4_jac", "faithful")
    for name in names:
        doc = boosted_config.__doc__
        assert f"  {name} " in doc, name  # each variant documented with its seed name
        v = boosted_config.get_config("tiny," + name)
        model = make_model(v, None)  # every variant builds
        assert model.kind == "physx_boosted"
    assert boosted_config.get_config("ref64,m2_05").physx.residual_mode == "identity"
    with pytest.raises(ValueError, match="unknown variant 'm9'"):
        boosted_config.get_config("tiny,m9")
    bad = boosted_config.get_config("tiny")
    bad.physx.fusion_mode = "sum"
    with pytest.raises(ConfigError, match="physx.fusion_mode='sum'.*fixed_alpha"):
        make_model(bad, None)
    bad = boosted_config.get_config("tiny")
    bad.physx.lp_subsample = 0
    with pytest.raises(ConfigError, match="physx.lp_subsample=0"):
        make_model(bad, None)


def test_every_variant_exports_and_loads_back(tmp_path):
    """The export of each parameter layout (balance τ_α / uncertainty head / ρ / V16 flag table) loads back into the
    model's structure with equal values, so eval.py evaluates every variant."""
    from x2gs_jax import train_lib
    from x2gs_jax.data.naf import load_case
    from x2gs_jax.export import export_inference, load_export

    for i, variant in enumerate(("tiny", "tiny,m1_bayes", "tiny,m2_05", "tiny,v16")):
        config = boosted_config.get_config(variant)
        config.data.cache_dir = str(tmp_path / "cache")
        path = train_lib.resolve_case_path(config)
        case = load_case(path)
        model = make_model(config, case)
        state = train_lib.init_state(config, case, train_lib.initial_points(path, case, config), model)
        run = tmp_path / f"run{i}"
        export_inference(str(run), state, config, case)
        params, model_state, active, _ = load_export(str(run / "export"), model, case)
        chex.assert_trees_all_equal(params, dict(state.params))
        chex.assert_trees_all_equal(model_state, dict(state.model_state))
        np.testing.assert_array_equal(active, np.asarray(state.active))


# ------------------------------------------------------------------------------- through train.py
def _cmd(workdir, cache, *extra, config="configs/physx_boosted.py:tiny"):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config=" + os.path.join(ROOT, config),
            f"--workdir={workdir}", f"--config.data.cache_dir={cache}", "--config.densify.max_num_gaussians=2000",
            "--config.train.steps_per_call=2", *extra]


@pytest.mark.slow
def test_exact_continuation_of_a_boosted_tiny_run(tmp_path):
    """Bounded perturbation (ρ trained, frozen until 9) + BERT mask + M3 + M4 on `physx_boosted:tiny`: uninterrupted
    == killed after its first checkpoint (step 8) + restored in a fresh process, across the densification at 12:
    identical losses, Gaussians, ρ, anchors, binding and both streams."""
    from tests.test_train import _losses, _run_killed_after_first_checkpoint

    cache = str(tmp_path / "cache")
    flags = ["--config.physx.mask_ratio=0.25", "--config.physx.phys_warmup_steps=8", "--config.physx.lp_enable=true",
             "--config.physx.lp_subsample=64", "--config.physx.decouple_enable=true",
             "--config.physx.decouple_subsample=64", "--config.physx.schedule_mode=freeze_rho",
             "--config.physx.freeze_steps=9"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    config = "configs/physx_boosted.py:tiny,m2_2a_rmsnorm"
    subprocess.run(_cmd(straight, cache, *flags, config=config), check=True, env=env, cwd=ROOT, capture_output=True)
    steps = _run_killed_after_first_checkpoint(_cmd(broken, cache, *flags, "--config.train.iterations=400",
                                                    config=config), broken, env)
    assert steps and steps[-1] < 12, f"the run was not interrupted before the last densification ({steps})"
    subprocess.run(_cmd(broken, cache, *flags, f"--config.resume={broken}", config=config), check=True, env=env,
                   cwd=ROOT, capture_output=True)
    for name in ("gaussians.npz", "model_state.npz"):
        a, b = np.load(straight / "export" / name), np.load(broken / "export" / name)
        assert a.files == b.files
        chex.assert_trees_all_equal(dict(a), dict(b))
    assert "rho" in np.load(straight / "export" / "gaussians.npz").files
    import orbax.checkpoint as ocp

    for part in ("anchor_net", "field"):
        with ocp.StandardCheckpointer() as ck:
            chex.assert_trees_all_equal(ck.restore(os.path.abspath(straight / "export" / part)),
                                        ck.restore(os.path.abspath(broken / "export" / part)))
    la, lb = _losses(straight), _losses(broken)
    for s in range(steps[-1] + 1, 17):
        assert la[s] == lb[s], (s, la[s], lb[s])
    recs = [json.loads(line) for line in open(straight / "metrics.jsonl") if '"train"' in line]
    eps = {r["step"]: r["eps"] for r in recs if "eps" in r}
    # ρ frozen until iteration 9 (ε stays at ε_init = 0.01), then trained.
    assert eps[8] == pytest.approx(0.01, rel=1e-5) and eps[16] != pytest.approx(0.01, rel=1e-6)
    fine = [r for r in recs if r["step"] >= 8]
    assert fine and all(r["loss_phys"] > 0 and r["loss_lp"] > 0 for r in fine)
    # L_decouple is 0 while the Eulerian field has no time dependence (time planes at their initial 1).
    assert recs[-1]["loss_decouple"] > 0


@pytest.mark.slow
def test_boosted_demo_through_train_py_and_eval_py(tmp_path):
    """`physx_boosted:demo` (shortened, α learned at 1e-3) through train.py and eval.py, and the β visualisation."""
    cache, run = str(tmp_path / "cache"), tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(_cmd(run, cache, "--config.train.iterations=40", "--config.train.coarse_iterations=20",
                        "--config.physx.balance_lr=0.001", "--config.densify.from_iter=10",
                        "--config.densify.interval=10", "--config.densify.until_iter=35",
                        "--config.eval.iterations=(40,)", "--config.checkpoint.every=20", "--config.log.every=5",
                        "--config.densify.max_num_gaussians=7000", config="configs/physx_boosted.py:demo"),
                   check=True, env=env, cwd=ROOT, capture_output=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--workdir={run}", "--tidal_points=16",
                    "--gif_frames=3"], check=True, env=env, cwd=ROOT, capture_output=True)
    m = json.load(open(run / "eval" / "metrics.json"))
    assert m["source"] == "export" and m["stage"] == "fine" and m["is_4d"]
    assert len(m["psnr_3d"]) == 10 and m["psnr_3d_mean"] > 10
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    final = [r for r in recs if r["kind"] == "eval" and r["step"] == 40][0]
    assert m["psnr_3d_mean"] == pytest.approx(final["psnr_3d_mean"], abs=1e-3)  # eval.py == in-training evaluation
    alphas = [r["alpha"] for r in recs if r["kind"] == "train" and "alpha" in r]
    assert alphas[0] == pytest.approx(0.99, abs=1e-3) and alphas[-1] != alphas[0]  # α learned at 1e-3
    out = subprocess.run([sys.executable, "-m", "x2gs_jax.viz.beta", f"--workdir={run}", "--time=0.5"], env=env,
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    z = np.load(run / "beta" / "beta_volume_t0.50.npz")
    assert set(z.files) >= {"beta_volume", "positions", "beta", "pos_min", "pos_max", "time"}
    np.testing.assert_allclose(z["beta"], 1 - alphas[-1], rtol=1e-3)  # β = 1 - α for fixed_alpha
    for f in ("beta_slice_t0.50.png", "beta_stats_t0.50.png"):
        assert (run / "beta" / f).exists(), f
