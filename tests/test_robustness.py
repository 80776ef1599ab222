"""Robustness datasets (physx.md §6): phase noise and sparse views as library functions and as the
`python -m x2gs_jax.data.robustness` CLI (names, validation, refusals, input never modified, --generate_init)."""
import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from x2gs_jax.data import robustness as R
from x2gs_jax.data.naf import case_from_dict, init_path, load_case

from case_dicts import H, NV, W, scanner_keys

GEOMETRY = ("DSD", "DSO", "nDetector", "dDetector", "nVoxel", "dVoxel", "offOrigin", "offDetector", "mode")


def case_dict(n_train=60, n_val=20, n_phases=10, four_d=True, seed=0, t_range=(0.0, 1.0)) -> dict:
    """A reference-layout case dict: phases cycle 0..n_phases-1 (equal counts when n_phases divides n)."""
    rng = np.random.default_rng(seed)
    d = {**scanner_keys(n_train, n_val), "note": {"made_by": "test", "values": [1, 2.5]}}
    for key, n in (("train", n_train), ("val", n_val)):
        t = np.linspace(*t_range, n, endpoint=False)
        split = {"projections": rng.uniform(0.1, 0.3, (n, H, W)).astype(np.float32),
                 "angles": 2 * np.pi * t}
        if four_d:
            split["time"] = t
            split["phase"] = np.arange(n, dtype=np.int64) % n_phases
        d[key] = split
    d["image"] = rng.uniform(0, 1, (10, *NV) if four_d else NV).astype(np.float32)
    return d


def write(path, d) -> str:
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=pickle.HIGHEST_PROTOCOL)
    return str(path)


def raw(path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_other_keys_kept(d_in: dict, d_out: dict) -> None:
    """Scanner geometry, generator keys, a foreign key and the GT volumes are carried over unchanged."""
    for key in GEOMETRY + ("rescale_slope", "rescale_intercept", "accuracy", "totalAngle", "noise", "image"):
        assert type(d_out[key]) is type(d_in[key]) and np.array_equal(d_out[key], d_in[key]), key
    assert d_out["note"] == d_in["note"]


def run_main(*args):
    return R.main(["robustness", *map(str, args)])


@pytest.fixture
def src(tmp_path):
    return write(tmp_path / "case.pickle", case_dict())


# ------------------------------------------------------------------------------------ phase noise (library)
def test_perturb_phases_reproduces_twin_draws_and_clips(tmp_path):
    d = case_dict()
    d["train"]["time"][0], d["train"]["time"][-1] = 0.0, 1.0 - 1e-7  # ends, so clipping happens at both
    case = case_from_dict(d)
    sigma, seed = 3.0, 7  # std 0.3: many draws leave [0, 1)
    out = R.perturb_phases(case, sigma, np.random.default_rng(seed))

    twin = np.random.default_rng(seed)  # the same stream: train draws first, then val's
    noise_train = twin.normal(0.0, sigma / 10, 60)
    noise_val = twin.normal(0.0, sigma / 10, 20)
    for split, orig, noise in ((out.train, case.train, noise_train), (out.val, case.val, noise_val)):
        expected = np.clip(orig.times + noise, 0.0, 1.0 - 1e-6)
        np.testing.assert_array_equal(split.times, expected)
        np.testing.assert_array_equal(split.phases, np.floor(expected * 10).astype(np.int64))
        assert split.phases.dtype == np.int64 and split.phases.min() >= 0 and split.phases.max() <= 9
        # Projections and angles are untouched (the same rows, same values).
        np.testing.assert_array_equal(split.projections, orig.projections)
        np.testing.assert_array_equal(split.angles, orig.angles)
    assert np.any(out.train.times == 0.0) and np.any(out.train.times == 1.0 - 1e-6)
    np.testing.assert_array_equal(out.volumes, case.volumes)
    assert out.scanner == case.scanner
    # The source case is not modified.
    np.testing.assert_array_equal(case.train.times, d["train"]["time"])
    rec = out.meta["robustness"][-1]
    assert rec["operation"] == "phase_noise" and rec["phase_noise"] == 3.0 and rec["n_phases"] == 10
    assert "robustness" not in case.meta


@pytest.mark.parametrize("n_phases", [10, 5])
def test_phase_noise_std_is_sigma_over_number_of_train_phases(n_phases):
    # Times in [0.3, 0.7): no clipping, so the added noise is exactly time_out - time_in.
    case = case_from_dict(case_dict(n_train=4000, n_val=2000, n_phases=n_phases, t_range=(0.3, 0.7)))
    out = R.perturb_phases(case, 0.15, np.random.default_rng(1))
    std = 0.15 / n_phases  # 0.015 for the X2GS decile phases
    for split, orig in ((out.train, case.train), (out.val, case.val)):
        noise = split.times - orig.times
        assert abs(noise.std() / std - 1) < 0.06  # ~5 sigma of the estimate for n >= 2000
        assert abs(noise.mean()) < 5 * std / np.sqrt(len(noise))
        np.testing.assert_array_equal(split.phases, np.floor(split.times * n_phases))
    # Val continues the stream: its noise is not a replay of train's first draws.
    assert not np.allclose(out.val.times - case.val.times, (out.train.times - case.train.times)[:2000])


def test_perturb_phases_refuses_3d_and_bad_sigma():
    with pytest.raises(R.RobustnessError, match="4D"):
        R.perturb_phases(case_from_dict(case_dict(four_d=False)), 0.15, np.random.default_rng(0))
    case = case_from_dict(case_dict())
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(R.RobustnessError, match="phase noise"):
            R.perturb_phases(case, bad, np.random.default_rng(0))


# ------------------------------------------------------------------------------------ sparse views (library)
def test_uniform_keeps_the_linspace_indices():
    case = case_from_dict(case_dict())  # 60 train views
    out = R.sparse_views(case, 0.5, "uniform", np.random.default_rng(0))
    # int(linspace(0, 59, 30)[i]) = ⌊59·i/29⌋ in exact integer arithmetic.
    idx = np.array([59 * i // 29 for i in range(30)])
    assert idx[0] == 0 and idx[-1] == 59 and idx[15] == 30
    np.testing.assert_array_equal(R.sparse_indices(case, 0.5, "uniform", None), idx)
    np.testing.assert_array_equal(out.train.projections, case.train.projections[idx])
    np.testing.assert_array_equal(out.train.angles, case.train.angles[idx])
    np.testing.assert_array_equal(out.train.times, case.train.times[idx])
    np.testing.assert_array_equal(out.train.phases, case.train.phases[idx])
    assert len(out.train) == 30 and out.meta["robustness"][-1]["indices"] == idx.tolist()
    for a, b in ((out.val.projections, case.val.projections), (out.val.angles, case.val.angles),
                 (out.val.times, case.val.times), (out.volumes, case.volumes)):
        np.testing.assert_array_equal(a, b)
    # r = 1 keeps everything; 0.29 of 100 is 29 views despite 100·0.29 = 28.999999999999996.
    assert len(R.sparse_views(case, 1.0, "uniform", None).train) == 60
    assert R.n_keep_of(100, 0.29) == 29 and R.n_keep_of(60, 0.2) == 12 and R.n_keep_of(7, 0.5) == 3


def test_random_is_a_sorted_unique_draw_of_n_keep():
    case = case_from_dict(case_dict())
    idx = R.sparse_indices(case, 0.2, "random", np.random.default_rng(5))
    assert idx.shape == (12,) and np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 60
    np.testing.assert_array_equal(idx, np.sort(np.random.default_rng(5).choice(60, 12, replace=False)))
    out = R.sparse_views(case, 0.2, "random", np.random.default_rng(5))
    np.testing.assert_array_equal(out.train.projections, case.train.projections[idx])


@pytest.mark.parametrize("ratio, per_phase", [(0.5, 3), (0.59, 3), (1.0, 6)])
def test_phase_balanced_takes_floor_n_keep_over_p_per_phase(ratio, per_phase):
    case = case_from_dict(case_dict())  # 6 views of each of 10 phases
    out = R.sparse_views(case, ratio, "phase_balanced", np.random.default_rng(2))
    counts = np.bincount(out.train.phases, minlength=10)
    np.testing.assert_array_equal(counts, np.full(10, per_phase))  # 0.59 -> n_keep 35 -> 3 each (30 kept)
    idx = np.asarray(out.meta["robustness"][-1]["indices"])
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(out.train.projections, case.train.projections[idx])


def test_sparse_refusals_name_the_problem():
    d = case_dict()
    keep = ~((d["train"]["phase"] == 3) & (np.arange(60) >= 20))  # phase 3 keeps only 2 of its 6 views
    d["train"] = {k: v[keep] for k, v in d["train"].items()}
    d["numTrain"] = int(keep.sum())
    case = case_from_dict(d)
    with pytest.raises(R.RobustnessError, match="phase 3 has only 2"):  # ⌊56·0.6⌋ = 33 -> 3 per phase
        R.sparse_views(case, 0.6, "phase_balanced", np.random.default_rng(0))
    assert len(R.sparse_views(case, 0.5, "phase_balanced", np.random.default_rng(0)).train) == 20  # 2 per phase
    with pytest.raises(R.RobustnessError, match="= 0 views per phase"):
        R.sparse_views(case, 0.1, "phase_balanced", np.random.default_rng(0))  # 5 views, 10 phases
    with pytest.raises(R.RobustnessError, match="keeps"):
        R.sparse_views(case, 0.01, "uniform", None)
    with pytest.raises(R.RobustnessError, match="3D"):
        R.sparse_views(case_from_dict(case_dict(four_d=False)), 0.5, "phase_balanced", np.random.default_rng(0))
    assert len(R.sparse_views(case_from_dict(case_dict(four_d=False)), 0.5, "uniform", None).train) == 30


def test_default_output_names():
    assert R.default_output("/d/dir_4d_case1.pickle", phase_noise=0.15) == "/d/dir_4d_case1_noise0.15.pickle"
    assert R.default_output("/d/dir_4d_case1.pickle", phase_noise=0.5) == "/d/dir_4d_case1_noise0.5.pickle"
    assert R.default_output("c.pkl", phase_noise=1) == "c_noise1.0.pickle"
    assert R.default_output("/d/dir_4d_case1.pickle", view_ratio=0.5) == "/d/dir_4d_case1_sparse50.pickle"
    assert R.default_output("/d/dir_4d_case1.pickle", view_ratio=0.2) == "/d/dir_4d_case1_sparse20.pickle"
    assert R.default_output("c.pickle", view_ratio=0.29) == "c_sparse29.pickle"


# ------------------------------------------------------------------------------------ CLI
def test_cli_phase_noise_writes_a_valid_case_and_leaves_the_input_alone(src, tmp_path, capsys):
    before = sha(src)
    assert run_main("--data", src, "--phase_noise", "0.15") == 0
    out = str(tmp_path / "case_noise0.15.pickle")
    assert os.path.isfile(out) and sha(src) == before
    assert "case_noise0.15.pickle" in capsys.readouterr().out

    case = load_case(out)  # the validated reader accepts it
    expected = R.perturb_phases(load_case(src), 0.15, np.random.default_rng(42))  # default --seed 42
    np.testing.assert_array_equal(case.train.times, expected.train.times)
    np.testing.assert_array_equal(case.val.times, expected.val.times)
    d_in, d_out = raw(src), raw(out)
    assert_other_keys_kept(d_in, d_out)
    assert d_out["numTrain"] == 60 and d_out["numVal"] == 20
    for split in ("train", "val"):
        np.testing.assert_array_equal(d_out[split]["projections"], d_in[split]["projections"])
        np.testing.assert_array_equal(d_out[split]["angles"], d_in[split]["angles"])
        assert not np.array_equal(d_out[split]["time"], d_in[split]["time"])
    rec = d_out["robustness"]
    assert isinstance(rec, list) and len(rec) == 1
    assert rec[0]["source"] == "case.pickle" and rec[0]["seed"] == 42 and rec[0]["phase_noise"] == 0.15
    assert rec[0]["noise_std"] == pytest.approx(0.015)


def test_cli_sparse_views_and_chained_records(src, tmp_path):
    out = str(tmp_path / "mine.pickle")
    assert run_main("--data", src, "--view_ratio", "0.2", "--view_strategy", "random", "--seed", "3",
                    "--output", out) == 0
    d_in, d_out = raw(src), raw(out)
    idx = R.sparse_indices(load_case(src), 0.2, "random", np.random.default_rng(3))
    assert_other_keys_kept(d_in, d_out)
    assert d_out["numTrain"] == 12 and d_out["numVal"] == 20
    for key in ("projections", "angles", "time", "phase"):
        np.testing.assert_array_equal(d_out["train"][key], d_in["train"][key][idx])
        np.testing.assert_array_equal(d_out["val"][key], d_in["val"][key])
    # A second operation on the sparse case appends its own record.
    assert run_main("--data", out, "--phase_noise", "0.5") == 0
    rec = raw(tmp_path / "mine_noise0.5.pickle")["robustness"]
    assert [r["operation"] for r in rec] == ["sparse_views", "phase_noise"]
    assert rec[0]["source"] == "case.pickle" and rec[1]["source"] == "mine.pickle"


def test_cli_refuses_to_overwrite_and_to_write_the_input(src, tmp_path, capsys):
    out = str(tmp_path / "case_sparse50.pickle")
    assert run_main("--data", src, "--view_ratio", "0.5") == 0
    first = sha(out)
    capsys.readouterr()
    assert run_main("--data", src, "--view_ratio", "0.5", "--view_strategy", "random") == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and sha(out) == first
    assert run_main("--data", src, "--view_ratio", "0.5", "--view_strategy", "random", "--overwrite") == 0
    assert sha(out) != first
    before = sha(src)
    for extra in ([], ["--overwrite"]):
        assert run_main("--data", src, "--phase_noise", "0.1", "--output", src, *extra) == 2
        assert "is the input file" in capsys.readouterr().err
    assert sha(src) == before


BAD = [
    ([], "exactly one of --phase_noise"),
    (["--phase_noise", "0.1", "--view_ratio", "0.5"], "exactly one of --phase_noise"),
    (["--phase_noise", "0"], "--phase_noise"),
    (["--phase_noise", "-0.1"], "--phase_noise"),
    (["--phase_noise", "nan"], "--phase_noise"),
    (["--phase_noise", "abc"], "--phase_noise"),
    (["--phase_noise", "0.1", "--view_strategy", "random"], "--view_strategy"),
    (["--view_ratio", "0"], "--view_ratio"),
    (["--view_ratio", "1.5"], "--view_ratio"),
    (["--view_ratio", "0.01"], "--view_ratio"),  # ⌊60·0.01⌋ = 0 views
    (["--view_ratio", "0.1", "--view_strategy", "phase_balanced"], "--view_strategy"),  # 6 views, 10 phases
    (["--view_ratio", "0.5", "--view_strategy", "every_other"], "--view_strategy"),
    (["--view_ratio", "0.5", "--seed", "-1"], "--seed"),
    (["--view_ratio", "0.5", "--output", "out.npy"], "--output"),
    (["--view_ratio", "0.5", "--output", "/no/such/dir/x.pickle"], "--output"),
    (["--view_ratio", "0.5", "--output", "{tmp}/case.v2.pickle"], "same case name"),
    (["--view_ratio", "0.5", "--generate_init", "--init_n_points", "0"], "--init_n_points"),
    (["--view_ratio", "0.5", "--bogus", "1"], "bogus"),
    (["--view_ratio", "0.5", "extra"], "unexpected arguments"),
]


@pytest.mark.parametrize("args, needle", BAD, ids=[" ".join(a) or "no-op" for a, _ in BAD])
def test_cli_bad_flags_exit_2_with_one_line(src, tmp_path, capsys, args, needle):
    before = set(os.listdir(tmp_path))
    args = [a.format(tmp=tmp_path) for a in args]
    assert run_main("--data", src, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert set(os.listdir(tmp_path)) == before


def test_cli_bad_inputs_exit_2(tmp_path, capsys):
    assert run_main("--phase_noise", "0.1") == 2
    assert "--data is required" in capsys.readouterr().err
    assert run_main("--data", tmp_path / "missing.pickle", "--phase_noise", "0.1") == 2
    assert "missing.pickle" in capsys.readouterr().err
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(b"not a pickle")
    assert run_main("--data", bad, "--phase_noise", "0.1") == 2
    assert "bad.pickle" in capsys.readouterr().err
    static = write(tmp_path / "static.pickle", case_dict(four_d=False))
    assert run_main("--data", static, "--phase_noise", "0.1") == 2
    err = capsys.readouterr().err
    assert "--phase_noise" in err and "3D" in err and err.count("\n") == 1


def test_module_entry_point_exits_2_without_traceback(src):
    proc = subprocess.run([sys.executable, "-m", "x2gs_jax.data.robustness", "--data", src, "--view_ratio", "2"],
                          capture_output=True, text=True, cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--view_ratio" in proc.stderr


def test_generate_init_writes_init_beside_the_output_as_prepare_names_it(src, tmp_path):
    from x2gs_jax.ct.init_pcd import init_points
    from x2gs_jax.gaussians import load_init_points

    flags_ = ["--generate_init", "--init_n_points", "20", "--init_density_thresh", "0"]
    assert run_main("--data", src, "--view_ratio", "0.5", *flags_) == 0
    out = str(tmp_path / "case_sparse50.pickle")
    path = init_path(out)
    assert path == str(tmp_path / "init_case_sparse50.npy")
    pts = load_init_points(path)  # what the trainer's prepare.initial_points would read
    expected = init_points(load_case(out), n_points=20, density_thresh=0.0, density_rescale=0.15, seed=0,
                           progress=False)  # FDK of the 30 kept views
    np.testing.assert_allclose(pts, expected, rtol=1e-6)

    # A dotted output name: the case name stops at the first dot, so the init file is init_case_noise0.npy
    # (shared by noise0.15 and noise0.5, whose projections and angles -- all the FDK sees -- are identical).
    assert run_main("--data", src, "--phase_noise", "0.15", "--generate_init", "--init_method", "random",
                    "--init_n_points", "7") == 0
    shared = tmp_path / "init_case_noise0.npy"
    assert load_init_points(shared).shape == (7, 4)
    assert run_main("--data", src, "--phase_noise", "0.5", "--generate_init") == 2  # would replace it
    assert not (tmp_path / "case_noise0.5.pickle").exists()
    assert run_main("--data", src, "--phase_noise", "0.5") == 0  # without the flag the trainer reuses it
