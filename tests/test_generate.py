"""Phantom dataset generator: pickle layout (data_format.md §2), timing law, noise, 3D/sparse variants, CLI."""
import os

import numpy as np
import pytest

from x2gs_jax.data import generate as gen
from x2gs_jax.data.breathing import BreathingSignal
from x2gs_jax.data.naf import load_case, safe_load_pickle
from x2gs_jax.data.phantom import ThoraxPhantom
from x2gs_jax.geometry import Scanner

SMALL = dict(size=24, detector=32, views=20, val_views=6, progress=False)

GEOMETRY_KEYS = {"DSD": float, "DSO": float, "nDetector": 2, "dDetector": 2, "nVoxel": 3, "dVoxel": 3,
                 "offOrigin": 3, "offDetector": 2}
SETTING_KEYS = ("accuracy", "mode", "filter", "totalAngle", "startAngle", "randomAngle", "convert", "normalize",
                "noise", "numTrain", "numVal")


@pytest.fixture(scope="module")
def case4d(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gen") / "thorax4d.pickle")
    case = gen.generate_case(path, noise=10.0, i0=1e3, seed=5, **SMALL)
    return path, case


def test_4d_pickle_keys_dtypes_shapes(case4d):
    path, case = case4d
    d = safe_load_pickle(path)
    for key, spec in GEOMETRY_KEYS.items():
        assert key in d, key
        if isinstance(spec, int):
            assert np.asarray(d[key]).shape == (spec,), key
    for key in SETTING_KEYS:
        assert key in d, key
    assert d["mode"] == "cone" and d["filter"] is None and d["randomAngle"] is False and d["normalize"] is True
    assert d["accuracy"] == 0.5 and d["noise"] == 10.0 and d["numTrain"] == 20 and d["numVal"] == 6
    assert list(d["nVoxel"]) == [24] * 3 and list(d["nDetector"]) == [32, 32]
    np.testing.assert_allclose(np.asarray(d["dVoxel"]) * 24, 300.0)
    for split, n in (("train", 20), ("val", 6)):
        s = d[split]
        assert set(s) == {"projections", "angles", "time", "phase"}
        assert s["projections"].dtype == np.float32 and s["projections"].shape == (n, 32, 32)
        assert s["angles"].dtype == np.float64 and s["angles"].shape == (n,)
        assert s["time"].dtype == np.float64 and np.all((s["time"] >= 0) & (s["time"] < 1))
        assert np.issubdtype(s["phase"].dtype, np.integer)
        np.testing.assert_array_equal(s["phase"], np.floor(10 * np.mod(s["time"] * 60, 3.0) / 3.0 + 1e-9).astype(int))
        np.testing.assert_allclose(s["angles"], 2 * np.pi * s["time"], rtol=1e-12)  # 360 deg over the scan
    assert d["image"].dtype == np.float32 and d["image"].shape == (10, 24, 24, 24)
    assert d["image"].min() >= 0 and d["image"].max() <= 1
    np.testing.assert_allclose(d["train"]["time"], np.arange(20) / 20)
    assert np.all(np.diff(d["val"]["time"]) >= 0)
    loaded = load_case(path)
    assert loaded.is_4d and loaded.scanner == case.scanner and len(loaded.train) == 20
    assert os.path.exists(gen.preview_path(path))


def test_gt_phases_are_volumes_at_mid_times(case4d):
    _, case = case4d
    phantom = ThoraxPhantom.default(BreathingSignal(period_s=3.0))
    for k in (0, 3, 5):
        np.testing.assert_array_equal(case.volumes[k], phantom.volume_at((0.15 + 0.3 * k) / 60, case.scanner))
    assert np.max(np.abs(case.volumes[5] - case.volumes[0])) > 0.3  # the anatomy moves between phases


def test_magnified_box_fits_detector(case4d):
    _, case = case4d
    sc = case.scanner
    lo, hi = sc.bbox
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    widest = 0.0
    for angle in np.linspace(0, 2 * np.pi, 16, endpoint=False):
        source, right, down, fwd = (np.asarray(a, np.float64) for a in sc.frame(angle))
        rel = corners - source
        depth = rel @ fwd
        u, v = sc.DSD * rel @ right / depth, sc.DSD * rel @ down / depth
        assert np.max(np.abs(u)) < sc.s_detector[1] / 2 and np.max(np.abs(v)) < sc.s_detector[0] / 2
        widest = max(widest, np.max(np.abs(u)) / (sc.s_detector[1] / 2))
    assert widest > 0.9  # ... with only a small margin


def test_noise_on_train_only_and_clamped(case4d):
    _, case = case4d
    phantom = ThoraxPhantom.default(BreathingSignal(period_s=3.0))
    clean_val = phantom.project(case.scanner, case.val.angles, case.val.times)
    np.testing.assert_array_equal(case.val.projections, clean_val)
    clean_train = phantom.project(case.scanner, case.train.angles, case.train.times)
    noisy = case.train.projections
    assert np.all(np.isfinite(noisy)) and noisy.min() >= 0
    assert 0 < np.max(np.abs(noisy - clean_train)) < 0.5 * clean_train.max()


def test_tigre_noise_model_guards():
    rng = np.random.default_rng(0)
    p = np.concatenate([np.zeros((1, 8, 8)), np.full((1, 8, 8), 0.2), np.linspace(0, 0.4, 64).reshape(1, 8, 8)]).astype(np.float32)
    out = gen.add_tigre_noise(p, i0=3.0, sigma=10.0, rng=rng)  # tiny dose: counts often <= 0 before the clamp
    p_max = 0.4
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    assert out.min() >= 0 and out.max() <= p_max * np.log(3.0) + 1e-6  # counts clamped to >= 1
    # High dose, no Gaussian: unbiased to first order, relative error ~ 1 / sqrt(i0 e^-1).
    hi = gen.add_tigre_noise(np.repeat(p, 50, axis=0), i0=1e7, sigma=0.0, rng=np.random.default_rng(1))
    assert np.max(np.abs(hi - np.repeat(p, 50, axis=0))) < 0.01 * p_max
    np.testing.assert_array_equal(gen.add_tigre_noise(np.zeros((2, 3, 3), np.float32), 1e5, 10.0, rng), 0)
    a = gen.add_tigre_noise(p, 1e4, 10.0, np.random.default_rng(7))
    np.testing.assert_array_equal(a, gen.add_tigre_noise(p, 1e4, 10.0, np.random.default_rng(7)))


def test_static_3d_layout_and_sparse(tmp_path):
    path = str(tmp_path / "static3d.pickle")
    case = gen.generate_case(path, static=True, sparse=5, preview=False, seed=2, **SMALL)
    d = safe_load_pickle(path)
    assert d["image"].shape == (24, 24, 24) and d["image"].dtype == np.float32
    for split in ("train", "val"):
        assert set(d[split]) == {"projections", "angles"}
    np.testing.assert_allclose(d["train"]["angles"], np.linspace(0, 2 * np.pi, 6)[:-1], atol=1e-12)  # uniform 360 deg
    assert d["numTrain"] == 5 and d["generator"]["breathing_kind"] == "static"
    assert not os.path.exists(gen.preview_path(path))
    loaded = load_case(path)
    assert not loaded.is_4d and len(loaded.train) == 5
    # The static GT volume is the phantom at rest.
    phantom = ThoraxPhantom.default(BreathingSignal(kind="static"))
    np.testing.assert_array_equal(case.volumes, phantom.volume_at(0.0, case.scanner))


def test_sparse_4d_keeps_evenly_spread_views(tmp_path):
    case = gen.generate_case(None, sparse=4, **SMALL)
    np.testing.assert_allclose(case.train.times, [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_array_equal(case.train.phases, BreathingSignal().phase_bin(case.train.times * 60))
    with pytest.raises(ValueError, match="sparse"):
        gen.generate_case(None, sparse=21, **SMALL)


def test_cli_help_and_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gen.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--size", "--detector", "--views", "--val-views", "--noise", "--i0", "--irregular",
                 "--period", "--sparse", "--static", "--seed", "--no-preview"):
        assert flag in text, flag
    out = str(tmp_path / "cli_case.pickle")
    assert gen.main(["--out", out, "--size", "24", "--detector", "32", "--views", "20", "--val-views", "6",
                     "--irregular", "--seed", "3", "--no-preview"]) == 0
    d = safe_load_pickle(out)
    assert d["generator"]["breathing_kind"] == "irregular" and d["image"].shape == (10, 24, 24, 24)
    irregular = ThoraxPhantom.default(BreathingSignal(kind="irregular", seed=3))
    np.testing.assert_array_equal(d["image"][4], irregular.volume_at(1.35 / 60, Scanner.from_naf(d)))
