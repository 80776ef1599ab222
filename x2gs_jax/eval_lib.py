"""The library behind `eval.py`: load a trained run, measure it, write <run>/eval/.

Conventions (x2gaussian.md §12, gaussians.md §7): phase k is queried at the mid-time of phase k of the
first breathing cycle (config.eval.cycle_s, config.eval.n_phases) and compared with GT phase k; PSNR3D
has peak 1, SSIM3D averages 2D SSIM over non-empty GT slices of each axis; 2D metrics normalise each
projection by its own max. Baselines on the same case: static FDK of all train projections, and
phase-binned 4D-FDK of the train projections with their stored phases. Volumes over time are queried by
`jax.vmap` over a chunk of times (one compiled function per shape).

Optionally (`cycles`, generated phantoms) the phases of later breathing cycles against the phantom's exact
volumes at those times.

Outputs (<run>/eval/): metrics.json, tidal.csv + tidal.png (4D), slices_T{k}.png, breathing.gif + breathing.mp4,
projections.png, export/vol_t{t}.npy|.nii.gz and export/phases_4d.nii.gz (4D; in μ or HU: `--units`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from x2gs_jax import compile_cache
from x2gs_jax import evaluation as E
from x2gs_jax import tidal
from x2gs_jax.data.naf import Case, load_case
from x2gs_jax.data.prepare import initial_points, resolve_case_path
from x2gs_jax.export import ExportError, load_export
from x2gs_jax.eval_report import clean_json, format_table, write_tidal_csv
from x2gs_jax.fileio import atomic_write_bytes
from x2gs_jax.models import make_model
from x2gs_jax.render import voxelize
from x2gs_jax.run_state import template_state
from x2gs_jax.train_state import gaussians_from_params
from x2gs_jax.volume_export import write_phase_series, write_volume_files


class RunError(FileNotFoundError):
    """The run directory, its export or its checkpoint is missing or unreadable."""


class MismatchError(ValueError):
    """The case does not match the run it is evaluated against (the message names both)."""


@dataclasses.dataclass
class Run:
    """A trained model ready to query. params: the raw parameter dict (Gaussians + the model's own keys);
    model_state: the model's non-trained state (e.g. PhysX anchors and binding)."""

    workdir: str
    config: ml_collections.ConfigDict
    case: Case
    case_path: str
    model: Any
    params: dict
    model_state: dict
    active: np.ndarray
    scale_bound: Optional[tuple]
    step: int
    source: str  # "export" or "checkpoint <step>"
    # Compiled queries of this run (`volume_batched`, `lung_ml_batched`), kept so a second curve or export of the
    # same run does not trace and compile again (a 600-time tidal curve at 128^3 spent ~half its time there).
    # Not an __init__ argument, so `dataclasses.replace` (another case, other params) starts an empty one.
    compiled: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def is_4d(self) -> bool:
        return self.case.is_4d and self.model.is_4d

    @property
    def stage(self) -> str:
        """The stage the model was in at `step` (coarse = no deformation, as during training)."""
        return "fine" if self.is_4d and self.step > int(self.config.train.coarse_iterations) else "coarse"

    @property
    def period_s(self) -> Optional[float]:
        """The learned breathing period (s), for models that have one."""
        if not self.model.has_period:
            return None
        return float(np.exp(np.asarray(self.params["period"], np.float64)))

    @property
    def query_params(self) -> tuple:
        """(params, model_state): the arguments of `gaussians_at` (device arrays)."""
        return jax.tree.map(jnp.asarray, (self.params, self.model_state))

    def gaussians_at(self, inputs: tuple, t) -> Any:
        """The model's Gaussians at normalised time t; inputs = `query_params` (traceable; passed in rather than
        closed over so that compiled functions take them as arguments instead of embedding them as constants)."""
        params, model_state = inputs
        canonical = gaussians_from_params(params, self.active, self.scale_bound)
        return self.model.gaussians_at(params, model_state, canonical, t, jax.random.PRNGKey(0), self.stage)


# ------------------------------------------------------------------------------------------ loading
def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise RunError(f"run directory {workdir!r} does not exist")
    if not os.path.exists(path):
        raise RunError(f"{path}: missing (not a run directory written by train.py?)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_scanner(case: Case, case_path: str, naf_mm: dict, run_file: str) -> None:
    """Raise MismatchError unless the case's geometry equals the run's (mm, rtol 1e-5)."""
    mine = case.scanner.to_naf()
    diffs = []
    for k, v in naf_mm.items():
        if k not in mine:
            continue
        a, b = mine[k], v
        same = (str(a) == str(b)) if isinstance(a, str) or isinstance(b, str) else \
            np.shape(a) == np.shape(b) and np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-5, atol=1e-6)
        if not same:
            diffs.append(f"{k}: data {np.asarray(a).tolist()} vs run {np.asarray(b).tolist()}")
    if diffs:
        raise MismatchError(f"the case {case_path!r} does not match the run ({run_file}): scanner geometry differs: "
                            + "; ".join(diffs))


def _check_case_shape(case: Case, case_path: str, model, run_file: str) -> None:
    if model.is_4d != case.is_4d:
        raise MismatchError(f"the case {case_path!r} is {'4D' if case.is_4d else '3D'} but the run ({run_file}) is a "
                            f"{'4D' if model.is_4d else 'static'} model ({model.kind})")


def load_run(workdir: str, data: Optional[str] = None, step: Optional[int] = None) -> Run:
    """Load <workdir>'s inference export (step None) or its checkpoint at `step` (-1: the latest).

    data: a case pickle overriding the config's data.path / embedded phantom.
    Raises RunError (missing run/export/checkpoint) or MismatchError (data of another geometry).
    """
    config = load_config(workdir)
    if data:
        if not os.path.exists(data):
            raise FileNotFoundError(f"--data: no such file {data!r}")
        config.data.path = data
    case_path = resolve_case_path(config)
    case = load_case(case_path)
    export = os.path.join(workdir, "export")
    meta_path = os.path.join(export, "meta.json")
    try:
        model = make_model(config, case)
    except ValueError as err:
        raise MismatchError(f"the case {case_path!r} does not fit the run {workdir!r}: {err}") from err
    _check_case_shape(case, case_path, model, os.path.join(workdir, "config.json"))
    if step is not None:
        return _load_checkpoint(workdir, config, case, case_path, model, None if step < 0 else int(step))
    if not os.path.exists(meta_path):
        raise RunError(f"{meta_path}: no inference export (the run did not finish?); pass --step=-1 to evaluate "
                       f"its latest checkpoint in {os.path.join(workdir, 'checkpoints')}")
    with open(meta_path) as f:
        check_scanner(case, case_path, json.load(f)["scanner"], meta_path)
    try:
        params, model_state, active, meta = load_export(export, model, case)
    except ExportError as err:
        raise RunError(str(err)) from err
    sb = meta.get("scale_bound")
    return Run(workdir, config, case, case_path, model, params, model_state, active, tuple(sb) if sb else None,
               int(meta.get("step", 0)), "export")


def _load_checkpoint(workdir, config, case, case_path, model, step) -> Run:
    from x2gs_jax.checkpoint import CheckpointError, Checkpointer

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise RunError(f"{os.path.join(workdir, 'checkpoints')}: no checkpoints")
    points = initial_points(case_path, case, config)
    ckpt = Checkpointer(workdir, read_only=True)  # the evaluator never writes into the run's checkpoints
    try:
        # step None: the newest intact checkpoint (damaged newer ones are reported on stderr).
        state, meta = ckpt.restore(lambda m: template_state(config, case, points, model, m), step)
    except (FileNotFoundError, CheckpointError) as err:
        raise RunError(str(err)) from err
    finally:
        ckpt.close()
    n = int(state.step)
    return Run(workdir, config, case, case_path, model, dict(state.params), dict(state.model_state),
               np.asarray(state.active), state.scale_bound, n, f"checkpoint {n}")


# -------------------------------------------------------------------------------- time-batched maps
def map_times(batched: Callable, params, times: Sequence[float], chunk: int = 8, desc: str = "",
              progress: bool = True) -> np.ndarray:
    """np.concatenate of batched(params, times_chunk) over chunks of exactly `chunk` times.

    batched: a jitted function (params, t [chunk]) -> [chunk, ...] (e.g. `volume_batched`). Every call
    has the same shapes (the last chunk is padded by repeating its last time), so it compiles once per run.
    """
    times = np.asarray(times, np.float32).reshape(-1)
    if times.size == 0:
        raise ValueError("map_times: no times")
    chunk = int(max(1, chunk))
    pad = (-times.size) % chunk
    padded = np.concatenate([times, np.full(pad, times[-1], np.float32)])
    out = [np.asarray(batched(params, jnp.asarray(padded[i:i + chunk])))
           for i in tqdm(range(0, padded.size, chunk), desc=desc, disable=not progress or not desc)]
    return np.concatenate(out)[:times.size]


def volume_at(run: Run) -> Callable:
    """(params, t) -> predicted volume [nx, ny, nz] on the GT grid."""
    grid = E.full_grid(run.case.scanner)
    backend = run.config.render.backend
    return lambda params, t: voxelize(run.gaussians_at(params, t), grid, backend=backend)


def volume_batched(run: Run) -> Callable:
    """jit(vmap over t) of `volume_at`: (params, t [n]) -> [n, nx, ny, nz]; compiled once per run."""
    if "volume" not in run.compiled:
        run.compiled["volume"] = jax.jit(jax.vmap(volume_at(run), in_axes=(None, 0)))
    return run.compiled["volume"]


def lung_ml_program(run: Run, erode_voxels: int = tidal.ERODE_VOXELS) -> Callable:
    """The run's compiled lung query, (params, t [n], threshold (NaN = automatic), component fraction) -> [n, 2]
    (see `lung_ml_batched`); built once per run and `erode_voxels`."""
    key = ("lung_ml", int(erode_voxels))
    if key not in run.compiled:
        vol, mm = volume_at(run), run.case.scanner.d_voxel_mm
        one = lambda p, t, thr, frac: jnp.stack(tidal.lung_measure(vol(p, t), mm, thr, int(erode_voxels), frac))
        run.compiled[key] = jax.jit(jax.vmap(one, in_axes=(None, 0, None, None)))
    return run.compiled[key]


def lung_ml_batched(run: Run, lung_threshold: Optional[float] = None, erode_voxels: int = tidal.ERODE_VOXELS,
                    min_component_fraction: float = tidal.MIN_COMPONENT_FRACTION) -> Callable:
    """(params, t [n]) -> [n, 2]: per time, the lung volume (mL) and the air threshold used (volume units; the
    per-volume automatic one when lung_threshold is None). Volumes are segmented on device, never stored.

    One program per run and `erode_voxels` (a static shape of the erosion): the threshold and the component
    fraction are arguments, so curves with other values of either reuse it."""
    f = lung_ml_program(run, erode_voxels)
    thr = jnp.float32(jnp.nan if lung_threshold is None else lung_threshold)  # NaN = automatic (segment_lungs)
    frac = jnp.float32(min_component_fraction)
    return lambda params, t: f(params, t, thr, frac)


# ------------------------------------------------------------------------------------- the metrics
def phase_times(run: Run) -> np.ndarray:
    return run.model.eval_times(run.case) if run.is_4d else np.zeros(1)


def reconstruction_metrics(run: Run, chunk: int = 4, progress: bool = True,
                           batched: Optional[Callable] = None) -> tuple[dict, np.ndarray]:
    """(report, predicted volumes [P, nx, ny, nz]): PSNR/SSIM 3D per phase and mean, 2D on val views."""
    times = phase_times(run)
    batched = batched or volume_batched(run)
    vols = map_times(batched, run.query_params, times, chunk, desc="phase volumes", progress=progress)
    report = E.volume_report(run.case.volumes, vols if run.case.is_4d else vols[0])
    report["phase_times"] = [float(t) for t in times]
    n_val = min(len(run.case.val), int(run.config.eval.max_val_views))
    if n_val > 0:
        pred, gt = render_val(run, n_val)
        r = E.projection_report(gt, pred)
        report.update(psnr_2d_val=r["psnr_2d"], ssim_2d_val=r["ssim_2d"], n_val_views=n_val)
    return report, vols


def cycle_metrics(run: Run, cycles: Sequence[int], chunk: int = 8, progress: bool = True,
                  batched: Optional[Callable] = None) -> dict:
    """PSNR3D/SSIM3D of the phases of later breathing cycles (generated phantoms only; the reference convention
    evaluates cycle 0 alone).

    Cycle c's phase k is queried at the phase mid-time of cycle 0 plus c·eval.cycle_s and compared with the
    phantom's exact voxelised volume at that time (the generator's supersampling), so the quality can be followed
    across the scan: cycle 0 sees the fewest constraints (its time cells are trained by its own views only).
    Returns {"cycles": [c...], "psnr_3d_by_cycle": [mean...], "ssim_3d_by_cycle": [mean...]}.
    """
    if not run.is_4d:
        raise ValueError("cycles: a static run has no breathing cycles")
    breathing = tidal.phantom_breathing_from_meta(run.case.meta)
    if breathing is None:
        raise ValueError(f"cycles: the GT at other times is known only for cases made by x2gs_jax.data.generate; "
                         f"{run.case_path} has no generator record in its meta")
    from x2gs_jax.data.phantom import ThoraxPhantom

    phantom = ThoraxPhantom.default(breathing)
    supersample = int(run.case.meta["generator"].get("supersample", 3))
    base = phase_times(run)
    shift = float(run.config.eval.cycle_s) / breathing.scan_s
    batched = batched or volume_batched(run)
    out = {"cycles": [], "psnr_3d_by_cycle": [], "ssim_3d_by_cycle": []}
    for c in cycles:
        times = base + int(c) * shift
        if int(c) < 0 or times.max() >= 1.0:
            raise ValueError(f"cycles: cycle {c} is outside the scan (its phase times must lie in [0, 1), got up "
                             f"to {times.max():.4f})")
        vols = map_times(batched, run.query_params, times, chunk, desc=f"cycle {c} volumes", progress=progress)
        gt = np.stack([phantom.volume_at(float(t), run.case.scanner, supersample=supersample) for t in times])
        r = E.volume_report(gt, vols)
        out["cycles"].append(int(c))
        out["psnr_3d_by_cycle"].append(float(r["psnr_3d_mean"]))
        out["ssim_3d_by_cycle"].append(float(r["ssim_3d_mean"]))
    return out


def render_val(run: Run, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rendered, GT) of the first n val views, both scene-scaled [n, H, W]."""
    sc = run.case.scanner
    cams = jax.jit(jax.vmap(sc.camera))(jnp.asarray(run.case.val.angles[:n], jnp.float32))
    vt = run.case.val.times[:n] if run.case.val.times is not None else np.zeros(n)
    pred = E.render_views(run.gaussians_at, cams, vt, backend=run.config.render.backend,
                          params=run.query_params)
    return pred, run.case.val.projections[:n] * sc.scene_scale


def fdk_baselines(case: Case, n_phases: Optional[int] = None, progress: bool = True) -> dict:
    """Static FDK (all train views) and, for 4D cases, phase-binned 4D-FDK vs the GT phases."""
    from x2gs_jax.ct.fdk import fdk, fdk_4d

    sc = case.scanner
    out = {}
    static = np.asarray(fdk(case.train.projections, sc, case.train.angles, progress=progress))
    gt = case.volumes
    ref = E.volume_report(gt, np.broadcast_to(static, gt.shape) if case.is_4d else static)
    out.update(fdk_psnr_3d_mean=ref["psnr_3d_mean"], fdk_ssim_3d_mean=ref["ssim_3d_mean"])
    if case.is_4d:
        P = int(n_phases or gt.shape[0])
        ph = np.asarray(case.train.phases, np.int64)
        if ph.size and (ph.min() < 0 or ph.max() >= P):
            raise ValueError(f"4D-FDK: train phases must lie in [0, {P}), got [{ph.min()}, {ph.max()}]")
        counts = np.bincount(ph, minlength=P)[:P]
        full = np.flatnonzero(counts > 0)
        if full.size == 0:
            raise ValueError(f"4D-FDK: no train projection has a phase in [0, {P})")
        # An empty bin (sparse views) has no reconstruction of its own: it borrows the circularly nearest
        # non-empty bin's volume, and the bins concerned are reported.
        dist = np.abs(np.arange(P)[:, None] - full[None, :])
        nearest = np.argmin(np.minimum(dist, P - dist), axis=1)  # index into `full`
        compact = np.searchsorted(full, ph)  # phases renumbered 0..len(full)-1
        v4 = np.asarray(fdk_4d(case.train.projections, sc, case.train.angles, compact, int(full.size),
                               progress=progress))[nearest]
        r4 = E.volume_report(gt, v4)
        out.update(fdk4d_psnr_3d_mean=r4["psnr_3d_mean"], fdk4d_ssim_3d_mean=r4["ssim_3d_mean"],
                   fdk4d_psnr_3d=r4["psnr_3d"], fdk4d_ssim_3d=r4["ssim_3d"],
                   fdk4d_empty_bins=[int(p) for p in np.flatnonzero(counts == 0)])
    return out


def tidal_curve(run: Run, n_points: int = 600, lung_threshold: Optional[float] = None,
                erode_voxels: int = tidal.ERODE_VOXELS, chunk: int = 8, progress: bool = True,
                min_component_fraction: float = tidal.MIN_COMPONENT_FRACTION) -> dict:
    """Lung volume on `n_points` uniform times over the whole scan, its dominant period, its swing per cycle and
    mean, the thresholds the segmentation used, and (phantom) the agreement with the exact curve.

    lung_threshold: None = per-volume automatic thresholds (`tidal.segment_lungs`); a number overrides them.
    """
    scan_s = float(run.config.data.scan_s)
    times = np.arange(n_points) / n_points  # normalised, [0, 1)
    res = map_times(lung_ml_batched(run, lung_threshold, erode_voxels, min_component_fraction), run.query_params,
                    times, chunk, desc="tidal curve", progress=progress)
    ml, thr = res[:, 0].astype(np.float64), res[:, 1].astype(np.float64)
    t_s = times * scan_s
    out = {"t_s": t_s, "lung_volume_ml": ml, "tidal_points": int(n_points),
           "lung_threshold_mode": "auto" if lung_threshold is None else "manual",
           "lung_threshold": None if lung_threshold is None else float(lung_threshold),
           "lung_threshold_used_median": float(np.median(thr)), "lung_threshold_used_min": float(np.min(thr)),
           "lung_threshold_used_max": float(np.max(thr)), "erode_voxels": int(erode_voxels),
           "min_component_fraction": float(min_component_fraction), "tidal_mean_ml": float(np.mean(ml))}
    try:
        if not np.ptp(ml) > 0:
            raise ValueError("the lung-volume curve is flat (no breathing motion)")
        out["tidal_period_s"] = tidal.dominant_period(t_s, ml)
    except ValueError as err:
        out["tidal_period_s"], out["tidal_period_error"] = None, str(err)
    out["tidal_swing_ml"] = tidal.cycle_swing(t_s, ml, out["tidal_period_s"])
    breathing = tidal.phantom_breathing_from_meta(run.case.meta)
    if breathing is not None:
        gt = tidal.phantom_gt_curve_ml(breathing, times, run.case.scanner)
        out["gt_ml"] = gt
        out.update(tidal.curve_agreement(ml, gt))
    return out


# ---------------------------------------------------------------------------------------- outputs
def export_volumes(run: Run, times: Sequence[float], out_dir: str, chunk: int = 4,
                   batched: Optional[Callable] = None, units: str = "mu", mu_water: Optional[float] = None
                   ) -> list[str]:
    """Write the volumes at normalised `times` (4D) or the single volume (3D) as .npy and .nii.gz in `units`
    ("mu" as trained, or "hu" with `mu_water`; `volume_export`)."""
    os.makedirs(out_dir, exist_ok=True)
    times = list(times) if run.is_4d else [0.0]
    vols = map_times(batched or volume_batched(run), run.query_params, times, chunk, desc="export")
    written = []
    for t, v in zip(times, vols):
        stem = os.path.join(out_dir, f"vol_t{float(t):.4f}" if run.is_4d else "volume")
        written += write_volume_files(stem, v, run.case.scanner, units, mu_water)
    return written


def evaluate_run(workdir: str, data: Optional[str] = None, step: Optional[int] = None, tidal_points: int = 600,
                 pictures: bool = True, export_times: Sequence[float] = (), baselines: bool = True,
                 lung_threshold: Optional[float] = None, erode_voxels: int = tidal.ERODE_VOXELS,
                 chunk: int = 8, gif_frames: int = 12, proj_views: int = 4, progress: bool = True,
                 cycles: Sequence[int] = (), min_component_fraction: float = tidal.MIN_COMPONENT_FRACTION,
                 units: str = "mu", mu_water: Optional[float] = None) -> dict:
    """Evaluate a run end to end (see the module docstring); returns the metrics written to metrics.json.
    `cycles`: also report the phases of these breathing cycles (`cycle_metrics`; generated phantoms).
    lung_threshold / erode_voxels / min_component_fraction: the tidal segmentation (`tidal_curve`).
    units / mu_water: the value units of the exported volumes ("mu" or "hu"; mu_water None = the run config's
    eval.mu_water, else the embedded phantom's; `x2gs_jax.units`). Metrics and pictures stay in μ."""
    from x2gs_jax import viz
    from x2gs_jax.units import UNITS, resolve_mu_water

    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}")
    run = load_run(workdir, data, step)
    compile_cache.enable(run.config.get("compile_cache_dir", "auto"))
    mu_water = resolve_mu_water(mu_water, run.config)
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    batched = volume_batched(run)  # one compiled volume query for the phases, exports and GIF frames
    report, vols = reconstruction_metrics(run, chunk, progress, batched)
    m = {"source": run.source, "step": run.step, "stage": run.stage, "case": os.path.abspath(run.case_path),
         "is_4d": run.is_4d, **report}
    if run.is_4d:
        gen = run.case.meta.get("generator") if isinstance(run.case.meta, dict) else None
        gt_period = float(gen["period_s"]) if isinstance(gen, dict) and "period_s" in gen else float(run.config.eval.cycle_s)
        m["period_gt_s"] = gt_period
        if run.period_s is not None:  # models with a learned period (X2)
            m.update(period_learned_s=run.period_s, period_rel_error=abs(run.period_s - gt_period) / gt_period)
        breathing = tidal.phantom_breathing_from_meta(run.case.meta)
        if breathing is not None and breathing.kind == "irregular":
            # Irregular cycles: the nominal period is not the mean cycle length of this scan; report both.
            mean_cycle = breathing.mean_cycle_s(breathing.scan_s)
            m["period_mean_cycle_s"] = mean_cycle
            if run.period_s is not None:
                m["period_mean_cycle_rel_error"] = abs(run.period_s - mean_cycle) / mean_cycle
    if cycles:
        m.update(cycle_metrics(run, cycles, chunk, progress, batched))
    if baselines:
        m.update(fdk_baselines(run.case, len(vols) if run.is_4d else None, progress))
    curve = None
    if run.is_4d and tidal_points > 0:
        curve = tidal_curve(run, tidal_points, lung_threshold, erode_voxels, chunk, progress, min_component_fraction)
        m.update({k: v for k, v in curve.items() if k not in ("t_s", "lung_volume_ml", "gt_ml")})
        write_tidal_csv(os.path.join(out_dir, "tidal.csv"), curve["t_s"], curve["lung_volume_ml"], curve.get("gt_ml"))
    m.update(units=units, mu_water=mu_water)
    if export_times or not run.is_4d:
        m["exported"] = export_volumes(run, export_times, os.path.join(out_dir, "export"), chunk, batched, units,
                                       mu_water)
    if run.is_4d:  # the phase volumes as one 4D NIfTI (time = the 4th axis, seconds)
        series = write_phase_series(os.path.join(out_dir, "export", "phases_4d.nii.gz"), vols,
                                    np.asarray(m["phase_times"]) * float(run.config.data.scan_s), run.case.scanner,
                                    units, mu_water)
        m["exported"] = m.get("exported", []) + ([series] if series else [])
    metrics_path = os.path.join(out_dir, "metrics.json")
    # The numbers are written before the pictures, so a picture that fails (a missing plotting or movie tool)
    # cannot lose them; the file is rewritten below with the pictures' list.
    atomic_write_bytes(metrics_path, json.dumps(clean_json(m), indent=2).encode())
    if pictures:
        gt = run.case.volumes if run.case.is_4d else run.case.volumes[None]
        for k, (g, p) in enumerate(zip(gt, vols)):
            title = f"phase {k} (t = {m['phase_times'][k]:.4f}), PSNR {report['psnr_3d'][k]:.2f} dB"
            viz.save_phase_slices(os.path.join(out_dir, f"slices_T{k}.png"), g, p, title)
        n = min(int(proj_views), len(run.case.val))
        if n > 0:
            pred, gtp = render_val(run, n)
            viz.save_projection_comparison(os.path.join(out_dir, "projections.png"), gtp, pred,
                                           [f"val {i}" for i in range(n)])
        if run.is_4d:
            cycle = run.period_s if run.period_s and run.period_s > 0 else float(run.config.eval.cycle_s)
            ts = np.arange(gif_frames) / gif_frames * cycle
            frames = map_times(batched, run.query_params, ts / float(run.config.data.scan_s), chunk, desc="gif frames",
                               progress=progress)
            movies = viz.save_breathing_movies(os.path.join(out_dir, "breathing"), frames, ts)  # .gif, .mp4
            m["movies"] = [os.path.basename(p) for p in movies]
        if curve is not None:
            gt_label = (f"phantom (exact), r = {curve['tidal_corr']:.3f}" if curve.get("tidal_corr") is not None
                        and math.isfinite(curve["tidal_corr"]) else "phantom (exact)")
            viz.save_tidal_plot(os.path.join(out_dir, "tidal.png"), curve["t_s"], curve["lung_volume_ml"],
                                curve.get("gt_ml"), tidal.curve_title(curve), gt_label=gt_label)
    m = clean_json(m)
    atomic_write_bytes(metrics_path, json.dumps(m, indent=2).encode())
    print(format_table(m))
    return m


__all__ = ["Run", "RunError", "MismatchError", "load_config", "load_run", "check_scanner", "map_times", "volume_at",
           "volume_batched", "lung_ml_program", "lung_ml_batched",
           "reconstruction_metrics", "render_val", "fdk_baselines", "tidal_curve", "write_tidal_csv", "export_volumes",
           "format_table", "evaluate_run"]
