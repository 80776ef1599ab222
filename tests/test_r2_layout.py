"""R2-Gaussian case folders (meta_data.json + proj_train/ + proj_test/ + vol_gt.npy): written from a generated
phantom and read back equal to it, converted both ways, refused with clear errors (file, key, what was expected),
and trained on by configs/r2_static.py through --config.data.path=<folder>."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import r2_static
from x2gs_jax import train_lib
from x2gs_jax.data import convert as C
from x2gs_jax.data.generate import generate_case
from x2gs_jax.data.naf import DataError, init_path, load_case, save_case
from x2gs_jax.data.r2 import folder_sha256, load_r2_case, save_r2_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def static_case():
    return generate_case(None, size=12, detector=16, views=6, val_views=3, static=True, preview=False, progress=False)


@pytest.fixture()
def folder(static_case, tmp_path):
    path = tmp_path / "chest_cone"
    save_r2_case(path, static_case)
    return path


def _same_case(a, b):
    for k, v in a.scanner.to_naf().items():
        w = b.scanner.to_naf()[k]
        assert v == w if isinstance(v, str) else np.allclose(v, w, rtol=1e-12, atol=1e-12), k  # mm <-> m rounding
    assert a.scanner.n_detector == b.scanner.n_detector and a.scanner.n_voxel == b.scanner.n_voxel
    for split in ("train", "val"):
        sa, sb = getattr(a, split), getattr(b, split)
        np.testing.assert_array_equal(sa.projections, sb.projections)
        np.testing.assert_array_equal(sa.angles, sb.angles)
    np.testing.assert_array_equal(a.volumes, b.volumes)


def _same_json(a, b):
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, (a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same_json(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_json(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15)
    else:
        assert a == b


def test_round_trip_through_the_folder(static_case, folder):
    assert sorted(os.listdir(folder)) == ["meta_data.json", "proj_test", "proj_train", "vol_gt.npy"]
    meta = json.loads((folder / "meta_data.json").read_text())
    sc, naf = meta["scanner"], static_case.scanner.to_naf()
    # R2's lengths are its converter's metres: mm / 1000; total sizes beside the pitches; angles in radians.
    assert sc["DSD"] == pytest.approx(naf["DSD"] / 1000) and sc["DSO"] == pytest.approx(naf["DSO"] / 1000)
    np.testing.assert_allclose(sc["sVoxel"], naf["nVoxel"] * naf["dVoxel"] / 1000)
    np.testing.assert_allclose(sc["sDetector"], naf["nDetector"] * naf["dDetector"] / 1000)
    assert sc["nDetector"] == [16, 16] and sc["nVoxel"] == [12, 12, 12] and sc["mode"] == "cone"
    assert [f["angle"] for f in meta["proj_train"]] == static_case.train.angles.tolist()
    assert len(meta["proj_test"]) == 3 and meta["vol"] == "vol_gt.npy"
    first = np.load(folder / meta["proj_train"][0]["file_path"])
    assert first.shape == (16, 16) and np.array_equal(first, static_case.train.projections[0])
    back = load_case(folder)  # load_case detects the layout
    _same_case(static_case, back)
    # The scene scale the reference reader takes from this folder: 2 / max(sVoxel).
    assert back.scanner.scene_scale == pytest.approx(2.0 / max(sc["sVoxel"]), rel=1e-12)
    assert not back.is_4d and back.meta["totalAngle"] == 360.0
    # The folder's content hash (the init point cloud's record) follows its files, not their times.
    h = folder_sha256(folder)
    assert folder_sha256(folder) == h
    np.save(folder / meta["proj_test"][2]["file_path"], np.zeros((16, 16), np.float32))
    assert folder_sha256(folder) != h


def test_converter_both_ways(static_case, folder, tmp_path):
    pickle_path = tmp_path / "chest_cone.pickle"
    assert C.main(["--src", str(folder), "--out", str(pickle_path)]) == 0
    _same_case(static_case, load_case(pickle_path))
    back = tmp_path / "again"
    r = subprocess.run([sys.executable, "-m", "x2gs_jax.data.convert", "--src", str(pickle_path), "--out", str(back)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _same_case(static_case, load_r2_case(back))
    # The same files: arrays byte for byte, meta_data.json equal up to the mm <-> m rounding of its lengths.
    assert sorted(p.relative_to(back) for p in back.rglob("*.npy")) == \
        sorted(p.relative_to(folder) for p in folder.rglob("*.npy"))
    for p in folder.rglob("*.npy"):
        assert (back / p.relative_to(folder)).read_bytes() == p.read_bytes()
    _same_json(json.loads((back / "meta_data.json").read_text()), json.loads((folder / "meta_data.json").read_text()))
    # An existing output is refused (the message says how to replace it), replaced with --overwrite.
    assert C.main(["--src", str(pickle_path), "--out", str(back)]) == 2
    assert C.main(["--src", str(pickle_path), "--out", str(back), "--overwrite"]) == 0
    with pytest.raises(DataError, match=r"already exists \(pass --overwrite"):
        C.convert(str(folder), str(pickle_path))
    with pytest.raises(DataError, match="a folder without meta_data.json"):
        C.convert(str(tmp_path), str(tmp_path / "x.pickle"))
    # A user's initial point cloud travels with the case (same world units in both layouts).
    np.save(init_path(folder), np.zeros((3, 4)))
    C.convert(str(folder), str(tmp_path / "with_init.pickle"))
    assert os.path.exists(tmp_path / "init_with_init.npy")


def test_a_4d_case_does_not_fit_the_layout(tmp_path):
    case4d = generate_case(None, size=8, detector=8, views=4, val_views=2, preview=False, progress=False)
    with pytest.raises(DataError, match=r"static \(3D\) cases only; this case is 4D"):
        save_r2_case(tmp_path / "x", case4d)
    assert not (tmp_path / "x").exists() and os.listdir(tmp_path) == []


def _edit(folder, change):
    meta = json.loads((folder / "meta_data.json").read_text())
    change(meta)
    (folder / "meta_data.json").write_text(json.dumps(meta))


def test_bad_folders_are_refused_naming_file_and_key(folder, tmp_path):
    meta_name = r"chest_cone/meta_data\.json"

    def refused(pattern, change=None, setup=None):
        bad = tmp_path / "bad"
        if bad.exists():
            shutil.rmtree(bad)
        shutil.copytree(folder, bad)
        if change is not None:
            _edit(bad, change)
        if setup is not None:
            setup(bad)
        with pytest.raises(DataError, match=pattern.replace("chest_cone", "bad")):
            load_case(bad)

    refused(r"bad: not an R2-Gaussian case folder \(no meta_data\.json", setup=lambda d: os.remove(d / "meta_data.json"))
    refused(meta_name + r": not readable JSON", setup=lambda d: (d / "meta_data.json").write_text("{oops"))
    refused(meta_name + r": required key\(s\) missing: 'proj_test'", lambda m: m.pop("proj_test"))
    refused(meta_name + r": 'scanner': required key\(s\) missing: 'DSO'", lambda m: m["scanner"].pop("DSO"))
    refused(meta_name + r": 'scanner': key 'sDetector' or 'dDetector' is missing",
            lambda m: [m["scanner"].pop(k) for k in ("sDetector", "dDetector")])
    refused(meta_name + r": 'scanner': keys 'sVoxel' = .* and 'dVoxel' = .* disagree",
            lambda m: m["scanner"].update(sVoxel=[1.0, 1.0, 1.0]))
    refused(meta_name + r": 'scanner': key 'dVoxel': expected 3 positive lengths \(metres\), got \[0\.025, 0\.0, 0\.025\]",
            lambda m: [m["scanner"].pop("sVoxel"), m["scanner"].update(dVoxel=[0.025, 0.0, 0.025])])
    refused(meta_name + r": 'scanner': key 'nVoxel': expected 3 values, got shape \(2,\)",
            lambda m: m["scanner"].update(nVoxel=[12, 12]))
    refused(meta_name + r": 'scanner': keys 'DSD', 'DSO': cone beam needs DSD > DSO",
            lambda m: m["scanner"].update(DSD=0.5))
    refused(meta_name + r": key 'vol' is missing", lambda m: m.pop("vol"))
    refused(meta_name + r": key 'proj_train\[2\]\.file_path': the file .*proj_train_0002\.npy does not exist",
            setup=lambda d: os.remove(d / "proj_train" / "proj_train_0002.npy"))
    refused(meta_name + r": key 'proj_test\[1\]': 'angle' missing", lambda m: m["proj_test"][1].pop("angle"))
    refused(meta_name + r": key 'proj_train\[0\]\.angle': expected a finite number \(radians\), got 'x'",
            lambda m: m["proj_train"][0].update(angle="x"))
    refused(meta_name + r": key 'proj_train\[0\]\.file_path': '\.\./elsewhere\.npy' points outside the case folder",
            lambda m: m["proj_train"][0].update(file_path="../elsewhere.npy"))
    refused(r"proj_train_0001\.npy \(named by .*meta_data\.json key 'proj_train\[1\]'\): expected a projection of "
            r"shape \[16, 16\] \(scanner\.nDetector = \[H, W\]\), got \[16, 15\]",
            setup=lambda d: np.save(d / "proj_train" / "proj_train_0001.npy", np.zeros((16, 15), np.float32)))
    refused(r"proj_test_0000\.npy \(named by .*\): contains NaN or Inf",
            setup=lambda d: np.save(d / "proj_test" / "proj_test_0000.npy", np.full((16, 16), np.nan, np.float32)))
    refused(r"proj_test_0000\.npy \(named by .*\): not a readable \.npy array",
            setup=lambda d: np.save(d / "proj_test" / "proj_test_0000.npy", np.array([{}], dtype=object)))
    refused(r"vol_gt\.npy \(named by .*key 'vol'\): expected a volume of shape \[12, 12, 12\] \(scanner\.nVoxel = "
            r"\[nx, ny, nz\]\), got \[12, 12\]", setup=lambda d: np.save(d / "vol_gt.npy", np.zeros((12, 12))))


def test_r2_static_trains_on_a_folder(tmp_path):
    """configs/r2_static.py:tiny with --config.data.path=<R2 folder> (2 iterations): the folder's own init point cloud
    (init_<folder name>.npy inside it, R2-Gaussian's place) is made once with its record; eval.py's loader on the
    same case as a pickle scores the run as its training-time evaluation did. A bad folder is a usage error of
    train.py (the message, no traceback)."""
    config = r2_static.get_config("tiny")
    config.data.cache_dir = str(tmp_path / "cache")
    src = train_lib.resolve_case_path(config)  # the tiny static phantom, as a pickle
    folder = tmp_path / "tiny_case"
    C.convert(src, str(folder))
    config.data.path = str(folder)
    config.train.iterations = 2
    config.eval.iterations = (2,)
    config.checkpoint.every = 2
    workdir = tmp_path / "run"
    train_lib.train_and_evaluate(config, str(workdir))
    assert os.path.exists(folder / "init_tiny_case.npy") and os.path.exists(folder / "init_tiny_case.json")
    with open(workdir / "metrics.jsonl") as f:
        final = [r for r in map(json.loads, f) if r["kind"] == "eval"][-1]
    from x2gs_jax import eval_lib

    run = eval_lib.load_run(str(workdir), data=src)
    report, _ = eval_lib.reconstruction_metrics(run, chunk=1, progress=False)
    assert report["psnr_3d_mean"] == pytest.approx(final["psnr_3d_mean"], abs=1e-4)

    bad = tmp_path / "bad_case"
    shutil.copytree(folder, bad)
    os.remove(bad / "vol_gt.npy")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                        "--config=" + os.path.join(ROOT, "configs/r2_static.py:tiny"), f"--workdir={tmp_path / 'w'}",
                        f"--config.data.path={bad}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "bad_case/meta_data.json: key 'vol': the file" in r.stderr and "vol_gt.npy does not exist" in r.stderr
    save_case(tmp_path / "unused.pickle", load_case(folder))  # the folder's case saves as a valid pickle
