"""NAF / X2GS-style `*.pickle` cases (3D and 4D): safe loading, validation and atomic saving.

Layout and units: data_format.md §2-§5. Scanner lengths in the pickle are millimetres; projections
are line integrals with path length in metres (TIGRE's convention), row 0 = top.
"""
from __future__ import annotations

import builtins
import collections
import dataclasses
import math
import os
import pickle
from typing import Any, Optional

import numpy as np

from x2gs_jax.fileio import atomic_writer
from x2gs_jax.geometry import MODES, Scanner


class DataError(ValueError):
    """A case file is unreadable, unsafe or inconsistent; the message names the file and the key."""


@dataclasses.dataclass
class Split:
    """One split of a case (train or val).

    Attributes:
      projections: [n, H, W] float32, pickle units (line integral, path length in metres).
      angles: [n] float64, gantry angles in radians.
      times: [n] float64 normalised acquisition time (seconds / scan length), or None for 3D cases.
      phases: [n] int64 phase bin, or None for 3D cases.
    """

    projections: np.ndarray
    angles: np.ndarray
    times: Optional[np.ndarray] = None
    phases: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.projections.shape[0])


@dataclasses.dataclass
class Case:
    """A loaded case.

    Attributes:
      scanner: geometry in world units (`Scanner.from_naf` of the pickle's scanner keys).
      train, val: the two splits (first numTrain / numVal entries of the stored arrays).
      volumes: GT volume(s), float32 [P, nx, ny, nz] (4D, P phases) or [nx, ny, nz] (3D).
      meta: every other key of the pickle (generator settings such as noise, totalAngle), kept verbatim
        so that `save_case(load_case(p))` writes the same dictionary.
    """

    scanner: Scanner
    train: Split
    val: Split
    volumes: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def is_4d(self) -> bool:
        return self.volumes.ndim == 4


# ===================================================================================== safe unpickling
_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core  # NumPy 2 moved numpy.core -> numpy._core


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as used by protocol-2 pickles for bytes payloads; only the latin-1 codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed with latin1, got {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a case pickle may reference: NumPy array/dtype/scalar reconstruction and inert
    builtin containers. Names are resolved here, never imported from the pickle's module string, so old
    `numpy.core.*` names map to NumPy 2's `numpy._core` without importing anything."""
    reconstruct = _NUMPY_CORE.multiarray._reconstruct
    scalar = _NUMPY_CORE.multiarray.scalar
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
    }
    for name in ("set", "frozenset", "slice", "complex", "bytearray", "range"):
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = getattr(builtins, name)  # Python 2 spelling
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        frombuffer = getattr(_NUMPY_CORE.numeric, "_frombuffer", None)
        if frombuffer is not None:  # used by protocol-5 array pickles
            allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global outside `_allowed_globals()`, so no payload can run code."""

    def __init__(self, file, name: str):
        super().__init__(file)
        self._name = name
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._name}: refusing to unpickle global '{module}.{name}' "
                "(only NumPy arrays and plain Python containers are allowed)") from None

    def persistent_load(self, pid):
        raise DataError(f"{self._name}: refusing persistent id {pid!r} in pickle")


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle `path` admitting only NumPy arrays/dtypes/scalars and plain Python containers.

    Raises:
      DataError: unreadable file, corrupt pickle, or a pickle referencing any other global.
    """
    name = os.fspath(path)
    try:
        f = open(name, "rb")
    except OSError as e:
        raise DataError(f"{name}: cannot open case file ({e.strerror or e})") from e
    with f:
        try:
            return _SafeUnpickler(f, name).load()
        except DataError:
            raise
        except Exception as e:  # corrupt streams raise many types (UnpicklingError, EOFError, ValueError...)
            raise DataError(f"{name}: not a valid pickle ({type(e).__name__}: {e})") from e


# ===================================================================================== validation
_GEOMETRY_KEYS = ("DSD", "DSO", "nDetector", "dDetector", "nVoxel", "dVoxel", "offOrigin", "offDetector")
_REQUIRED_KEYS = ("DSD", "DSO", "nDetector", "dDetector", "nVoxel", "dVoxel", "numTrain", "numVal", "train",
                  "image")
# Keys rebuilt from the Case's arrays on save (never taken from `meta`).
_DATA_KEYS = ("numTrain", "numVal", "train", "val", "image")
# Defaults written by `save_case` for missing generator keys (data_format.md §8 item 5).
_DEFAULTS = {
    "accuracy": 0.5,
    "mode": "cone",
    "filter": None,
    "totalAngle": 360.0,
    "startAngle": 0.0,
    "randomAngle": False,
    "convert": False,
    "normalize": True,
    "noise": 0,
}


def _numeric_array(value: Any, where: str, what: str, allow_int: bool = True) -> np.ndarray:
    """`value` as an ndarray of real numbers (bool/object/str/complex refused)."""
    try:
        arr = np.asarray(value)
    except Exception as e:  # ragged lists etc.
        raise DataError(f"{where}: expected {what}, got an object that is not an array ({e})") from e
    kinds = "iuf" if allow_int else "f"
    if arr.dtype.kind not in kinds:
        raise DataError(f"{where}: expected {what} with a real numeric dtype, got dtype {arr.dtype}")
    return arr


def _check_finite(arr: np.ndarray, where: str) -> None:
    """Raise if `arr` holds NaN/Inf; works slice by slice so a huge stack needs no full-size mask."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    flat = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
    for i in range(flat.shape[0]):
        if not np.isfinite(flat[i]).all():
            raise DataError(f"{where}: contains NaN or Inf values (first at leading index {i})")


def _positive_scalar(d: dict, key: str, name: str) -> float:
    value = d[key]
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{name}: key '{key}': expected a positive number, got {value!r}")
    arr = _numeric_array(value, f"{name}: key '{key}'", "a positive number")
    if arr.size != 1:
        raise DataError(f"{name}: key '{key}': expected a single positive number, got shape {arr.shape}")
    x = float(arr.reshape(-1)[0])
    if not (math.isfinite(x) and x > 0):
        raise DataError(f"{name}: key '{key}': expected a positive finite number, got {x}")
    return x


def _vector(d: dict, key: str, name: str, n: int, kind: str) -> np.ndarray:
    """Validate a geometry vector. kind: 'count' (positive integers), 'size' (positive finite),
    'offset' (finite; missing or None mean zeros)."""
    where = f"{name}: key '{key}'"
    value = d.get(key)
    if kind == "offset" and value is None:
        return np.zeros(n)
    arr = _numeric_array(value, where, f"{n} numbers")
    if arr.shape != (n,):
        raise DataError(f"{where}: expected {n} values, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{where}: expected finite values, got {arr.tolist()}")
    if kind == "count" and not (np.all(arr > 0) and np.all(arr == np.round(arr))):
        raise DataError(f"{where}: expected {n} positive integers, got {arr.tolist()}")
    if kind == "size" and not np.all(arr > 0):
        raise DataError(f"{where}: expected {n} positive sizes (mm), got {arr.tolist()}")
    return arr


def _count(d: dict, key: str, name: str, stored: int, split: str) -> int:
    """numTrain / numVal: a non-negative integer (an integral float is accepted) not above `stored`."""
    value = d[key]
    where = f"{name}: key '{key}'"
    arr = np.asarray(value)
    if (isinstance(value, (bool, np.bool_)) or arr.shape != () or arr.dtype.kind not in "iuf"
            or not math.isfinite(float(arr)) or float(arr) != round(float(arr)) or float(arr) < 0):
        raise DataError(f"{where}: expected a non-negative integer, got {value!r}")
    n = int(arr)
    if n > stored:
        raise DataError(f"{where}: {n} exceeds the {stored} projections stored in '{split}.projections'")
    return n


def _parse_split(d: dict, split_key: str, label: str, name: str, n_detector: tuple[int, int],
                 count_key: str, need_time: bool) -> Split:
    """Validate one split dict and return its first `d[count_key]` entries. `label` is the split's name in
    messages ('train' or 'val'/'test' as stored)."""
    split = d[split_key]
    if not isinstance(split, dict):
        raise DataError(f"{name}: key '{label}': expected a dict, got {type(split).__name__}")
    for key in ("projections", "angles"):
        if key not in split:
            raise DataError(f"{name}: key '{label}.{key}' is missing")
    proj = _numeric_array(split["projections"], f"{name}: key '{label}.projections'", "[n, H, W] projections")
    if proj.ndim != 3 or tuple(proj.shape[1:]) != n_detector:
        raise DataError(f"{name}: key '{label}.projections': expected shape [n, {n_detector[0]}, {n_detector[1]}] "
                        f"(nDetector = [H, W]), got {list(proj.shape)}")
    n_stored = proj.shape[0]
    arrays = {"angles": _numeric_array(split["angles"], f"{name}: key '{label}.angles'", "[n] angles (rad)")}
    has_time = "time" in split and "phase" in split
    if need_time and not has_time:
        missing = [k for k in ("time", "phase") if k not in split]
        raise DataError(f"{name}: key '{label}.{missing[0]}' is missing "
                        "(required for a 4D case, i.e. when 'image' is [P, nx, ny, nz])")
    if has_time:
        arrays["time"] = _numeric_array(split["time"], f"{name}: key '{label}.time'", "[n] times")
        arrays["phase"] = _numeric_array(split["phase"], f"{name}: key '{label}.phase'", "[n] phase indices")
    for key, arr in arrays.items():
        if arr.shape != (n_stored,):
            raise DataError(f"{name}: key '{label}.{key}': expected shape [{n_stored}] (one per projection), "
                            f"got {list(arr.shape)}")
    _check_finite(proj, f"{name}: key '{label}.projections'")
    for key, arr in arrays.items():
        _check_finite(arr, f"{name}: key '{label}.{key}'")
    if has_time and not np.all(arrays["phase"] == np.round(arrays["phase"])):
        raise DataError(f"{name}: key '{label}.phase': expected integer phase indices")
    n = _count(d, count_key, name, n_stored, label)

    def take(arr, dtype):
        # Copy when truncating so the returned arrays do not pin the full stored stack in memory.
        return np.array(arr[:n], dtype=dtype) if n < arr.shape[0] else np.asarray(arr, dtype=dtype)

    return Split(
        projections=take(proj, np.float32),
        angles=take(arrays["angles"], np.float64),
        times=take(arrays["time"], np.float64) if has_time else None,
        phases=take(arrays["phase"], np.int64) if has_time else None,
    )


def case_from_dict(d: Any, name: str = "<dict>") -> Case:
    """Validate a NAF case dictionary (data_format.md §2) and build a `Case`.

    Args:
      d: the unpickled top-level object.
      name: file name used in error messages.

    Raises:
      DataError: naming `name`, the key and what was expected, for any inconsistency.
    """
    if not isinstance(d, dict):
        raise DataError(f"{name}: expected a dict at the top level of the pickle, got {type(d).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in d]
    if "val" not in d and "test" not in d:
        missing.append("val")
    if missing:
        raise DataError(f"{name}: required key(s) missing: {', '.join(repr(k) for k in missing)}"
                        + (" (or 'test' in place of 'val')" if "val" in missing else ""))
    val_key = "val" if "val" in d else "test"  # the reference falls back to 'test'

    mode = d.get("mode", "cone")
    if mode not in MODES:
        raise DataError(f"{name}: key 'mode': expected one of {MODES}, got {mode!r}")
    dsd = _positive_scalar(d, "DSD", name)
    dso = _positive_scalar(d, "DSO", name)
    if mode == "cone" and not dsd > dso:
        raise DataError(f"{name}: keys 'DSD', 'DSO': cone beam needs DSD > DSO, got DSD={dsd}, DSO={dso}")
    n_detector = tuple(int(v) for v in _vector(d, "nDetector", name, 2, "count"))
    n_voxel = tuple(int(v) for v in _vector(d, "nVoxel", name, 3, "count"))
    _vector(d, "dDetector", name, 2, "size")
    _vector(d, "dVoxel", name, 3, "size")
    _vector(d, "offOrigin", name, 3, "offset")
    _vector(d, "offDetector", name, 2, "offset")

    image = _numeric_array(d["image"], f"{name}: key 'image'", "a [nx, ny, nz] or [P, nx, ny, nz] volume")
    if not (image.ndim in (3, 4) and tuple(image.shape[-3:]) == n_voxel and image.size > 0):
        raise DataError(f"{name}: key 'image': expected shape {list(n_voxel)} or [P, {', '.join(map(str, n_voxel))}]"
                        f" (nVoxel = [nx, ny, nz]), got {list(image.shape)}")
    _check_finite(image, f"{name}: key 'image'")
    is_4d = image.ndim == 4

    train = _parse_split(d, "train", "train", name, n_detector, "numTrain", is_4d)
    val = _parse_split(d, val_key, val_key, name, n_detector, "numVal", is_4d)
    try:
        scanner = Scanner.from_naf(d)
    except (KeyError, ValueError) as e:  # anything the checks above did not anticipate
        raise DataError(f"{name}: invalid scanner geometry ({e})") from e
    meta = {k: v for k, v in d.items() if k not in _DATA_KEYS and not (k == "test" and val_key == "test")}
    return Case(scanner=scanner, train=train, val=val, volumes=np.asarray(image, dtype=np.float32), meta=meta)


def load_case(path: str | os.PathLike) -> Case:
    """Safely load and validate a NAF/X2GS case pickle, or an R2-Gaussian case folder (`x2gs_jax.data.r2`: a
    directory holding meta_data.json, read with the same checks).

    The pickle may only reference NumPy arrays/dtypes/scalars and inert builtin containers; anything else
    (e.g. `os.system`, `builtins.eval`) is refused before it can run. Returns a `Case` with projections
    float32 [n, H, W] (the first numTrain / numVal entries), angles float64 (rad), times float64, phases
    int64, volumes float32, `scanner = Scanner.from_naf(d)` and every other top-level key in `meta`.
    A file without 'val' uses its 'test' split, as the reference does.

    Raises:
      DataError: naming the file and the key, for unsafe, corrupt or inconsistent files.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        from x2gs_jax.data.r2 import load_r2_case

        return load_r2_case(name)
    return case_from_dict(safe_load_pickle(name), name)


def _geometry_mm(case: Case) -> dict:
    """Geometry keys (mm) to write: those of `case.meta` if they describe `case.scanner` exactly, else
    `case.scanner.to_naf()` (so a Case whose scanner was replaced never saves stale geometry)."""
    from_scanner = case.scanner.to_naf()
    merged = {k: case.meta.get(k, from_scanner[k]) for k in (*_GEOMETRY_KEYS, "mode")}
    try:
        consistent = Scanner.from_naf(merged) == case.scanner
    except (KeyError, ValueError, TypeError):
        consistent = False
    return merged if consistent else {k: from_scanner[k] for k in merged}


def case_to_dict(case: Case, name: str = "<case>") -> dict:
    """The pickle dictionary of a case (data_format.md §2, §8 item 5).

    Order: `case.meta` keys (verbatim, geometry replaced by the scanner's if they disagree), then missing
    geometry and generator defaults, then numTrain, numVal, train, val, image. numTrain/numVal are the split
    lengths; `time`/`phase` are written when the split has them.
    """
    reserved = [k for k in _DATA_KEYS if k in case.meta]
    if reserved:
        raise DataError(f"{name}: case.meta must not hold the data keys {reserved}; they are written from the "
                        "Case's splits and volumes")
    out = dict(case.meta)
    out.update(_geometry_mm(case))
    for key, value in _DEFAULTS.items():
        out.setdefault(key, value)

    def split_dict(split: Split) -> dict:
        s = {"projections": np.asarray(split.projections, dtype=np.float32),
             "angles": np.asarray(split.angles, dtype=np.float64)}
        if split.times is not None:
            s["time"] = np.asarray(split.times, dtype=np.float64)
        if split.phases is not None:
            s["phase"] = np.asarray(split.phases, dtype=np.int64)
        return s

    out["numTrain"] = len(case.train)
    out["numVal"] = len(case.val)
    out["train"] = split_dict(case.train)
    out["val"] = split_dict(case.val)
    out["image"] = np.asarray(case.volumes, dtype=np.float32)
    return out


def save_case(path: str | os.PathLike, case: Case) -> None:
    """Write `case` as a NAF pickle (protocol HIGHEST), atomically.

    The dictionary is `case_to_dict(case)`; it is validated with the loader's checks before anything is
    written, so a saved file always loads. On any failure the previous file at `path` is left untouched and
    no temporary file remains.

    Raises:
      DataError: if the case is inconsistent (message names the key).
    """
    name = os.fspath(path)
    d = case_to_dict(case, name)
    case_from_dict(d, name)  # refuse to write what `load_case` would reject
    with atomic_writer(name) as f:
        pickle.dump(d, f, protocol=pickle.HIGHEST_PROTOCOL)


def case_stem(path: str | os.PathLike) -> str:
    """The case name: file basename cut at the first dot (data_format.md §1), e.g. 'a/b.x.pickle' -> 'b'; a case
    folder's own name (R2-Gaussian layout, 'a/chest_cone/' -> 'chest_cone')."""
    if os.path.isdir(os.fspath(path)):
        stem = os.path.basename(os.path.normpath(os.path.abspath(os.fspath(path))))
        if not stem:
            raise DataError(f"{os.fspath(path)}: cannot derive a case name from this folder")
        return stem
    stem = os.path.basename(os.fspath(path)).split(".")[0]
    if not stem:
        raise DataError(f"{os.fspath(path)}: cannot derive a case name (empty text before the first dot)")
    return stem


def init_path(path: str | os.PathLike) -> str:
    """Path of the initial point cloud of a case: `<dir>/init_<stem>.npy` beside a pickle (data_format.md §1, §6),
    `<folder>/init_<folder name>.npy` inside an R2-Gaussian case folder (where R2-Gaussian looks for it)."""
    name = os.fspath(path)
    if os.path.isdir(name):
        return os.path.join(name, f"init_{case_stem(name)}.npy")
    return os.path.join(os.path.dirname(name), f"init_{case_stem(name)}.npy")
