"""eval.py end to end on a tiny 4D run trained inside the test (coarse and fine stage): metrics.json equal to the
training-time evaluation, the schedule's rules on its checkpoints, tidal.csv, pictures and movies, NIfTI exports (3D and
4D, μ and HU) read back by nibabel and SimpleITK, parity of the export path with the metrics path, loud errors on wrong
data/runs."""
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
from x2gs_jax.nifti import nifti_frame_mm, read_nifti, read_nifti_4d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained 4D `x2:tiny` run: coarse iterations 1-2, fine 3-10 with the periodic loss from iteration 4 (so the
    field and the period are trained), evaluated during training at 2 (coarse end) and 10, checkpoints at 2 and 10;
    then eval.py's library on its export."""
    root = tmp_path_factory.mktemp("eval")
    config = x2_gaussian.get_config("tiny")
    config.data.cache_dir = str(root / "cache")
    config.train.iterations = 10
    config.train.coarse_iterations = 2
    config.loss.periodic_start = 3
    config.densify.enabled = False
    config.eval.iterations = (2, 10)
    config.checkpoint.every = 10
    workdir = str(root / "run")
    train_lib.train_and_evaluate(config, workdir)
    m = eval_lib.evaluate_run(workdir, tidal_points=16, export_times=(0.0, 0.0025), chunk=4, gif_frames=4,
                              proj_views=2, progress=False)
    return config, workdir, m


def _training_eval(workdir, step) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "eval" and r["step"] == step][0]


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
    assert m["step"] == 10 and m["stage"] == "fine" and m["source"] == "export"
    # eval.py on the export == the training-time evaluation of the same (final, fine-stage) state.
    final = _training_eval(workdir, 10)
    for k in ("psnr_3d_mean", "ssim_3d_mean"):
        assert m[k] == pytest.approx(final[k], abs=1e-4), k
    # The period stepped on iterations 4-9 (after periodic_start, before the last iteration): it left 2.8 s.
    assert abs(m["period_learned_s"] - 2.8) > 1e-4
    assert m["period_gt_s"] == 3.0
    # The phantom case: the GT curve is known, so the agreement keys are reported.
    assert "tidal_amplitude_gt_ml" in m and m["tidal_amplitude_gt_ml"] > 0
    # The curve of a barely trained field: reported (a period only when the curve is not flat), lungs found.
    assert m["tidal_amplitude_ml"] >= m["tidal_swing_ml"] >= 0 and m["tidal_mean_ml"] > 0
    assert (m["tidal_period_s"] is None) == ("tidal_period_error" in m)
    # Default segmentation: per-volume thresholds, reported (in the volume's units) beside the flags' values.
    assert m["lung_threshold_mode"] == "auto" and m["lung_threshold"] is None
    assert 0 < m["lung_threshold_used_min"] <= m["lung_threshold_used_median"] <= m["lung_threshold_used_max"]


def test_schedule_follows_the_reference_rules(run):
    """x2gaussian.md §9-10 and physx.md §0 on the checkpoints of the run (per-group Adam step counts are the number
    of iterations each group stepped): no step on a stage's last iteration (2 and 10), a fresh optimiser and fresh
    densification statistics at the coarse->fine switch, the field from the first fine iteration, the period only
    after periodic_start (3), and the periodic loss only then."""
    from x2gs_jax.checkpoint import Checkpointer
    from x2gs_jax.data.prepare import initial_points, resolve_case_path
    from x2gs_jax.data.naf import load_case
    from x2gs_jax.optim import group_state
    from x2gs_jax.run_state import template_state

    config, workdir, _ = run
    path = train_lib.resolve_case_path(config)
    case = load_case(path)
    model = train_lib.make_model(config, case)
    points = initial_points(resolve_case_path(config), case, config)
    ckpt = Checkpointer(workdir, read_only=True)
    counts = {}
    for step in (2, 10):
        state, _ = ckpt.restore(lambda meta: template_state(config, case, points, model, meta), step)
        counts[step] = {g: int(group_state(state.opt_state, g).count)
                        for g in ("xyz", "scaling", "rotation", "density", "grid", "deformation", "period")}
    gaussians = ("xyz", "scaling", "rotation", "density")
    assert counts[2] == {**{g: 1 for g in gaussians}, "grid": 0, "deformation": 0, "period": 0}  # iteration 1
    assert counts[10] == {**{g: 7 for g in gaussians}, "grid": 7, "deformation": 7, "period": 6}  # 3-9; 4-9
    # Statistics restarted at iteration 3: Gaussians inside the cone are seen by every iteration 3-10.
    visits = np.asarray(state.stats.count)[np.asarray(state.active)]
    assert visits.max() == 8
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        prior = {r["step"]: r["loss_render_prior"] for r in map(json.loads, f)
                 if r["kind"] == "train" and r["step"] > 2}
    assert prior[3] == 0 and all(prior[it] > 0 for it in range(4, 11))


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
    # The movie beside the GIF: an MP4 (ISO base media 'ftyp' box) of the same 4 frames.
    import imageio_ffmpeg

    with open(os.path.join(out, "breathing.mp4"), "rb") as f:
        assert f.read(8)[4:] == b"ftyp"
    reader = imageio_ffmpeg.read_frames(os.path.join(out, "breathing.mp4"))
    meta = next(reader)
    assert meta["fps"] == 8 and meta["size"][0] % 16 == 0 and meta["size"][1] % 16 == 0
    assert sum(1 for _ in reader) == 4
    assert m["movies"] == ["breathing.gif", "breathing.mp4"]


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
    assert m["units"] == "mu" and m["mu_water"] == 0.5  # the run config's eval.mu_water (the phantom's water)
    # The phase volumes as one 4D NIfTI: time = the 4th axis, 0.3 s apart from phase 0's mid-time 0.15 s.
    phases, affine4, dt, t0 = read_nifti_4d(os.path.join(exp, "phases_4d.nii.gz"))
    assert phases.shape == (10, *r.case.volumes.shape[1:]) and dt == pytest.approx(0.3) and t0 == pytest.approx(0.15)
    np.testing.assert_array_equal(affine4, affine)
    np.testing.assert_allclose(phases[0], vol, atol=1e-6)
    assert os.path.join(exp, "phases_4d.nii.gz") in m["exported"]


def test_hounsfield_export(run, tmp_path):
    """--units=hu: HU = 1000 (mu - mu_water) / mu_water in the .npy and the NIfTI (header: cal range, description),
    the same frame as the mu export."""
    import nibabel as nib

    _, workdir, _ = run
    r = eval_lib.load_run(workdir)
    mu = np.load(os.path.join(workdir, "eval", "export", "vol_t0.0025.npy"))
    written = eval_lib.export_volumes(r, [0.0025], str(tmp_path), chunk=4, units="hu", mu_water=0.4)
    assert written == [str(tmp_path / "vol_t0.0025.npy"), str(tmp_path / "vol_t0.0025.nii.gz")]
    hu = np.load(tmp_path / "vol_t0.0025.npy")
    np.testing.assert_allclose(hu, 1000.0 * (mu - 0.4) / 0.4, atol=2e-3)
    img = nib.load(tmp_path / "vol_t0.0025.nii.gz")
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), hu)
    assert float(img.header["cal_min"]) == pytest.approx(hu.min()) and float(img.header["cal_max"]) == pytest.approx(hu.max())
    assert bytes(img.header["descrip"]).rstrip(b"\0") == b"x2gs-jax HU (mu_water 0.4)"
    np.testing.assert_array_equal(img.affine, read_nifti(os.path.join(workdir, "eval", "export", "vol_t0.0025.nii.gz"))[1])
    with pytest.raises(ValueError, match="units must be one of"):
        eval_lib.evaluate_run(workdir, units="kelvin")


def test_training_volumes_read_by_simpleitk(run):
    """The trainer's volumes/ of a 4D run: one NIfTI per phase and vol_pred_4d.nii.gz, read by ITK (LPS frame) with
    the scanner's spacing and origin and the phases' times; values equal to the .npy files."""
    sitk = pytest.importorskip("SimpleITK")
    _, workdir, _ = run
    r = eval_lib.load_run(workdir)
    spacing, origin = nifti_frame_mm(r.case.scanner)
    stack = np.stack([np.load(os.path.join(workdir, "volumes", f"vol_pred_T{k}.npy")) for k in range(10)])
    img = sitk.ReadImage(os.path.join(workdir, "volumes", "vol_pred_T3.nii.gz"))
    assert img.GetSize() == stack.shape[1:]
    np.testing.assert_allclose(img.GetSpacing(), spacing, rtol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), origin * [-1, -1, 1], rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), stack[3])
    img4 = sitk.ReadImage(os.path.join(workdir, "volumes", "vol_pred_4d.nii.gz"))
    assert img4.GetSize() == (*stack.shape[1:], 10)
    np.testing.assert_allclose(img4.GetSpacing(), (*spacing, 0.3), rtol=1e-6)
    np.testing.assert_allclose(img4.GetOrigin()[3], 0.15, rtol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img4).transpose(3, 2, 1, 0), np.moveaxis(stack, 0, -1))


def test_field_and_checkpoint_load(run):
    config, workdir, _ = run
    r = eval_lib.load_run(workdir)
    c = eval_lib.load_run(workdir, step=-1)
    assert c.step == r.step == 10 and c.source == "checkpoint 10" and c.stage == r.stage == "fine"
    for k in ("xyz", "scaling", "rotation", "density", "period"):
        np.testing.assert_array_equal(np.asarray(c.params[k]), np.asarray(r.params[k]))
    # The exported field is restored exactly: the trained one of the last checkpoint, no longer its init.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), r.params["field"],
                 c.params["field"])
    init = r.model.init_params(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), r.case)["field"]
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(r.params["field"]), jax.tree.leaves(init)))


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
    path equals the standard metrics (the case's GT phases are those volumes). The checkpoint at the coarse stage's
    last iteration is evaluated as a coarse (undeformed) model, as during training: it scores what the training-time
    evaluation of that state scored, and, not moving, the same in every cycle of this regular phantom."""
    _, workdir, m = run
    r = eval_lib.load_run(workdir)
    c = eval_lib.cycle_metrics(r, [0, 19], chunk=4, progress=False)
    assert c["cycles"] == [0, 19]
    assert c["psnr_3d_by_cycle"][0] == pytest.approx(m["psnr_3d_mean"], abs=1e-4)
    assert c["ssim_3d_by_cycle"][0] == pytest.approx(m["ssim_3d_mean"], abs=1e-5)
    coarse = eval_lib.load_run(workdir, step=2)
    assert coarse.stage == "coarse"
    cc = eval_lib.cycle_metrics(coarse, [0, 7, 19], chunk=4, progress=False)
    assert cc["psnr_3d_by_cycle"][0] == pytest.approx(_training_eval(workdir, 2)["psnr_3d_mean"], abs=1e-4)
    np.testing.assert_allclose(cc["psnr_3d_by_cycle"], cc["psnr_3d_by_cycle"][0], atol=1e-3)
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


def test_tidal_curves_of_one_run_compile_once(run, monkeypatch):
    """A run traces its lung-volume query once: later curves, with another threshold or component fraction, reuse
    it (both are arguments of the compiled program), and a repeated curve gives the same numbers."""
    _, workdir, m = run
    r = eval_lib.load_run(workdir)
    traced = []
    measure = eval_lib.tidal.lung_measure
    monkeypatch.setattr(eval_lib.tidal, "lung_measure", lambda *a, **k: traced.append(1) or measure(*a, **k))
    auto = eval_lib.tidal_curve(r, 8, chunk=4, progress=False)
    manual = eval_lib.tidal_curve(r, 8, lung_threshold=0.285, chunk=4, progress=False)
    again = eval_lib.tidal_curve(r, 8, chunk=4, progress=False, min_component_fraction=0.01)
    assert len(traced) == 1
    assert manual["lung_threshold_used_min"] == manual["lung_threshold_used_max"] == pytest.approx(0.285)
    assert auto["lung_threshold_used_median"] != pytest.approx(0.285)
    np.testing.assert_array_equal(auto["lung_volume_ml"][:1], eval_lib.tidal_curve(
        r, 1, chunk=4, progress=False)["lung_volume_ml"])  # time 0 of both grids, same program
    assert again["min_component_fraction"] == 0.01
    # Another case (dataclasses.replace) does not inherit the compiled queries.
    assert dataclasses.replace(r, step=r.step).compiled == {}
