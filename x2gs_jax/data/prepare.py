"""Preparing a case for training or evaluation: the case file (or the embedded phantom, generated once and cached)
and the initial point cloud beside it. Shared by the trainer and the evaluator."""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from x2gs_jax.data.naf import Case, init_path
from x2gs_jax.fileio import atomic_save_npy
from x2gs_jax.gaussians import load_init_points


def resolve_case_path(config: ml_collections.ConfigDict) -> str:
    """The case to train on: config.data.path, or the embedded phantom (generated once and cached)."""
    if config.data.path:
        if not os.path.exists(config.data.path):
            raise FileNotFoundError(f"config.data.path: no such file {config.data.path!r}")
        return config.data.path
    from x2gs_jax.data.generate import generate_case

    p = config.data.phantom
    cache = config.data.cache_dir or os.environ.get("X2GS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "x2gs_jax")
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


def initial_points(case_path: str, case: Case, config) -> np.ndarray:
    """init_<stem>.npy beside the pickle when present (X2GS ships them), else our FDK init writes it."""
    path = init_path(case_path)
    if not os.path.exists(path):
        from x2gs_jax.ct.init_pcd import init_points

        c = config.data.init
        pts = init_points(case, n_points=c.n_points, density_thresh=c.density_thresh,
                          density_rescale=c.density_rescale, method=c.method, seed=c.seed)
        atomic_save_npy(path, pts)
        print(f"wrote initial point cloud {path} ({len(pts)} points)")
    return load_init_points(path)
