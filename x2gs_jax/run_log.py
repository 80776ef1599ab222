"""Run logging: metrics.jsonl + TensorBoard (tensorboardX) scalars and images, and the wall time per phase of a run.

Resuming. A run killed after its checkpoint at step s may have logged iterations past s; the resumed run logs them
again. So that each step is recorded once, a logger opened with `resume_step=s` first drops the records of
metrics.jsonl with step > s (rewritten atomically), and opens its TensorBoard writer with purge_step = s + 1: its
event file starts with a SessionLog.START at that step, on which TensorBoard's reader discards the earlier files'
events at steps >= s + 1.

Durability. metrics.jsonl is appended line by line. tensorboardX's SummaryWriter queues events for a background
thread (its flush() writes only what that thread has taken), so a killed process loses what is still queued; the
trainer calls `sync()` before each checkpoint, which closes the writer (draining the queue to disk) and lets the
next event open a new file. So everything up to a checkpoint's step is on disk before the checkpoint exists (one
event file per checkpoint interval).
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import numpy as np

from x2gs_jax.fileio import atomic_write_bytes

# Seconds between tensorboardX's background flushes (its default, 120 s, loses more of a killed run's tail; the
# records it loses are written again by the resumed run either way).
TB_FLUSH_SECS = 10


def truncate_metrics(path: str, last_step: int) -> int:
    """Keep the records of metrics.jsonl at `path` with step <= last_step (and drop a line cut short by a kill);
    returns the number of records dropped. Nothing is written when nothing is dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
                keep = int(rec["step"]) <= last_step
            except (ValueError, KeyError, TypeError):  # a partial last line of a killed run
                keep = False
            if keep:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
            else:
                dropped += 1
    if dropped:
        atomic_write_bytes(path, b"".join(kept))
    return dropped


class RunLogger:
    """metrics.jsonl and TensorBoard events in <workdir>/tb (scalars of every record, images at evaluations).

    resume_step: the step the run continues from (None for a fresh run); see the module docstring.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.dropped = truncate_metrics(self.path, int(resume_step)) if resume_step is not None else 0
        self._tb_dir = os.path.join(workdir, "tb") if tensorboard else None
        self._purge_step = None if resume_step is None else int(resume_step) + 1
        self._writer = None
        if tensorboard:
            self._tb()  # the event file (with the purge marker of a resume) exists from the start

    def _tb(self):
        """The open SummaryWriter (a new one, in a new event file, after `sync`); None without TensorBoard."""
        if self._tb_dir is None:
            return None
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # The suffix keeps two writers started in the same second from sharing (and truncating) one file; its
            # fixed-width nanosecond time keeps the files' name order = their time order (the reader's order).
            self._writer = SummaryWriter(self._tb_dir, flush_secs=TB_FLUSH_SECS, purge_step=self._purge_step,
                                         filename_suffix=f".{time.time_ns():020d}")
            self._purge_step = None  # the first file of this process carries it
        return self._writer

    def write(self, step: int, record: dict, prefix: str = "train"):
        rec = {"step": int(step), "kind": prefix}
        for k, v in record.items():
            if isinstance(v, (list, tuple)):
                rec[k] = [float(x) for x in v]
            else:
                rec[k] = float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        tb = self._tb()
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, float):
                    tb.add_scalar(f"{prefix}/{k}", v, int(step))

    def add_images(self, step: int, images: dict) -> None:
        """TensorBoard images {tag: [H, W] array in [0, 1]} at `step` (nothing without TensorBoard)."""
        tb = self._tb()
        if tb is None:
            return
        for tag, img in images.items():
            tb.add_image(tag, np.clip(np.asarray(img, np.float32), 0.0, 1.0), int(step), dataformats="HW")

    def sync(self) -> None:
        """Put every event logged so far on disk (module docstring, Durability); metrics.jsonl already is."""
        self.close()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ------------------------------------------------------------------------------------------ eval images
def _side_by_side(left: np.ndarray, right: np.ndarray, scale: float) -> np.ndarray:
    """[H, 2W + 2] of two equally shaped images on one grey scale (divided by `scale`), a white 2-pixel gap."""
    gap = np.ones((left.shape[0], 2), np.float32)
    return np.concatenate([left / scale, gap, right / scale], axis=1).astype(np.float32)


def eval_images(gt_volume: np.ndarray, pred_volume: np.ndarray, gt_proj: Optional[np.ndarray] = None,
                pred_proj: Optional[np.ndarray] = None) -> dict:
    """The pictures of an evaluation: GT | prediction of the middle axial and coronal slices (one grey scale: the
    GT's maximum) and, when given, of one projection (scaled by the GT projection's maximum).

    gt_volume, pred_volume: [nx, ny, nz]; gt_proj, pred_proj: [H, W]. Returns {tag: [h, w] float32 in [0, 1]};
    slices are shown as `viz.orthogonal_slices` shows them (superior / anterior up).
    """
    gt, pred = np.asarray(gt_volume, np.float32), np.asarray(pred_volume, np.float32)
    hi = max(float(gt.max()), 1e-6)
    cx, cy, cz = np.array(gt.shape) // 2
    out = {"eval/slice_axial_gt_pred": _side_by_side(gt[:, :, cz].T[::-1], pred[:, :, cz].T[::-1], hi),
           "eval/slice_coronal_gt_pred": _side_by_side(gt[:, cy, :].T[::-1], pred[:, cy, :].T[::-1], hi)}
    if gt_proj is not None and pred_proj is not None:
        top = max(float(np.max(gt_proj)), 1e-12)
        out["eval/projection_gt_pred"] = _side_by_side(np.asarray(gt_proj, np.float32),
                                                       np.asarray(pred_proj, np.float32), top)
    return {k: np.clip(v, 0.0, 1.0) for k, v in out.items()}


class NullLogger:
    """The logger of a process that writes no files (every process of a multi-process run but process 0)."""

    def write(self, step: int, record: dict, prefix: str = "train"):
        pass

    def add_images(self, step: int, images: dict) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self):
        pass


class PhaseTimer:
    """Wall seconds per phase of the loop (data_generation (once, cached), setup, trace_and_lower and xla_compile
    of each new step function, compile_wait, steps, host, pair_sizing, densify, eval, checkpoint, export; other =
    the rest): written to metrics.jsonl as one `timing` record, so a slow run says why."""

    def __init__(self):
        self.seconds = {}
        self._t0 = time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + float(seconds)

    def since(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.add(phase, now - t0)
        return now

    def report(self) -> dict:
        out = {f"{k}_s": v for k, v in self.seconds.items()}
        out["total_s"] = time.perf_counter() - self._t0
        # The rest, so the phases add up to the total (the loop's own host work between calls -- views, keys,
        # stage switches, logging, progress bar -- is `host`; the rasterizer's pair-buffer growth `pair_sizing`).
        out["other_s"] = out["total_s"] - sum(self.seconds.values())
        return out
