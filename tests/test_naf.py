"""NAF case pickles: reference layout, round trips, validation messages, unsafe pickles, atomic saving."""
import dataclasses
import os
import pickle
import subprocess

import numpy as np
import pytest

from x2gs_jax.data import naf
from x2gs_jax.data.naf import DataError, case_stem, init_path, load_case, save_case
from x2gs_jax.geometry import Scanner

from case_dicts import H, NV, W, scanner_keys

N_TRAIN, N_VAL = 5, 3


def reference_dict(four_d: bool = True, seed: int = 0) -> dict:
    """A case dict laid out as the reference generators write it (data_format.md §2, §8 item 5)."""
    rng = np.random.default_rng(seed)
    d = scanner_keys(N_TRAIN, N_VAL)
    for key, n in (("train", N_TRAIN), ("val", N_VAL)):
        s = np.sort(rng.uniform(0, 60, n))
        split = {"projections": rng.uniform(0, 0.3, (n, H, W)).astype(np.float32),
                 "angles": 2 * np.pi * s / 60}
        if four_d:
            split["time"] = s / 60
            split["phase"] = np.floor(10 * (s % 3) / 3).astype(np.int64)
        d[key] = split
    shape = (10, *NV) if four_d else NV
    d["image"] = rng.uniform(0, 1, shape).astype(np.float32)
    return d


def write(tmp_path, d, name="case.pickle", protocol=pickle.HIGHEST_PROTOCOL):
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=protocol)
    return str(path)


def assert_same(a, b):
    """Deep equality including NumPy dtypes and Python types."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    else:
        assert a == b


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_4d_reference_pickle(tmp_path, protocol):
    d = reference_dict(four_d=True)
    case = load_case(write(tmp_path, d, protocol=protocol))
    assert case.is_4d and case.volumes.shape == (10, *NV) and case.volumes.dtype == np.float32
    assert case.train.projections.shape == (N_TRAIN, H, W) and case.train.projections.dtype == np.float32
    assert case.val.projections.shape == (N_VAL, H, W)
    for split, key in ((case.train, "train"), (case.val, "val")):
        assert split.angles.dtype == np.float64 and split.times.dtype == np.float64
        assert split.phases.dtype == np.int64
        np.testing.assert_array_equal(split.projections, d[key]["projections"])
        np.testing.assert_array_equal(split.angles, d[key]["angles"])
        np.testing.assert_array_equal(split.times, d[key]["time"])
        np.testing.assert_array_equal(split.phases, d[key]["phase"])
    np.testing.assert_array_equal(case.volumes, d["image"])
    # Units (data_format.md §4): metres, then scene_scale = 2 / max(sVoxel_m); longest box side = 2.
    s_voxel_m = np.array(NV) * np.array([1.0, 1.5, 2.0]) / 1000
    scale = 2 / s_voxel_m.max()
    sc = case.scanner
    assert sc == Scanner.from_naf(d)
    assert sc.scene_scale == pytest.approx(scale, rel=1e-12)
    assert sc.DSO == pytest.approx(1.0 * scale, rel=1e-12) and sc.DSD == pytest.approx(1.536 * scale, rel=1e-12)
    assert max(sc.s_voxel) == pytest.approx(2.0, rel=1e-12)
    np.testing.assert_allclose(sc.off_origin, np.array([1.0, -2.0, 0.5]) / 1000 * scale, rtol=1e-12)
    assert sc.n_detector == (H, W) and sc.n_voxel == NV and sc.mode == "cone"
    # Everything else is kept verbatim (geometry in mm included).
    for key in ("DSD", "dDetector", "offOrigin", "noise", "totalAngle", "rescale_slope", "filter"):
        assert_same(case.meta[key], d[key])
    assert not {"train", "val", "image", "numTrain", "numVal"} & set(case.meta)


def test_load_3d_and_truncation_to_num_counts(tmp_path):
    d = reference_dict(four_d=False)
    d["numTrain"], d["numVal"] = 2, np.int64(0)  # fewer than stored: first entries only
    case = load_case(write(tmp_path, d))
    assert not case.is_4d and case.volumes.shape == NV
    assert case.train.times is None and case.train.phases is None
    np.testing.assert_array_equal(case.train.projections, d["train"]["projections"][:2])
    np.testing.assert_array_equal(case.train.angles, d["train"]["angles"][:2])
    assert case.train.projections.base is None  # a copy, not a view pinning the whole stack
    assert case.volumes.flags.writeable and case.val.angles.flags.writeable
    assert len(case.val) == 0 and case.val.projections.shape == (0, H, W)


def test_defaults_mode_offsets_and_test_fallback(tmp_path):
    d = reference_dict()
    for key in ("mode", "offOrigin"):
        del d[key]
    d["offDetector"] = None
    d["test"] = d.pop("val")
    d["numVal"] = 2
    case = load_case(write(tmp_path, d))
    assert case.scanner.mode == "cone"
    assert case.scanner.off_origin == (0.0, 0.0, 0.0) and case.scanner.off_detector == (0.0, 0.0)
    np.testing.assert_array_equal(case.val.projections, d["test"]["projections"][:2])
    assert "test" not in case.meta and case.meta["offDetector"] is None


def test_float64_and_legacy_numpy_pickles(tmp_path):
    """float64 projections become float32; a NumPy-1 pickle (numpy.core.* globals) still loads."""
    d = reference_dict()
    d["train"]["projections"] = d["train"]["projections"].astype(np.float64)
    d["numTrain"] = np.float64(3.0)
    d["DSD"] = np.float64(1536.0)
    raw = pickle.dumps(d, protocol=2)
    assert b"numpy._core.multiarray" in raw
    legacy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path = tmp_path / "legacy.pickle"
    path.write_bytes(legacy)
    case = load_case(str(path))
    assert case.train.projections.dtype == np.float32 and len(case.train) == 3
    np.testing.assert_array_equal(case.train.projections, d["train"]["projections"][:3].astype(np.float32))


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("four_d", [True, False])
def test_round_trip_bit_identical(tmp_path, four_d):
    d = reference_dict(four_d=four_d)
    src = write(tmp_path, d, "src.pickle")
    case = load_case(src)
    out = str(tmp_path / "out.pickle")
    save_case(out, case)
    again = load_case(out)
    assert again.scanner == case.scanner
    for attr in ("projections", "angles", "times", "phases"):
        for s1, s2 in ((case.train, again.train), (case.val, again.val)):
            a, b = getattr(s1, attr), getattr(s2, attr)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and np.array_equal(a, b)
    assert again.volumes.dtype == np.float32 and np.array_equal(again.volumes, case.volumes)
    # Saving a loaded reference-layout case writes the identical dictionary (keys, values, dtypes).
    with open(out, "rb") as f:
        written = pickle.load(f)
    assert set(written) == set(d)
    for key in d:
        assert_same(written[key], d[key])
    # And saving is deterministic.
    out2 = str(tmp_path / "out2.pickle")
    save_case(out2, again)
    assert (tmp_path / "out.pickle").read_bytes() == (tmp_path / "out2.pickle").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["out.pickle", "out2.pickle", "src.pickle"]


def test_save_from_scanner_only_adds_layout_defaults(tmp_path):
    """A Case built without meta gets geometry from its scanner and the §8 defaults."""
    loaded = load_case(write(tmp_path, reference_dict()))
    case = dataclasses.replace(loaded, meta={})
    out = str(tmp_path / "new.pickle")
    save_case(out, case)
    with open(out, "rb") as f:
        written = pickle.load(f)
    for key, value in naf._DEFAULTS.items():
        assert written[key] == value
    np.testing.assert_allclose(written["dVoxel"], [1.0, 1.5, 2.0], rtol=1e-12)
    np.testing.assert_allclose(written["offOrigin"], [1.0, -2.0, 0.5], rtol=1e-12)
    assert written["numTrain"] == N_TRAIN and written["val"]["phase"].dtype == np.int64
    again = load_case(out)
    np.testing.assert_array_equal(again.train.projections, case.train.projections)
    for a, b in zip(dataclasses.astuple(again.scanner), dataclasses.astuple(case.scanner)):
        np.testing.assert_allclose(np.asarray(a, dtype=float) if not isinstance(a, str) else 0,
                                   np.asarray(b, dtype=float) if not isinstance(b, str) else 0, rtol=1e-12)


def test_save_uses_scanner_geometry_when_meta_is_stale(tmp_path):
    loaded = load_case(write(tmp_path, reference_dict()))
    d2 = reference_dict()
    d2["DSD"] = 2000.0
    case = dataclasses.replace(loaded, scanner=Scanner.from_naf(d2))  # meta still says DSD = 1536
    out = str(tmp_path / "stale.pickle")
    save_case(out, case)
    with open(out, "rb") as f:
        assert pickle.load(f)["DSD"] == pytest.approx(2000.0, rel=1e-12)


def test_save_refuses_inconsistent_case_and_writes_nothing(tmp_path):
    case = load_case(write(tmp_path, reference_dict()))
    bad = dataclasses.replace(case, train=dataclasses.replace(case.train, angles=case.train.angles[:2]))
    out = tmp_path / "bad.pickle"
    with pytest.raises(DataError, match=r"bad\.pickle.*train\.angles"):
        save_case(str(out), bad)
    assert not out.exists()
    with pytest.raises(DataError, match=r"bad\.pickle: case\.meta must not hold the data keys \['numTrain'\]"):
        save_case(str(out), dataclasses.replace(case, meta={**case.meta, "numTrain": 3}))
    assert not out.exists()


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    case = load_case(write(tmp_path, reference_dict(), "src.pickle"))
    out = tmp_path / "case.pickle"
    save_case(str(out), case)
    before = out.read_bytes()

    def failing_dump(obj, f, protocol=None):
        f.write(b"\x80\x05partial garbage" * 100)  # half-written stream, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(pickle, "dump", failing_dump)
    with pytest.raises(OSError, match="disk full"):
        save_case(str(out), dataclasses.replace(case, volumes=case.volumes * 2))
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["case.pickle", "src.pickle"]  # no temp file left


# ------------------------------------------------------------------------------------------ validation
def _set(path, value):
    def mutate(d):
        *head, last = path.split(".")
        target = d
        for k in head:
            target = target[k]
        target[last] = value
    return mutate


def _delete(path):
    def mutate(d):
        *head, last = path.split(".")
        target = d
        for k in head:
            target = target[k]
        del target[last]
    return mutate


def _nan_at(path, index):
    def mutate(d):
        *head, last = path.split(".")
        target = d
        for k in head:
            target = target[k]
        arr = np.array(target[last], dtype=np.float64 if last != "projections" else np.float32)
        arr[index] = np.inf if "angles" in path else np.nan
        target[last] = arr
    return mutate


CASES = [
    # (id, mutation, substrings the message must contain besides the file name)
    ("missing_DSD", _delete("DSD"), ["'DSD'", "missing"]),
    ("missing_numVal", _delete("numVal"), ["'numVal'"]),
    ("missing_train", _delete("train"), ["'train'"]),
    ("missing_image", _delete("image"), ["'image'"]),
    ("missing_val_and_test", _delete("val"), ["'val'", "'test'"]),
    ("missing_projections", _delete("train.projections"), ["train.projections", "missing"]),
    ("missing_angles", _delete("val.angles"), ["val.angles"]),
    ("4d_without_time", _delete("train.time"), ["train.time", "4D"]),
    ("4d_without_phase", _delete("val.phase"), ["val.phase", "4D"]),
    ("proj_wrong_hw", _set("train.projections", np.zeros((N_TRAIN, W, H), np.float32)), ["train.projections", f"[n, {H}, {W}]"]),
    ("proj_2d", _set("val.projections", np.zeros((H, W), np.float32)), ["val.projections", "expected shape"]),
    ("proj_strings", _set("train.projections", np.full((N_TRAIN, H, W), "a")), ["train.projections", "dtype"]),
    ("proj_object", _set("train.projections", np.empty((N_TRAIN, H, W), object)), ["train.projections", "dtype"]),
    ("proj_bool", _set("train.projections", np.zeros((N_TRAIN, H, W), bool)), ["train.projections", "dtype"]),
    ("proj_nan", _nan_at("train.projections", (2, 1, 1)), ["train.projections", "NaN"]),
    ("angles_inf", _nan_at("val.angles", 1), ["val.angles", "NaN or Inf"]),
    ("time_nan", _nan_at("train.time", 0), ["train.time", "NaN"]),
    ("image_nan", _nan_at("image", (3, 1, 1, 1)), ["'image'", "NaN"]),
    ("angles_wrong_len", _set("train.angles", np.zeros(N_TRAIN + 1)), ["train.angles", f"[{N_TRAIN}]"]),
    ("time_wrong_shape", _set("val.time", np.zeros((N_VAL, 1))), ["val.time", f"[{N_VAL}]"]),
    ("phase_fractional", _set("train.phase", np.full(N_TRAIN, 0.5)), ["train.phase", "integer"]),
    ("image_wrong_shape", _set("image", np.zeros((10, 7, 4, 4), np.float32)), ["'image'", "[7, 4, 3]"]),
    ("image_5d", _set("image", np.zeros((1, 10, 7, 4, 3), np.float32)), ["'image'", "expected shape"]),
    ("numTrain_too_large", _set("numTrain", N_TRAIN + 1), ["'numTrain'", "exceeds", "train.projections"]),
    ("numVal_negative", _set("numVal", -1), ["'numVal'", "non-negative"]),
    ("numVal_fraction", _set("numVal", 1.5), ["'numVal'", "non-negative integer"]),
    ("numTrain_string", _set("numTrain", "5"), ["'numTrain'"]),
    ("DSD_zero", _set("DSD", 0.0), ["'DSD'", "positive"]),
    ("DSO_negative", _set("DSO", -1.0), ["'DSO'", "positive"]),
    ("DSO_nan", _set("DSO", float("nan")), ["'DSO'", "positive finite"]),
    ("DSD_not_above_DSO", _set("DSD", 900.0), ["'DSD'", "'DSO'", "DSD > DSO"]),
    ("dDetector_zero", _set("dDetector", [0.8, 0.0]), ["'dDetector'", "positive"]),
    ("dVoxel_negative", _set("dVoxel", [1.0, -1.0, 1.0]), ["'dVoxel'", "positive"]),
    ("dVoxel_len", _set("dVoxel", [1.0, 1.0]), ["'dVoxel'", "3 values"]),
    ("nVoxel_zero", _set("nVoxel", [7, 0, 3]), ["'nVoxel'", "positive integers"]),
    ("nVoxel_fraction", _set("nVoxel", [7.5, 4, 3]), ["'nVoxel'", "positive integers"]),
    ("nDetector_negative", _set("nDetector", [-6, 5]), ["'nDetector'", "positive integers"]),
    ("offOrigin_nan", _set("offOrigin", [0.0, np.nan, 0.0]), ["'offOrigin'", "finite"]),
    ("offDetector_len", _set("offDetector", [0.0, 0.0, 0.0]), ["'offDetector'", "2 values"]),
    ("mode_bad", _set("mode", "fan"), ["'mode'", "cone"]),
    ("train_not_dict", _set("train", [1, 2]), ["'train'", "dict"]),
]


@pytest.mark.parametrize("mutate,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_errors_name_file_and_key(tmp_path, mutate, needles):
    d = reference_dict()
    mutate(d)
    path = write(tmp_path, d, "bad_case.pickle")
    with pytest.raises(DataError) as info:
        load_case(path)
    msg = str(info.value)
    assert "bad_case.pickle" in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("obj,needle", [([1, 2], "expected a dict"), (np.zeros(3), "expected a dict")])
def test_top_level_not_a_dict(tmp_path, obj, needle):
    with pytest.raises(DataError, match=rf"top\.pickle: {needle}"):
        load_case(write(tmp_path, obj, "top.pickle"))


def test_unreadable_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.pickle: cannot open"):
        load_case(str(tmp_path / "nope.pickle"))
    good = pickle.dumps(reference_dict(), protocol=pickle.HIGHEST_PROTOCOL)
    for i, blob in enumerate([good[: len(good) // 2], b"", b"hello world, not a pickle"]):
        p = tmp_path / f"corrupt{i}.pickle"
        p.write_bytes(blob)
        with pytest.raises(DataError, match=rf"corrupt{i}\.pickle: not a valid pickle"):
            load_case(str(p))


# ------------------------------------------------------------------------------------------ unsafe pickles
class _OsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _Popen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize("payload,global_name", [
    (_OsSystem, f"{os.system.__module__}.system"),
    (_Eval, "builtins.eval"),
    (_Popen, "subprocess.Popen"),
])
@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickles_are_refused_and_not_executed(tmp_path, payload, global_name, nested):
    marker = tmp_path / "pwned"
    evil = payload(marker)
    if nested:  # hidden inside an otherwise valid case, after legitimate NumPy arrays
        obj = reference_dict()
        obj["train"]["extra"] = {"x": [evil]}
    else:
        obj = evil
    path = write(tmp_path, obj, "evil.pickle")
    # Sanity: the payload really would run with the stock unpickler (checked without running it).
    with open(path, "rb") as f:
        assert global_name.split(".")[-1].encode() in f.read()
    with pytest.raises(DataError) as info:
        load_case(path)
    msg = str(info.value)
    assert f"evil.pickle: refusing to unpickle global '{global_name}'" in msg
    assert "only NumPy arrays and plain Python containers are allowed" in msg
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [
    ("builtins", "getattr"), ("builtins", "exec"), ("builtins", "__import__"), ("builtins", "open"),
    ("numpy", "load"), ("numpy.testing._private.utils", "runstring"), ("copyreg", "_reconstructor"),
])
def test_other_dangerous_globals_refused(tmp_path, module, name):
    raw = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."  # protocol 2: GLOBAL then STOP
    path = tmp_path / "g.pickle"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=rf"refusing to unpickle global '{module}\.{name}'"):
        load_case(str(path))


def test_codecs_encode_only_latin1(tmp_path):
    """Protocol-2 bytes use _codecs.encode(str, 'latin1'); other codecs are refused."""
    raw = pickle.dumps(b"\x00\xff", protocol=2)
    assert b"_codecs" in raw and naf.safe_load_pickle(_blob(tmp_path, raw)) == b"\x00\xff"
    with pytest.raises(DataError, match="not a valid pickle"):
        naf.safe_load_pickle(_blob(tmp_path, raw.replace(b"latin1", b"utf_16")))


def _blob(tmp_path, raw):
    p = tmp_path / "blob.pickle"
    p.write_bytes(raw)
    return str(p)


# ------------------------------------------------------------------------------------------ names
def test_case_stem_and_init_path():
    assert case_stem("/data/dir_4d_case1.pickle") == "dir_4d_case1"
    assert case_stem("a/b.v2.pkl") == "b"
    assert init_path("/data/dir_4d_case1.pickle") == os.path.join("/data", "init_dir_4d_case1.npy")
    assert init_path("case.pickle") == "init_case.npy"
    with pytest.raises(DataError, match="case name"):
        case_stem("/data/.pickle")
