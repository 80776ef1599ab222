"""PhysX-Boosted (the seed's main recipe, physx.md §2): X2's HexPlane deformation as an Eulerian stream beside
PhysX-Gaussian's anchor (Lagrangian) stream, fused with a balance α: Δx = (1-α)Δx_E + αΔx_L, Δs = (1-α)Δs_E,
Δr = (1-α)Δr_E.

  python train.py --config=configs/physx_boosted.py --workdir=runs/boosted                   # the main recipe
  python train.py --config=configs/physx_boosted.py:demo --workdir=runs/boosted_demo         # CPU, minutes
  python train.py --config=configs/physx_boosted.py:ref64 --workdir=runs/boosted_ref64       # comparison case
  python train.py --config=configs/physx_boosted.py:ref64,v10 --workdir=runs/boosted_v10     # size + variant
  python eval.py --workdir=runs/boosted
  python -m x2gs_jax.viz.beta --workdir=runs/boosted --time=0.5                              # fusion weights

Defaults = the seed's V5 command (`--use_anchor_deformation --use_boosted --use_learnable_balance
--balance_alpha_init 0.99 --balance_lr 0 --lambda_balance 0 --lambda_prior 0 --lambda_tv 0 --iterations 50000
--mask_ratio 0.0`): 50 000 iterations (5 000 static), α fixed at 0.99 (balance_lr 0 is honoured here; the
reference learns α at 1e-3 regardless: physx.balance_lr_faithful=True), no BERT mask, no prior or 3D TV; the
loss is L1 + 0.25 DSSIM + 4D-TV of the boosted grid + 0.01 L_smooth. Every flag of the seed's tables is
`--config.physx.<name>`.

The argument is a comma-separated list: at most one size (demo, tiny, ref64) and any of the seed's variants:
  v10            V10 decoupled mask, mask_ratio 0.25
  v16            V16.x spatio-temporal masking as the README run: window 1, δ 0.1, token mask 0.5, lambda_lagbert 0.1,
                 coupled render, mask-embedding scale 0.1, BERT mask 0
  m1_2           M1.2 uncertainty gate as the CHANGELOG's best run: γ_max 0.005, τ_g 0
  m1_bayes       M1-Bayes v3: β = σ_L²/(σ_L² + exp(s_E)), σ_L² 0.01
  m1_sigmoid     M1-Sigmoid v3: β = sigmoid((τ_g - s_E)/λ_g), τ_g -4.6
  m1_3a          M1.3-a: the M1 code path with the gate replaced by the fixed α (w_E = 1 - balance_alpha_init)
  m2_05          M2.05 bounded perturbation, weighted average without normaliser (ε_max 0.02, ε_init 0.01)
  m2_1a_freeze   M2.1-a bounded perturbation (tanh) with ρ frozen for the first 2 000 fine iterations
                 (freeze_steps counts global iterations: coarse + 2 000)
  m2_2a_rmsnorm  M2.2-a bounded perturbation with RMS-normalised residuals
  m3_lp_knn      M3 low-frequency leakage penalty (knn_mean), on V5
  m4_vel         M4 velocity decoupling (velocity_corr), on V5
  m4_jac         M4 stochastic Jacobian decoupling, on V5
  faithful       the reference's bugs back on (balance lr 1e-3, ρ never trained, M3/M4 only with bounded_perturb,
                 M4's unsubsampled binding, cache clobbering, dropout at evaluation, V16's plain evaluation pass)
"""

from configs import physx
from configs.common import lr

SIZES = ("demo", "tiny", "ref64")


def _variants(c):
    return {
        "v10": dict(use_decoupled_mask=True, mask_ratio=0.25),
        "v16": dict(use_spatiotemporal_mask=True, lambda_lagbert=0.1, st_window_size=1, st_time_delta=0.1,
                    st_mask_ratio=0.5, st_coupled_render=True, st_mask_embed_scale=0.1, mask_ratio=0.0),
        "m1_2": dict(fusion_mode="uncertainty_gated", gate_mode="m1_2", gamma_max=0.005, gate_tau=0.0),
        "m1_bayes": dict(fusion_mode="uncertainty_gated", gate_mode="bayes", sigma_L2=0.01),
        "m1_sigmoid": dict(fusion_mode="uncertainty_gated", gate_mode="sigmoid", gate_tau=-4.6, gate_lambda=1.0),
        "m1_3a": dict(fusion_mode="uncertainty_gated", gate_mode="fixed"),
        "m2_05": dict(fusion_mode="bounded_perturb", residual_mode="identity", eps_max=0.02, eps_init=0.01,
                      schedule_mode="none"),
        "m2_1a_freeze": dict(fusion_mode="bounded_perturb", residual_mode="tanh", eps_max=0.02, eps_init=0.01,
                             schedule_mode="freeze_rho", freeze_steps=c.train.coarse_iterations + 2000),
        "m2_2a_rmsnorm": dict(fusion_mode="bounded_perturb", residual_mode="rmsnorm", eps_max=0.02, eps_init=0.01,
                              schedule_mode="none"),
        "m3_lp_knn": dict(lp_enable=True, lp_mode="knn_mean"),
        "m4_vel": dict(decouple_enable=True, decouple_mode="velocity_corr"),
        "m4_jac": dict(decouple_enable=True, decouple_mode="stochastic_jacobian_corr"),
        "faithful": dict(balance_lr_faithful=True, rho_faithful=True, m34_bounded_perturb_only=True,
                         decouple_faithful=True, faithful_cache_semantics=True, dropout_at_eval=True,
                         st_eval_faithful=True),
    }


def get_config(arg=None):
    parts = [a.strip() for a in (arg or "").split(",") if a.strip()]
    sizes = [a for a in parts if a in SIZES]
    if len(sizes) > 1:
        raise ValueError(f"configs/physx_boosted.py: at most one size of {SIZES}, got {sizes}")
    c = physx.get_config(sizes[0] if sizes else None)
    c.model.kind = "physx_boosted"
    c.physx.update(dict(
        mask_ratio=0.0,  # the main recipe (V5 NoMask); 0.25 is the seed's "mask 0.25" run
        # Balance (V5): alpha = sigmoid(tau), tau0 = logit(balance_alpha_init); 0 / 1 exactly: pure hex / anchor.
        use_learnable_balance=True,
        balance_alpha_init=0.99,
        balance_lr=0.0,  # honoured (0 freezes alpha)
        balance_lr_faithful=False,  # True: 1e-3 whatever balance_lr says (the reference)
        lambda_balance=0.0,  # (alpha - 0.5)^2, fine stage
        fusion_mode="fixed_alpha",  # fixed_alpha | uncertainty_gated (M1) | bounded_perturb (M2)
        # M1 uncertainty_gated
        gate_mode="m1_2",  # m1_2 | bayes | sigmoid | fixed (M1.3)
        gamma_max=0.005, gate_tau=-4.6, gate_lambda=1.0, m1_lambda_gate=0.0, sigma_L2=0.01, beta_min=0.0,
        beta_max=1.0, eulerian_uncertainty_hidden_dim=32, eulerian_s_E_init=0.0,
        # M2 bounded_perturb
        eps_max=0.03, eps_init=0.015, use_tanh=False, residual_mode="tanh", norm_eps=1e-6,
        schedule_mode="freeze_rho",  # none | freeze_rho | warmup_cap (global iterations)
        freeze_steps=2000, warmup_steps=5000, rho_lr=1e-3, rho_faithful=False,
        # M3 low-frequency leakage
        lp_enable=False, lambda_lp=0.01, lp_mode="knn_mean", lp_k=8, lp_subsample=2048,
        # M4 subspace decoupling
        decouple_enable=False, lambda_decouple=0.01, decouple_mode="velocity_corr", decouple_subsample=2048,
        decouple_stopgrad_L=True, decouple_dt=0.02, decouple_num_dirs=1, decouple_use_squared_cos=True,
        decouple_h=0.001, decouple_faithful=False,
        m34_bounded_perturb_only=False,  # True: M3/M4 inert outside bounded_perturb (the reference)
        faithful_cache_semantics=False,  # True: a TV/prior pass zeroes L_phys and stops L_smooth/L_gate/L_LP
        disable_4d_tv=False,  # V4
    ))
    c.loss.lambda_tv = 0.0
    c.loss.lambda_prior = 0.0
    c.optim.lr.hexplane_grid = lr(2e-3, 2e-4)  # the name contains "grid": the reference's 30k log-linear decay
    c.optim.lr.hexplane_mlp = lr(2e-4, 2e-4)  # constant
    if not sizes:
        c.train.iterations = 50000
        c.eval.iterations = (5000, 10000, 20000, 30000, 40000, 50000)
        c.checkpoint.every = 5000
    variants = _variants(c)
    for name in parts:
        if name in SIZES:
            continue
        if name not in variants:
            raise ValueError(f"configs/physx_boosted.py: unknown variant {name!r} (sizes: {SIZES}; "
                             f"variants: {tuple(variants)})")
        c.physx.update(variants[name])
    return c
