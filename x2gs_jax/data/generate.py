"""Generate a 4D (or 3D) breathing-thorax case pickle from the analytic phantom.

    python -m x2gs_jax.data.generate --out data/thorax.pickle [--size 128 --detector 256 --views 300
        --val-views 50 --noise 0 --i0 1e5 --irregular --period 3.0 --sparse N --static --seed 0 --no-preview]

Recipe (data_format.md §8): cone beam with the X2 example's DSD/DSO (1536/1000 mm), a cubic box of
`box_mm` (300 mm) with `size`^3 voxels, a square detector whose pixel pitch makes the magnified box fit
with a 5 % margin. Train view i of N is taken at s_i = scan_s i / N seconds at gantry angle
360 deg s_i / scan_s; val views at seeded uniform-random times (sorted) with the same rotation law.
`time` = s / scan_s, `phase` = floor(10 (s mod T) / T). GT `image` = the 10 volumes at the phase
mid-times (k + 1/2) T / 10 ((0.15 + 0.3 k) s for T = 3 s, where the reference evaluator queries them).
Projections are exact line integrals (metres). Optional TIGRE-style noise (data_format.md §7) on the
train split only. Randomness: numpy Generators seeded from `seed` — [seed, 0] val times, [seed, 1]
noise; the irregular breathing signal uses `seed` itself.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from x2gs_jax.data.breathing import BreathingSignal
from x2gs_jax.data.naf import Case, Split, save_case
from x2gs_jax.data.phantom import ThoraxPhantom
from x2gs_jax.geometry import Scanner

N_PHASES = 10
DSD_MM, DSO_MM = 1536.0, 1000.0
DETECTOR_MARGIN = 1.05


def geometry_mm(size: int, detector: int, box_mm: float = 300.0, dsd_mm: float = DSD_MM, dso_mm: float = DSO_MM) -> dict:
    """Scanner keys (mm) of a cone-beam scanner whose detector just holds the magnified box.

    The box (side box_mm, centred on the rotation axis) reaches radius R = box_mm / sqrt(2) from the
    axis; its widest fan ray is tangent to that circle, u = DSD tan(asin(R / DSO)), and its top corner
    nearest the source projects to v = (box_mm / 2) DSD / (DSO - R). The pixel pitch is
    2 max(u, v) * 1.05 / detector.
    """
    if size < 1 or detector < 1:
        raise ValueError(f"size and detector must be positive, got size={size}, detector={detector}")
    radius = box_mm / math.sqrt(2.0)
    if not dso_mm > radius:
        raise ValueError(f"DSO = {dso_mm} mm must exceed the box radius {radius:.1f} mm")
    u_half = dsd_mm * math.tan(math.asin(radius / dso_mm))
    v_half = 0.5 * box_mm * dsd_mm / (dso_mm - radius)
    pitch = 2.0 * max(u_half, v_half) * DETECTOR_MARGIN / detector
    return {
        "DSD": float(dsd_mm),
        "DSO": float(dso_mm),
        "nDetector": [int(detector), int(detector)],
        "dDetector": [pitch, pitch],
        "nVoxel": [int(size)] * 3,
        "dVoxel": [box_mm / size] * 3,
        "offOrigin": [0.0, 0.0, 0.0],
        "offDetector": [0.0, 0.0],
        "mode": "cone",
    }


def add_tigre_noise(projections: np.ndarray, i0: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """TIGRE `CTnoise.add` (data_format.md §7) with the NaN guard: float32 [n, H, W] -> same shape.

    p_max = max over the whole stack; counts N = i0 exp(-p / p_max); N <- Poisson(N) + Normal(0, sigma);
    N clamped to >= 1 before the log; p = -ln(N / i0) p_max, then clamped to >= 0.
    """
    if not i0 > 0:
        raise ValueError(f"i0 must be positive, got {i0}")
    p = np.asarray(projections, dtype=np.float64)
    p_max = float(p.max()) if p.size else 0.0
    if p_max <= 0:  # nothing attenuates: the normalisation is undefined and the data stays clean
        return np.asarray(projections, dtype=np.float32).copy()
    counts = i0 * np.exp(-p / p_max)
    counts = rng.poisson(counts).astype(np.float64) + rng.normal(0.0, sigma, size=p.shape)
    counts = np.maximum(counts, 1.0)
    return np.maximum(-np.log(counts / i0) * p_max, 0.0).astype(np.float32)


def _rotation_angles(times_s: np.ndarray, scan_s: float, total_deg: float, start_deg: float) -> np.ndarray:
    return np.deg2rad(start_deg + total_deg * times_s / scan_s)


def _save_preview(path: str, case: Case, phantom_static: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vols = case.volumes[None] if phantom_static else case.volumes
    shown = [0] if phantom_static else [0, N_PHASES // 2]
    nx, ny, nz = vols.shape[1:]
    views = np.linspace(0, len(case.train) - 1, 4).round().astype(int)
    ncols = max(4, 2 * len(shown))
    fig, axes = plt.subplots(2, ncols, figsize=(3.2 * ncols, 6.8))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes[0], views):
        ax.imshow(case.train.projections[i], cmap="gray")
        label = f"train {i}: {math.degrees(case.train.angles[i]) % 360:.0f} deg"
        if case.train.times is not None:
            label += f", t={case.train.times[i] * 60:.2f}s, phase {case.train.phases[i]}"
        ax.set_title(label, fontsize=8)
    for j, k in enumerate(shown):
        name = "volume" if phantom_static else f"phase {k}"
        # Axial slice through the lower lobes (tumour level); coronal slice through the lung centres.
        axes[1, 2 * j].imshow(vols[k][:, :, int(0.44 * nz)].T, cmap="gray", vmin=0, vmax=1, origin="lower")
        axes[1, 2 * j].set_title(f"{name}: axial (x right, y up)", fontsize=8)
        axes[1, 2 * j + 1].imshow(vols[k][:, ny // 2, :].T, cmap="gray", vmin=0, vmax=1, origin="lower")
        axes[1, 2 * j + 1].set_title(f"{name}: coronal (x right, z up)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def preview_path(out_path: str) -> str:
    """`<dir>/<stem>_preview.png` beside the pickle (stem = name before the first dot)."""
    name = os.path.basename(os.fspath(out_path)).split(".")[0]
    return os.path.join(os.path.dirname(os.fspath(out_path)), f"{name}_preview.png")


def generate_case(
    out_path: Optional[str],
    size: int = 128,
    detector: int = 256,
    views: int = 300,
    val_views: int = 50,
    noise: float = 0.0,
    i0: float = 1e5,
    irregular: bool = False,
    period: float = 3.0,
    sparse: Optional[int] = None,
    static: bool = False,
    seed: int = 0,
    preview: bool = True,
    box_mm: float = 300.0,
    scan_s: float = 60.0,
    supersample: int = 3,
    progress: bool = True,
) -> Case:
    """Build (and, when out_path is given, save) a phantom case; see the module docstring.

    Args:
      out_path: pickle path (None: do not write anything).
      size: voxels per box side. detector: pixels per detector side. box_mm: box side in mm.
      views: train views over the scan; sparse: keep only this many of them, evenly spread.
      val_views: val views (noise-free). noise: Gaussian sigma of the TIGRE noise (0: clean).
      i0: incident photon count of the noise model. irregular: irregular breathing. period: T in s.
      static: a 3D case (no motion, image [nx, ny, nz], no time/phase keys).
      seed: drives val times, noise and irregular breathing. preview: write `<stem>_preview.png`.
      scan_s: scan length (s). supersample: GT voxelisation sub-points per axis.

    Returns the `Case` that was written.
    """
    if views < 1 or val_views < 1:
        raise ValueError(f"views and val_views must be >= 1, got {views}, {val_views}")
    if sparse is not None and not 1 <= sparse <= views:
        raise ValueError(f"sparse must be in [1, views={views}], got {sparse}")
    if noise < 0:
        raise ValueError(f"noise (Gaussian sigma) must be >= 0, got {noise}")
    kind = "static" if static else ("irregular" if irregular else "regular")
    breathing = BreathingSignal(period_s=period, kind=kind, seed=seed, scan_s=scan_s)
    phantom = ThoraxPhantom.default(breathing)
    geo = geometry_mm(size, detector, box_mm)
    scanner = Scanner.from_naf(geo)
    total_deg, start_deg = 360.0, 0.0

    idx = np.arange(views) if sparse is None else (np.arange(sparse) * views) // sparse
    train_s = scan_s * idx / views
    val_s = np.sort(np.random.default_rng([seed, 0]).uniform(0.0, scan_s, size=val_views))
    train_angles = _rotation_angles(train_s, scan_s, total_deg, start_deg)
    val_angles = _rotation_angles(val_s, scan_s, total_deg, start_deg)

    train_proj = phantom.project(scanner, train_angles, train_s / scan_s, progress=progress)
    val_proj = phantom.project(scanner, val_angles, val_s / scan_s, progress=progress)
    if noise > 0:
        train_proj = add_tigre_noise(train_proj, i0, noise, np.random.default_rng([seed, 1]))

    if static:
        volumes = phantom.volume_at(0.0, scanner, supersample=supersample)
        train = Split(train_proj, train_angles)
        val = Split(val_proj, val_angles)
    else:
        mids = breathing.phase_mid_times_s(N_PHASES) / scan_s
        volumes = np.stack([phantom.volume_at(t, scanner, supersample=supersample)
                            for t in tqdm(mids, desc="GT phase volumes", disable=not progress)])
        train = Split(train_proj, train_angles, train_s / scan_s, breathing.phase_bin(train_s, N_PHASES))
        val = Split(val_proj, val_angles, val_s / scan_s, breathing.phase_bin(val_s, N_PHASES))

    meta = dict(geo)
    meta.update({
        "accuracy": 0.5, "filter": None, "totalAngle": total_deg, "startAngle": start_deg,
        "randomAngle": False, "convert": False, "rescale_slope": 1.0, "rescale_intercept": 0.0,
        "normalize": True, "noise": float(noise),
        "generator": {
            "name": "x2gs_jax.data.generate/ThoraxPhantom", "seed": int(seed), "i0": float(i0),
            "breathing_kind": kind, "period_s": float(period), "scan_s": float(scan_s),
            "period_jitter": breathing.period_jitter if irregular else 0.0,
            "amplitude_jitter": breathing.amplitude_jitter if irregular else 0.0,
            "views": int(views), "sparse": None if sparse is None else int(sparse), "box_mm": float(box_mm),
            "supersample": int(supersample),
        },
    })
    case = Case(scanner=scanner, train=train, val=val, volumes=volumes.astype(np.float32), meta=meta)
    if out_path is not None:
        out_dir = os.path.dirname(os.fspath(out_path))
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        save_case(out_path, case)
        if preview:
            _save_preview(preview_path(out_path), case, static)
    return case


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m x2gs_jax.data.generate",
        description="Generate a breathing-thorax phantom case (NAF/X2GS pickle) with exact projections.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output pickle path, e.g. data/thorax.pickle (no dots in the name stem)")
    p.add_argument("--size", type=int, default=128, help="voxels per side of the cubic reconstruction box")
    p.add_argument("--detector", type=int, default=256, help="detector pixels per side (square detector)")
    p.add_argument("--views", type=int, default=300, help="train views, taken at s_i = 60 i / views over the scan")
    p.add_argument("--val-views", type=int, default=50, help="val views at seeded random times (noise-free)")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian sigma of TIGRE-style noise on train (0 = clean)")
    p.add_argument("--i0", type=float, default=1e5, help="incident photon count of the Poisson noise")
    p.add_argument("--irregular", action="store_true", help="irregular breathing (seeded per-cycle period/amplitude)")
    p.add_argument("--period", type=float, default=3.0, help="nominal breathing period in seconds")
    p.add_argument("--sparse", type=int, default=None, metavar="N", help="keep only N train views, evenly spread over the scan")
    p.add_argument("--static", action="store_true", help="3D case: no breathing, image [nx,ny,nz], no time/phase keys")
    p.add_argument("--seed", type=int, default=0, help="seed of val times, noise and irregular breathing")
    p.add_argument("--box-mm", type=float, default=300.0, help="side of the reconstruction box in mm")
    p.add_argument("--no-preview", action="store_true", help="do not write <stem>_preview.png beside the pickle")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    case = generate_case(
        args.out, size=args.size, detector=args.detector, views=args.views, val_views=args.val_views,
        noise=args.noise, i0=args.i0, irregular=args.irregular, period=args.period, sparse=args.sparse,
        static=args.static, seed=args.seed, preview=not args.no_preview, box_mm=args.box_mm,
    )
    print(f"wrote {args.out}: {len(case.train)} train / {len(case.val)} val views, image {list(case.volumes.shape)}, "
          f"{time.time() - start:.1f} s")
    if not args.no_preview:
        print(f"preview: {preview_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
