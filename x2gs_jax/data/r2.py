"""R2-Gaussian case folders (static, 3D): reading them as a `Case`, writing one, and their content hash.

Layout (the reference R2-Gaussian's "Blender"-style cases, made by its data generators):

  <case>/meta_data.json       {"scanner": {...}, "vol": "vol_gt.npy", "bbox": [[x,y,z], [x,y,z]],
                               "proj_train": [{"file_path": "proj_train/proj_train_0000.npy", "angle": rad}, ...],
                               "proj_test":  [{"file_path": ..., "angle": ...}, ...]}
  <case>/vol_gt.npy           GT volume [nx, ny, nz] (its real-data generator names it under "ct" instead of "vol")
  <case>/proj_train/*.npy     one projection [H, W] each (row 0 = top), line integrals in the scanner's length unit
  <case>/proj_test/*.npy
  <case>/init_<case>.npy      the initial point cloud, if any (world units; as for a pickle, data_format.md §6)

Scanner keys: mode ("cone" | "parallel"), DSD, DSO, nDetector [H, W], sDetector (total size) and/or dDetector (pixel
pitch) [v, u], nVoxel [nx, ny, nz], sVoxel (box size) and/or dVoxel, offOrigin [3], offDetector [u, v], plus generator
fields kept verbatim (accuracy, filter, totalAngle, startAngle in degrees, noise, possion_noise, gaussian_noise).
A missing dDetector / dVoxel is sVoxel / nVoxel, as the reference reader derives it.

Units. R2-Gaussian's lengths are those of its TIGRE geometry, and its projections integrate in the same unit; its
own converter to the NAF pickle (`scripts/ours_to_naf_format.py`) reads them as metres (x 1000 -> mm) and keeps the
projections. We read them the same way, so both layouts of one case give the same `Scanner` (scene_scale =
2 / max(sVoxel)) and the same projections: the R2 synthetic cases (sVoxel 2) have scene_scale 1.

Only static cases fit this layout (its frames carry an angle, no time or phase).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from x2gs_jax.data.naf import Case, DataError, case_from_dict, _vector
from x2gs_jax.fileio import atomic_save_npy, atomic_write_bytes

META = "meta_data.json"
SPLITS = (("proj_train", "train"), ("proj_test", "val"))  # R2 split key -> Case split
# Generator fields copied between the layouts verbatim (R2 scanner config <-> pickle top level).
_EXTRAS = ("accuracy", "filter", "totalAngle", "startAngle", "noise", "possion_noise", "gaussian_noise",
           "randomAngle")
# Written to a new R2 scanner config when the case has no value of its own (R2's cone_beam.yml, noise off).
_EXTRA_DEFAULTS = {"accuracy": 0.5, "filter": None, "totalAngle": 360.0, "startAngle": 0.0, "noise": False}
_M_TO_MM = 1000.0


def is_r2_case(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a meta_data.json."""
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META))


# ========================================================================================= reading
def _load_npy(folder: str, rel: Any, where: str, meta_path: str) -> tuple[str, np.ndarray]:
    """(full path, array) of a .npy named by a relative path inside the case folder (no pickles)."""
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{meta_path}: key '{where}': expected a relative file path (string), got {rel!r}")
    full = os.path.normpath(os.path.join(folder, rel))
    inside = os.path.commonpath([os.path.abspath(full), os.path.abspath(folder)]) == os.path.abspath(folder)
    if os.path.isabs(rel) or not inside:
        raise DataError(f"{meta_path}: key '{where}': {rel!r} points outside the case folder (expected a path "
                        f"relative to {folder})")
    if not os.path.isfile(full):
        raise DataError(f"{meta_path}: key '{where}': the file {full} does not exist")
    try:
        arr = np.load(full, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # not .npy, truncated, or an object array
        raise DataError(f"{full} (named by {meta_path} key '{where}'): not a readable .npy array ({e})") from e
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iuf":
        raise DataError(f"{full} (named by {meta_path} key '{where}'): expected a real numeric array, got "
                        f"{getattr(arr, 'dtype', type(arr).__name__)}")
    return full, arr


def _positive(scanner: dict, key: str, where: str, n: int) -> np.ndarray:
    """A length vector [n] in R2 units (metres): finite (checked by `_vector`) and positive."""
    if scanner[key] is None:
        raise DataError(f"{where}: key '{key}': expected {n} positive lengths (metres), got None")
    arr = _vector(scanner, key, where, n, "offset")  # shape and finiteness
    if not np.all(arr > 0):
        raise DataError(f"{where}: key '{key}': expected {n} positive lengths (metres), got {arr.tolist()}")
    return arr


def _sizes(scanner: dict, n_key: str, s_key: str, d_key: str, n: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(counts [n], pitch [n] in R2 units) from nX and sX (total) / dX (pitch); both given must agree."""
    counts = _vector(scanner, n_key, where, n, "count")
    if s_key not in scanner and d_key not in scanner:
        raise DataError(f"{where}: key '{s_key}' or '{d_key}' is missing (the total size or the pitch)")
    pitch = _positive(scanner, d_key, where, n) if d_key in scanner else None
    total = _positive(scanner, s_key, where, n) if s_key in scanner else None
    if pitch is None:
        pitch = total / counts
    elif total is not None and not np.allclose(total, pitch * counts, rtol=1e-6, atol=0):
        raise DataError(f"{where}: keys '{s_key}' = {total.tolist()} and '{d_key}' = {pitch.tolist()} disagree: "
                        f"expected {s_key} = {n_key} x {d_key} = {(pitch * counts).tolist()}")
    return counts, pitch


def _angle(frame: dict, where: str, meta_path: str) -> float:
    value = frame.get("angle")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{meta_path}: key '{where}.angle': expected a finite number (radians), got {value!r}")
    return float(value)


def _split(folder: str, meta: dict, key: str, n_detector: tuple[int, int], meta_path: str
           ) -> tuple[np.ndarray, np.ndarray]:
    """(projections [n, H, W] float32, angles [n] float64) of one R2 split."""
    frames = meta[key]
    if not isinstance(frames, list):
        raise DataError(f"{meta_path}: key '{key}': expected a list of {{file_path, angle}} entries, got "
                        f"{type(frames).__name__}")
    projs, angles = [], []
    for i, frame in enumerate(frames):
        where = f"'{key}[{i}]'"
        if not isinstance(frame, dict):
            raise DataError(f"{meta_path}: key {where}: expected a dict with 'file_path' and 'angle', got "
                            f"{type(frame).__name__}")
        missing = [k for k in ("file_path", "angle") if k not in frame]
        if missing:
            raise DataError(f"{meta_path}: key {where}: {', '.join(repr(m) for m in missing)} missing")
        angles.append(_angle(frame, f"{key}[{i}]", meta_path))
        full, proj = _load_npy(folder, frame["file_path"], f"{key}[{i}].file_path", meta_path)
        if proj.shape != n_detector:
            raise DataError(f"{full} (named by {meta_path} key {where}): expected a projection of shape "
                            f"{list(n_detector)} (scanner.nDetector = [H, W]), got {list(proj.shape)}")
        if not np.all(np.isfinite(proj)):
            raise DataError(f"{full} (named by {meta_path} key {where}): contains NaN or Inf values")
        projs.append(proj.astype(np.float32))
    stack = np.stack(projs) if projs else np.zeros((0, *n_detector), np.float32)
    return stack, np.asarray(angles, np.float64)


def _read_meta(folder: str) -> tuple[str, dict]:
    meta_path = os.path.join(folder, META)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such case folder")
    if not os.path.isfile(meta_path):
        raise DataError(f"{folder}: not an R2-Gaussian case folder (no {META}; a NAF/X2GS case is a *.pickle file)")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: not readable JSON ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected a JSON object at the top level, got {type(meta).__name__}")
    missing = [k for k in ("scanner", "proj_train", "proj_test") if k not in meta]
    if missing:
        raise DataError(f"{meta_path}: required key(s) missing: {', '.join(repr(k) for k in missing)}")
    if not isinstance(meta["scanner"], dict):
        raise DataError(f"{meta_path}: key 'scanner': expected an object, got {type(meta['scanner']).__name__}")
    return meta_path, meta


def load_r2_case(folder: str | os.PathLike) -> Case:
    """Read and validate an R2-Gaussian case folder (module docstring) as a static `Case`.

    Returns a Case whose scanner, projections (float32 [n, H, W], unchanged values), angles (rad) and volume
    (float32 [nx, ny, nz]) equal those of the NAF pickle R2-Gaussian's converter makes of it; `meta` holds the
    geometry in mm and the generator fields, so `save_case` writes that pickle.

    Raises:
      DataError: naming the file (meta_data.json or the .npy) and the key, for missing files or keys, wrong
        shapes, non-finite values or inconsistent geometry.
    """
    folder = os.path.normpath(os.fspath(folder))
    meta_path, meta = _read_meta(folder)
    sc = meta["scanner"]
    where = f"{meta_path}: 'scanner'"
    missing = [k for k in ("DSD", "DSO", "nDetector", "nVoxel") if k not in sc]
    if missing:
        raise DataError(f"{where}: required key(s) missing: {', '.join(repr(k) for k in missing)}")
    n_det, d_det = _sizes(sc, "nDetector", "sDetector", "dDetector", 2, where)
    n_vox, d_vox = _sizes(sc, "nVoxel", "sVoxel", "dVoxel", 3, where)
    n_detector = tuple(int(v) for v in n_det)
    d: dict[str, Any] = {k: sc[k] for k in _EXTRAS if k in sc}
    d.update({
        "mode": sc.get("mode", "cone"),
        "DSD": sc["DSD"], "DSO": sc["DSO"],  # validated (and converted) by the pickle checks below
        "nDetector": n_det.astype(np.int64), "dDetector": d_det * _M_TO_MM,
        "nVoxel": n_vox.astype(np.int64), "dVoxel": d_vox * _M_TO_MM,
        "offOrigin": _vector(sc, "offOrigin", where, 3, "offset") * _M_TO_MM,
        "offDetector": _vector(sc, "offDetector", where, 2, "offset") * _M_TO_MM,
    })
    for key in ("DSD", "DSO"):
        value = sc[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise DataError(f"{where}: key '{key}': expected a positive number, got {value!r}")
        d[key] = float(value) * _M_TO_MM
    if d["mode"] == "cone" and not sc["DSD"] > sc["DSO"]:
        raise DataError(f"{where}: keys 'DSD', 'DSO': cone beam needs DSD > DSO, got DSD={sc['DSD']}, DSO={sc['DSO']}")

    vol_key = "vol" if "vol" in meta else "ct" if "ct" in meta else None
    if vol_key is None:
        raise DataError(f"{meta_path}: key 'vol' is missing (the GT volume file, e.g. \"vol_gt.npy\"; R2's real-data "
                        f"generator calls it 'ct')")
    full, vol = _load_npy(folder, meta[vol_key], vol_key, meta_path)
    if tuple(vol.shape) != tuple(int(v) for v in n_vox):
        raise DataError(f"{full} (named by {meta_path} key '{vol_key}'): expected a volume of shape "
                        f"{[int(v) for v in n_vox]} (scanner.nVoxel = [nx, ny, nz]), got {list(vol.shape)}")
    if not np.all(np.isfinite(vol)):
        raise DataError(f"{full} (named by {meta_path} key '{vol_key}'): contains NaN or Inf values")
    d["image"] = vol.astype(np.float32)
    if isinstance(meta["proj_train"], list) and not meta["proj_train"]:
        raise DataError(f"{meta_path}: key 'proj_train': no training projections (an empty list)")
    for r2_key, split in SPLITS:
        projs, angles = _split(folder, meta, r2_key, n_detector, meta_path)
        d[split] = {"projections": projs, "angles": angles}
        d["numTrain" if split == "train" else "numVal"] = len(angles)
    # The pickle checks (cone DSD > DSO, mode, ...) on the converted dict; their messages name meta_data.json.
    return case_from_dict(d, meta_path)


# ========================================================================================= hashing
def folder_sha256(folder: str | os.PathLike) -> str:
    """SHA-256 over meta_data.json and every file it names (volume, projections), in its order: what a case folder
    is made of (an init point cloud beside them is not part of it)."""
    folder = os.path.normpath(os.fspath(folder))
    meta_path, meta = _read_meta(folder)
    h = hashlib.sha256()
    files = [META] + [meta[k] for k in ("vol", "ct") if isinstance(meta.get(k), str)]
    files += [f.get("file_path") for key, _ in SPLITS for f in meta[key] if isinstance(f, dict)]
    for rel in files:
        h.update(str(rel).encode() + b"\0")
        path = os.path.join(folder, str(rel))
        if os.path.isfile(path):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()


# ========================================================================================= writing
def _json_value(v):
    """JSON-safe copy of a meta value (numpy arrays and scalars to Python)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def r2_meta(case: Case) -> dict:
    """The meta_data.json of `case` (lengths in the R2 unit: metres), with the file names `save_r2_case` writes."""
    sc = case.scanner.to_naf()  # mm
    m = lambda key: (np.asarray(sc[key], np.float64) / _M_TO_MM).tolist()  # noqa: E731
    scanner = {"mode": sc["mode"], "DSD": float(sc["DSD"]) / _M_TO_MM, "DSO": float(sc["DSO"]) / _M_TO_MM,
               "nDetector": [int(v) for v in sc["nDetector"]],
               "sDetector": (np.asarray(sc["nDetector"]) * np.asarray(sc["dDetector"]) / _M_TO_MM).tolist(),
               "dDetector": m("dDetector"),
               "nVoxel": [int(v) for v in sc["nVoxel"]],
               "sVoxel": (np.asarray(sc["nVoxel"]) * np.asarray(sc["dVoxel"]) / _M_TO_MM).tolist(),
               "dVoxel": m("dVoxel"), "offOrigin": m("offOrigin"), "offDetector": m("offDetector")}
    for key in _EXTRAS:
        if key in case.meta:
            scanner[key] = _json_value(case.meta[key])
        elif key in _EXTRA_DEFAULTS:
            scanner[key] = _EXTRA_DEFAULTS[key]
    centre, half = np.asarray(scanner["offOrigin"]), np.asarray(scanner["sVoxel"]) / 2
    meta = {"scanner": scanner, "vol": "vol_gt.npy", "bbox": [(centre - half).tolist(), (centre + half).tolist()]}
    for r2_key, split in SPLITS:
        angles = getattr(case, split).angles
        meta[r2_key] = [{"file_path": f"{r2_key}/{r2_key}_{i:04d}.npy", "angle": float(a)}
                        for i, a in enumerate(angles)]
    return meta


def save_r2_case(folder: str | os.PathLike, case: Case, overwrite: bool = False) -> None:
    """Write a static `case` as an R2-Gaussian case folder (module docstring).

    The folder is assembled under a temporary name beside `folder` and renamed into place at the end, so a failure
    leaves nothing half-written. An existing `folder` is refused unless `overwrite` is set and it is itself an R2
    case folder (holds meta_data.json), which is then replaced.

    Raises:
      DataError: a 4D case (the layout has no times or phases), or a `folder` that cannot be written as asked.
    """
    folder = os.path.normpath(os.fspath(folder))
    if case.is_4d:
        raise DataError(f"{folder}: the R2-Gaussian layout holds static (3D) cases only; this case is 4D "
                        f"({case.volumes.shape[0]} phase volumes, projection times and phases have no place in it)")
    if os.path.lexists(folder):
        if not overwrite:
            raise DataError(f"{folder}: already exists (pass --overwrite to replace an R2 case folder)")
        if not is_r2_case(folder):
            raise DataError(f"{folder}: exists and is not an R2 case folder (no {META}); not replaced")
    meta = r2_meta(case)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.", suffix=".tmp")
    try:
        atomic_save_npy(os.path.join(tmp, meta["vol"]), np.asarray(case.volumes, np.float32))
        for r2_key, split in SPLITS:
            os.makedirs(os.path.join(tmp, r2_key))
            for frame, proj in zip(meta[r2_key], getattr(case, split).projections):
                atomic_save_npy(os.path.join(tmp, frame["file_path"]), np.asarray(proj, np.float32))
        atomic_write_bytes(os.path.join(tmp, META), json.dumps(meta, indent=2).encode())
        old = None
        if os.path.lexists(folder):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.", suffix=".old")
            os.rename(folder, os.path.join(old, "case"))
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise


__all__ = ["META", "is_r2_case", "load_r2_case", "folder_sha256", "r2_meta", "save_r2_case"]
