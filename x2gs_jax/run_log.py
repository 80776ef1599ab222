"""Run logging: metrics.jsonl + TensorBoard scalars, and the wall time per phase of a run."""
from __future__ import annotations

import json
import os
import time

import numpy as np


class RunLogger:
    """metrics.jsonl and TensorBoard scalar events in <workdir>/tb (our own writer: no extra dependency)."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        from x2gs_jax.tb_events import EventWriter

        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = EventWriter(os.path.join(workdir, "tb")) if tensorboard else None

    def write(self, step: int, record: dict, prefix: str = "train"):
        rec = {"step": int(step), "kind": prefix}
        for k, v in record.items():
            if isinstance(v, (list, tuple)):
                rec[k] = [float(x) for x in v]
            else:
                rec[k] = float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self):
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    """The logger of a process that writes no files (every process of a multi-process run but process 0)."""

    def write(self, step: int, record: dict, prefix: str = "train"):
        pass

    def close(self):
        pass


class PhaseTimer:
    """Wall seconds per phase of the loop (data_generation (once, cached), setup, trace_and_lower and xla_compile of each new step function,
    steps, densify, eval, checkpoint, export): written to metrics.jsonl as one `timing` record, so a slow run
    says why."""

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
        return out
