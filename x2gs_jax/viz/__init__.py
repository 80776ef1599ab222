"""Evaluation pictures (matplotlib, Agg backend: no display needed).

Volumes are indexed [x, y, z] with z the rotation (superior) axis. Views used everywhere:
  axial    = vol[:, :, z0] shown with x horizontal, y vertical (anterior up)
  coronal  = vol[:, y0, :] shown with x horizontal, z vertical (superior up)
  sagittal = vol[x0, :, :] shown with y horizontal, z vertical
Grey levels share one range per figure so predicted and GT slices are comparable.
"""
from __future__ import annotations

import os
import textwrap
import warnings
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: eval runs on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from x2gs_jax.viz import movie  # noqa: E402

VIEWS = ("axial", "coronal", "sagittal")


def orthogonal_slices(vol: np.ndarray, centre: Optional[Sequence[int]] = None) -> dict:
    """{view: 2D array ready for imshow(origin="lower")} through `centre` (default the middle voxel)."""
    v = np.asarray(vol)
    if v.ndim != 3:
        raise ValueError(f"orthogonal_slices: expected a [nx, ny, nz] volume, got shape {v.shape}")
    cx, cy, cz = (np.array(v.shape) // 2) if centre is None else centre
    return {"axial": v[:, :, cz].T, "coronal": v[:, cy, :].T, "sagittal": v[cx, :, :].T}


def save_phase_slices(path: str, gt: np.ndarray, pred: np.ndarray, title: str = "") -> None:
    """One PNG: rows pred / GT / |pred - GT|, columns axial / coronal / sagittal. gt, pred [nx, ny, nz]."""
    gt, pred = np.asarray(gt, np.float32), np.asarray(pred, np.float32)
    if gt.shape != pred.shape:
        raise ValueError(f"save_phase_slices: GT {gt.shape} and prediction {pred.shape} differ in shape")
    hi = float(max(gt.max(), 1e-6))
    err = np.abs(pred - gt)
    rows = (("pred", orthogonal_slices(pred), "gray", (0, hi)), ("GT", orthogonal_slices(gt), "gray", (0, hi)),
            ("|error|", orthogonal_slices(err), "inferno", (0, max(float(err.max()), 1e-6))))
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    for r, (name, sl, cmap, (lo, top)) in enumerate(rows):
        for c, view in enumerate(VIEWS):
            ax = axes[r, c]
            im = ax.imshow(sl[view], cmap=cmap, vmin=lo, vmax=top, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view)
            if c == 0:
                ax.set_ylabel(name)
        fig.colorbar(im, ax=axes[r, :].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def breathing_frames(volumes: np.ndarray, times_s: Sequence[float]) -> np.ndarray:
    """RGB frames uint8 [F, H, W, 3] of volumes [F, nx, ny, nz] (one breathing cycle): coronal + axial side by side
    on one grey scale (0 to the maximum over all frames), the time in the title."""
    vols = np.asarray(volumes, np.float32)
    if vols.ndim != 4 or vols.shape[0] < 1:
        raise ValueError(f"breathing_frames: expected [frames, nx, ny, nz], got shape {vols.shape}")
    if len(times_s) != vols.shape[0]:
        raise ValueError(f"breathing_frames: {vols.shape[0]} volumes but {len(times_s)} times")
    hi = float(max(vols.max(), 1e-6))
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4), dpi=80)
    first = orthogonal_slices(vols[0])
    ims = [axes[i].imshow(first[v], cmap="gray", vmin=0, vmax=hi, origin="lower") for i, v in enumerate(("coronal", "axial"))]
    for ax, v in zip(axes, ("coronal", "axial")):
        ax.set_title(v)
        ax.set_xticks([])
        ax.set_yticks([])
    label = fig.suptitle("")
    frames = []
    for i in range(vols.shape[0]):
        sl = orthogonal_slices(vols[i])
        ims[0].set_data(sl["coronal"])
        ims[1].set_data(sl["axial"])
        label.set_text(f"t = {float(times_s[i]):.2f} s")
        fig.canvas.draw()
        frames.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return np.stack(frames)


def save_breathing_gif(path: str, volumes: np.ndarray, times_s: Sequence[float], fps: int = 8) -> None:
    """Animated GIF of `breathing_frames`."""
    movie.write_gif(path, breathing_frames(volumes, times_s), fps)


def save_breathing_movies(stem: str, volumes: np.ndarray, times_s: Sequence[float], fps: int = 8) -> list[str]:
    """`<stem>.gif` and `<stem>.mp4` (H.264) of the same `breathing_frames`; returns the paths written.

    The MP4 needs imageio-ffmpeg (in requirements.txt); where it is missing or its ffmpeg cannot run, the GIF is
    still written and a warning says why the MP4 is not (a movie is not worth losing an evaluation over).
    """
    frames = breathing_frames(volumes, times_s)
    movie.write_gif(stem + ".gif", frames, fps)
    try:
        movie.write_mp4(stem + ".mp4", frames, fps)
    except movie.MovieUnavailable as err:
        warnings.warn(f"{stem}.mp4 not written ({err}); {stem}.gif was", RuntimeWarning, stacklevel=2)
        return [stem + ".gif"]
    return [stem + ".gif", stem + ".mp4"]


def save_projection_comparison(path: str, gt: np.ndarray, pred: np.ndarray, labels: Sequence[str] = ()) -> None:
    """Rows = views; columns GT / rendering / |difference| (each normalised by its own max, as the 2D metrics)."""
    gt, pred = np.asarray(gt, np.float32), np.asarray(pred, np.float32)
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"save_projection_comparison: expected matching [n, H, W], got {gt.shape} and {pred.shape}")
    n = gt.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for i in range(n):
        g = gt[i] / max(float(gt[i].max()), 1e-12)
        p = pred[i] / max(float(pred[i].max()), 1e-12)
        for c, (img, cmap, name) in enumerate(((g, "gray", "GT"), (p, "gray", "rendered"), (np.abs(p - g), "inferno", "|diff|"))):
            ax = axes[i, c]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=1 if c < 2 else max(float(np.abs(p - g).max()), 1e-6))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
            if c == 0 and i < len(labels):
                ax.set_ylabel(labels[i])
    _save(fig, path)


def save_tidal_plot(path: str, t_s: np.ndarray, volume_ml: np.ndarray, gt_ml: Optional[np.ndarray] = None,
                    title: str = "", label: str = "reconstruction", gt_label: str = "phantom (exact)") -> None:
    """Lung volume (mL) vs time (s), with the phantom's exact curve when given. The title carries the curve's
    summary (tidal.curve_title: dominant period, swing per cycle, mean, threshold); long titles wrap."""
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(t_s, volume_ml, lw=1.2, label=label)
    if gt_ml is not None:
        ax.plot(t_s, gt_ml, lw=1.0, ls="--", color="k", label=gt_label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("lung + airway volume (mL)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if title:
        ax.set_title("\n".join(textwrap.fill(line, 110) for line in title.split("\n")), fontsize=9)
    _save(fig, path)


def _ensure_dir(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def _save(fig, path: str) -> None:
    _ensure_dir(path)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


__all__ = ["orthogonal_slices", "save_phase_slices", "breathing_frames", "save_breathing_gif", "save_breathing_movies",
           "save_projection_comparison",
           "save_tidal_plot"]
