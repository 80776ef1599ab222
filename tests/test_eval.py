"""eval.py end to end on a tiny 4D run trained inside the test: metrics.json, tidal.csv, pictures, NIfTI
export round trip, parity of the export path with the metrics path, loud errors on wrong data/runs."""
import csv
import dataclasses
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from configs import x2_gaussian
from x2gs_jax import eval_lib, metrics as M, train_lib
from x2gs_jax.data.generate import generate_case
from x2gs_jax.fileio import nifti_frame_mm, read_nifti


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-iteration tiny X2 run (coarse stage only: the field and period are exported untouched)."""
    root = tmp_path_factory.mktemp("eval")
    config = x2_gaussian.get_config("tiny")
    config.data.cache_dir = str(root / "cache")
    config.train.iterations = 2
    config.train.coarse_iterations = 2
    config.eval.iterations = (2,)
    config.checkpoint.every = 2
    workdir = str(root / "run")
    train_lib.train_and_evaluate(config, workdir)
    m = eval_lib.evaluate_run(workdir, tidal_points=16, export_times=(0.0, 0.0025), chunk=4, gif_frames=4,
                              proj_views=2, progress=False)
    return config, workdir, m


def test_metrics_json(run):
    config, workdir, m = run
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        disk = json.load(f)
    assert disk == m
    for k in ("psnr_3d_mean", "ssim_3d_mean", "psnr_2d_val", "ssim_2d_val", "period_learned_s", "period_gt_s",
              "fdk_psnr_3d_mean", "fdk4d_psnr_3d_mean"):
        assert isinstance(m[k], float) and math.isfinite(m[k]), k
    assert len(m["psnr_3d"]) == len(m["ssim_3d"]) == len(m["phase_times"]) == 10
    assert m["psnr_3d_mean"] == pytest.approx(np.mean(m["psnr_3d"]))
    np.testing.assert_allclose(m["phase_times"], (np.arange(10) + 0.5) * 0.3 / 60, rtol=1e-6)
    # Only coarse iterations ran: tau is its initial ln 2.8 (the period group is gated off).
    assert m["period_learned_s"] == pytest.approx(2.8, rel=1e-6)
    assert m["period_gt_s"] == 3.0
    # The phantom case: the GT curve is known, so the agreement keys are reported.
    assert "tidal_amplitude_gt_ml" in m and m["tidal_amplitude_gt_ml"] > 0
    # The coarse model does not move: a flat curve has no period (reported as such, not as a number).
    assert m["tidal_amplitude_ml"] == 0 and m["tidal_period_s"] is None and "flat" in m["tidal_period_error"]
    assert m["tidal_swing_ml"] == 0 and m["tidal_mean_ml"] > 0
    # Default segmentation: per-volume thresholds, reported (in the volume's units) beside the flags' values.
    assert m["lung_threshold_mode"] == "auto" and m["lung_threshold"] is None
    assert 0 < m["lung_threshold_used_min"] <= m["lung_threshold_used_median"] <= m["lung_threshold_used_max"]


def test_tidal_csv_and_pictures(run):
    _, workdir, m = run
    out = os.path.join(workdir, "eval")
    with open(os.path.join(out, "tidal.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16
    assert {"t_s", "lung_volume_ml"} <= set(rows[0])
    t = np.array([float(r["t_s"]) for r in rows])
    np.testing.assert_allclose(t, np.arange(16) * 60.0 / 16, rtol=1e-5)
    assert all(float(r["lung_volume_ml"]) >= 0 for r in rows)
    for name in ["tidal.png", "breathing.gif", "projections.png"] + [f"slices_T{k}.png" for k in range(10)]:
        p = os.path.join(out, name)
        assert os.path.getsize(p) > 1000, name
    with open(os.path.join(out, "breathing.gif"), "rb") as f:
        assert f.read(6) in (b"GIF87a", b"GIF89a")


def test_export_round_trip_and_parity(run):
    _, workdir, m = run
    exp = os.path.join(workdir, "eval", "export")
    r = eval_lib.load_run(workdir)
    spacing, origin = nifti_frame_mm(r.case.scanner)
    vol = np.load(os.path.join(exp, "vol_t0.0025.npy"))
    back, affine = read_nifti(os.path.join(exp, "vol_t0.0025.nii.gz"))
    np.testing.assert_array_equal(np.asarray(back, np.float32), vol)
    np.testing.assert_allclose(np.diag(affine)[:3], spacing, rtol=1e-6)
    np.testing.assert_allclose(affine[:3, 3], origin, rtol=1e-6, atol=1e-4)
    # t = 0.0025 is the mid-time of phase 0 (0.15 s / 60 s): the exported volume reproduces psnr_3d[0].
    psnr = M.volume_metrics_host(r.case.volumes[0], vol)["psnr_3d"]
    assert psnr == pytest.approx(m["psnr_3d"][0], abs=1e-4)


def test_field_and_checkpoint_load(run):
    config, workdir, _ = run
    r = eval_lib.load_run(workdir)
    # The exported field is restored exactly: untouched by the coarse iterations, it equals its init.
    init = r.model.init_params(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), r.case)["field"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), r.params["field"], init)
    c = eval_lib.load_run(workdir, step=-1)
    assert c.step == r.step == 2 and c.source == "checkpoint 2"
    for k in ("xyz", "scaling", "rotation", "density"):
        np.testing.assert_array_equal(np.asarray(c.params[k]), np.asarray(r.params[k]))


def test_errors(run, tmp_path):
    _, workdir, _ = run
    with pytest.raises(eval_lib.RunError, match="does not exist"):
        eval_lib.load_run(str(tmp_path / "nope"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), bare / "config.json")
    with pytest.raises(eval_lib.RunError, match="no inference export"):
        eval_lib.load_run(str(bare))
    other = str(tmp_path / "other.pickle")  # another case: a different grid and detector
    generate_case(other, size=20, detector=24, views=10, val_views=2, preview=False, progress=False)
    with pytest.raises(eval_lib.MismatchError, match=r"other\.pickle.*meta\.json.*nVoxel"):
        eval_lib.load_run(workdir, data=other)


def test_cycle_metrics_against_the_phantom(run):
    """Later breathing cycles are scored against the phantom's exact volumes at their times: cycle 0 through this
    path equals the standard metrics (the case's GT phases are those volumes), and for this regular phantom and a
    model that does not move (coarse stage only) every cycle scores the same, as periodicity demands."""
    _, workdir, m = run
    r = eval_lib.load_run(workdir)
    c = eval_lib.cycle_metrics(r, [0, 7, 19], chunk=4, progress=False)
    assert c["cycles"] == [0, 7, 19]
    assert c["psnr_3d_by_cycle"][0] == pytest.approx(m["psnr_3d_mean"], abs=1e-4)
    assert c["ssim_3d_by_cycle"][0] == pytest.approx(m["ssim_3d_mean"], abs=1e-5)
    np.testing.assert_allclose(c["psnr_3d_by_cycle"], c["psnr_3d_by_cycle"][0], atol=1e-3)
    with pytest.raises(ValueError, match="cycle 20 is outside the scan"):
        eval_lib.cycle_metrics(r, [20], chunk=4, progress=False)
    no_gen = dataclasses.replace(r, case=dataclasses.replace(
        r.case, meta={k: v for k, v in r.case.meta.items() if k != "generator"}))
    with pytest.raises(ValueError, match="no generator record"):
        eval_lib.cycle_metrics(no_gen, [1], chunk=4, progress=False)


def test_tidal_curve_manual_threshold(run):
    """--lung_threshold overrides the per-volume thresholds: every time uses it, and the metrics say so."""
    _, workdir, m = run
    r = eval_lib.load_run(workdir)
    c = eval_lib.tidal_curve(r, 8, lung_threshold=0.285, chunk=4, progress=False)
    assert c["lung_threshold_mode"] == "manual" and c["lung_threshold"] == 0.285
    assert c["lung_threshold_used_min"] == c["lung_threshold_used_max"] == pytest.approx(0.285)
    assert m["lung_threshold_used_median"] != pytest.approx(0.285)  # the default run chose its own
    assert c["lung_volume_ml"].shape == (8,) and np.all(c["lung_volume_ml"] >= 0)
    assert c["tidal_swing_ml"] == 0  # the coarse model does not move
