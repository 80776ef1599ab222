"""β (fusion weight) pictures of a PhysX-Boosted run: the intended behaviour of the reference's
scripts/visualize_beta.py (physx.md §7), which cannot run as written.

  python -m x2gs_jax.viz.beta --workdir=runs/boosted --time=0.5
  python -m x2gs_jax.viz.beta --workdir=runs/boosted --time=0.25 --step=-1 --slice_axis=0 --volume_res=32

β is the Eulerian stream's weight w_E at each Gaussian: 1 - α (fixed_alpha), the uncertainty gate (M1), ε (M2);
evaluation semantics (no mask, no dropout unless physx.dropout_at_eval). Writes to --output (default
<workdir>/beta/):
  beta_slice_t{t:.2f}.png   canonical positions within ±5 % of the axis extent around the slice, coloured by β
                            (RdYlBu_r, 0..1), and the β histogram with its mean
  beta_stats_t{t:.2f}.png   histograms of β, of s_E (M1 only) and of |Δx_L| vs |Δx_E|
  beta_volume_t{t:.2f}.npz  beta_volume [res^3] (β averaged per cell of the Gaussians' bounding box; empty cells 0),
                            counts [res^3], positions [N, 3] (world units), beta [N], pos_min, pos_max [3], time
"""
from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a physx_boosted run (train.py --workdir).")
_TIME = flags.DEFINE_float("time", 0.5, "Normalised time (seconds / scan length) of the fusion weights.")
_STEP = flags.DEFINE_integer("step", None, "Use the checkpoint of this step (-1: the latest) instead of the export.")
_DATA = flags.DEFINE_string("data", None, "Case pickle (default: the run's own case).")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (default <workdir>/beta).")
_AXIS = flags.DEFINE_integer("slice_axis", 2, "Axis across the slice (0 x, 1 y, 2 z).")
_POS = flags.DEFINE_float("slice_pos", 0.5, "Slice position as a fraction of the positions' extent along the axis.")
_RES = flags.DEFINE_integer("volume_res", 64, "Cells per side of the β volume.")


def beta_volume(positions: np.ndarray, beta: np.ndarray, res: int):
    """(mean β per cell [res]^3, counts [res]^3, pos_min [3], pos_max [3]): positions normalised to their bounding
    box and truncated to cells."""
    lo, hi = positions.min(0), positions.max(0)
    u = (positions - lo) / np.maximum(hi - lo, 1e-12)
    idx = np.clip((u * res).astype(np.int64), 0, res - 1)
    flat = np.ravel_multi_index(idx.T, (res,) * 3)
    counts = np.bincount(flat, minlength=res ** 3)
    sums = np.bincount(flat, weights=beta, minlength=res ** 3)
    vol = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return vol.reshape((res,) * 3).astype(np.float32), counts.reshape((res,) * 3), lo, hi


def fusion_at(run, t: float) -> dict:
    """Per active Gaussian: positions [N, 3], beta [N], s_e [N] or None, dx_l / dx_e norms [N]."""
    import jax

    from x2gs_jax.train_state import gaussians_from_params

    params, model_state = run.query_params
    canonical = gaussians_from_params(params, run.active, run.scale_bound)
    f = jax.jit(lambda p, s, tt: run.model.fusion_fields(p, s, canonical, tt, jax.random.PRNGKey(0)))(
        params, model_state, t)
    act = np.asarray(run.active)
    out = {"positions": np.asarray(canonical.xyz)[act], "beta": np.asarray(f["beta"])[act],
           "s_e": None if f["s_e"] is None else np.asarray(f["s_e"])[act],
           "dx_l": np.linalg.norm(np.asarray(f["dx_l"])[act], axis=-1),
           "dx_e": np.linalg.norm(np.asarray(f["dx_e"])[act], axis=-1)}
    return out


def write_pictures(f: dict, t: float, out: str, axis: int, pos: float, res: int) -> list[str]:
    from x2gs_jax.viz import plt

    os.makedirs(out, exist_ok=True)
    p, beta = f["positions"], f["beta"]
    lo, hi = p[:, axis].min(), p[:, axis].max()
    centre = lo + pos * (hi - lo)
    band = np.abs(p[:, axis] - centre) <= 0.05 * (hi - lo)
    others = [a for a in range(3) if a != axis]
    names = "xyz"
    paths = []

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.5))
    sc = ax0.scatter(p[band, others[0]], p[band, others[1]], c=beta[band], cmap="RdYlBu_r", vmin=0, vmax=1, s=3)
    fig.colorbar(sc, ax=ax0, label="β (Eulerian weight)")
    ax0.set_xlabel(names[others[0]])
    ax0.set_ylabel(names[others[1]])
    ax0.set_aspect("equal")
    ax0.set_title(f"{names[axis]} = {centre:.3f} ± 5 %  ({int(band.sum())} Gaussians), t = {t:.2f}")
    ax1.hist(beta, bins=50, color="tab:blue")
    ax1.axvline(float(beta.mean()), color="k", ls="--", label=f"mean {beta.mean():.4f}")
    ax1.set_xlabel("β")
    ax1.legend()
    paths.append(os.path.join(out, f"beta_slice_t{t:.2f}.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].hist(beta, bins=50)
    axes[0].set_title(f"β (mean {beta.mean():.4f})")
    if f["s_e"] is not None:
        axes[1].hist(f["s_e"], bins=50, color="tab:orange")
        axes[1].set_title(f"s_E (mean {f['s_e'].mean():.3f})")
    else:
        axes[1].text(0.5, 0.5, "no uncertainty head\n(fusion_mode is not uncertainty_gated)", ha="center",
                     va="center", transform=axes[1].transAxes)
        axes[1].set_axis_off()
    top = max(float(np.percentile(f["dx_l"], 99.5)), float(np.percentile(f["dx_e"], 99.5)), 1e-9)
    bins = np.linspace(0, top, 60)
    axes[2].hist(f["dx_l"], bins=bins, alpha=0.6, label=f"|Δx_L| mean {f['dx_l'].mean():.4f}")
    axes[2].hist(f["dx_e"], bins=bins, alpha=0.6, label=f"|Δx_E| mean {f['dx_e'].mean():.4f}")
    axes[2].set_xlabel("world units")
    axes[2].legend()
    paths.append(os.path.join(out, f"beta_stats_t{t:.2f}.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    vol, counts, pmin, pmax = beta_volume(p, beta, res)
    paths.append(os.path.join(out, f"beta_volume_t{t:.2f}.npz"))
    np.savez(paths[-1], beta_volume=vol, counts=counts, positions=p, beta=beta, pos_min=pmin, pos_max=pmax,
             time=np.float32(t))
    return paths


def _fail(msg: str) -> None:
    print(f"beta: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if _WORKDIR.value is None:
        _fail("--workdir is required (a physx_boosted run directory)")
    if not 0.0 <= _TIME.value <= 1.0:
        _fail(f"--time={_TIME.value}: must lie in [0, 1] (seconds / scan length)")
    if _AXIS.value not in (0, 1, 2) or not 0.0 <= _POS.value <= 1.0 or _RES.value < 1:
        _fail(f"--slice_axis={_AXIS.value} must be 0, 1 or 2; --slice_pos={_POS.value} in [0, 1]; "
              f"--volume_res={_RES.value} >= 1")
    from x2gs_jax import eval_lib

    try:
        run = eval_lib.load_run(_WORKDIR.value, data=_DATA.value, step=_STEP.value)
    except (eval_lib.RunError, eval_lib.MismatchError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    if not hasattr(run.model, "fusion_fields"):
        _fail(f"{_WORKDIR.value} is a '{run.model.kind}' run; β exists only for physx_boosted runs")
    if run.stage != "fine":
        _fail(f"{_WORKDIR.value} stopped at step {run.step}, in the static stage: the streams are not fused yet")
    out = _OUTPUT.value or os.path.join(_WORKDIR.value, "beta")
    f = fusion_at(run, _TIME.value)
    for path in write_pictures(f, _TIME.value, out, _AXIS.value, _POS.value, _RES.value):
        print(path)
    print(f"β mean {f['beta'].mean():.5f} (min {f['beta'].min():.5f}, max {f['beta'].max():.5f}), "
          f"|Δx_L| mean {f['dx_l'].mean():.5f}, |Δx_E| mean {f['dx_e'].mean():.5f} ({run.source}, step {run.step})")


if __name__ == "__main__":
    app.run(main)
