"""Preparing a case for training or evaluation: the case file (or the embedded phantom, generated once and cached)
and the initial point cloud beside it, with a record of what it was made from. Shared by the trainer and the
evaluator."""
from __future__ import annotations

import hashlib
import json
import os

import ml_collections
import numpy as np

from x2gs_jax.data.naf import Case, DataError, init_path
from x2gs_jax.fileio import atomic_save_npy, atomic_write_bytes
from x2gs_jax.gaussians import load_init_points


def resolve_case_path(config: ml_collections.ConfigDict) -> str:
    """The case to train on: config.data.path (a case pickle or an R2-Gaussian case folder), or the embedded phantom
    (generated once and cached)."""
    if config.data.path:
        from x2gs_jax.data.r2 import META, is_r2_case

        path = config.data.path
        if os.path.isdir(path) and not is_r2_case(path):
            raise DataError(f"config.data.path={path!r}: a folder without {META} (expected a NAF/X2GS case pickle or "
                            f"an R2-Gaussian case folder; empty = the embedded phantom)")
        if not os.path.exists(path):
            raise DataError(f"config.data.path={path!r}: no such file or folder (a NAF/X2GS case pickle or an "
                            f"R2-Gaussian case folder; empty = the embedded phantom)")
        return path
    from x2gs_jax.data.generate import generate_case

    p = config.data.phantom
    from x2gs_jax.compile_cache import user_cache_root

    cache = config.data.cache_dir or user_cache_root()
    name = f"phantom_{p.breathing}_s{p.size}_d{p.detector}_v{p.views}_val{p.val_views}_n{p.noise:g}_T{p.period_s:g}_seed{p.seed}"
    if p.box_mm != 300.0:
        name += f"_box{p.box_mm:g}"
    path = os.path.join(cache, name.replace(".", "p") + ".pickle")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        print(f"generating the embedded phantom case once: {path}")
        generate_case(path, size=p.size, detector=p.detector, views=p.views, val_views=p.val_views,
                      noise=p.noise, period=p.period_s, static=(p.breathing == "static"),
                      irregular=(p.breathing == "irregular"), seed=p.seed, preview=False, box_mm=p.box_mm)
    return path


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def init_record_path(case_path: str) -> str:
    """`init_<stem>.json` beside `init_<stem>.npy`: what the trainer made the point cloud from."""
    return os.path.splitext(init_path(case_path))[0] + ".json"


def case_sha256(case_path: str) -> str:
    """The content hash of a case: its pickle file, or an R2-Gaussian folder's meta_data.json and the files it names."""
    if os.path.isdir(case_path):
        from x2gs_jax.data.r2 import folder_sha256

        return folder_sha256(case_path)
    return file_sha256(case_path)


def init_record(case_path: str, config) -> dict:
    """The inputs of the initial point cloud: the case's content and the config's data.init settings."""
    return {"case_file": os.path.basename(os.path.normpath(case_path)), "case_sha256": case_sha256(case_path),
            "init": config.data.init.to_dict()}


def _stale_reason(record_path: str, points_path: str, want: dict) -> str | None:
    """Why the recorded point cloud does not fit `want` (None: it does)."""
    try:
        with open(record_path) as f:
            have = json.load(f)
    except (OSError, ValueError) as err:
        return f"its record {record_path} is unreadable ({err})"
    if have.get("points_sha256") != file_sha256(points_path):
        return "the point cloud file changed since it was made"
    if have.get("case_sha256") != want["case_sha256"]:
        return f"the case file {want['case_file']} changed since"
    if have.get("init") != want["init"]:
        changed = sorted(k for k in set(want["init"]) | set(have.get("init") or {})
                         if (have.get("init") or {}).get(k) != want["init"].get(k))
        return "data.init." + ", data.init.".join(changed) + " changed since"
    return None


def initial_points(case_path: str, case: Case, config) -> np.ndarray:
    """The initial points of a case: `init_<stem>.npy` beside the pickle.

    A file the trainer made is reused only while its record (`init_<stem>.json`: case file hash, data.init
    settings, the points file's own hash) matches the case and the config, and is made again otherwise, saying
    why. A file without a record (shipped with the case, as X2GS does, or written by `python -m
    x2gs_jax.ct.init_pcd`) is the user's: it is used as it is, and said so."""
    path, record_path = init_path(case_path), init_record_path(case_path)
    if os.path.exists(path) and not os.path.exists(record_path):
        print(f"using the initial point cloud {path} as given (no record of what it was made from: data.init "
              f"settings do not apply; delete it to have it made from them)")
        return load_init_points(path)
    want = init_record(case_path, config)
    if os.path.exists(path):
        reason = _stale_reason(record_path, path, want)
        if reason is None:
            return load_init_points(path)
        print(f"making the initial point cloud {path} again: {reason}")
        os.remove(record_path)  # a crash below must not leave the old record beside new points
    from x2gs_jax.ct.init_pcd import init_points

    c = config.data.init
    pts = init_points(case, n_points=c.n_points, density_thresh=c.density_thresh,
                      density_rescale=c.density_rescale, method=c.method, seed=c.seed)
    atomic_save_npy(path, pts)
    want["points_sha256"] = file_sha256(path)
    atomic_write_bytes(record_path, json.dumps(want, indent=2).encode())
    print(f"wrote initial point cloud {path} ({len(pts)} points) and its record {record_path}")
    return load_init_points(path)
