"""Full-state checkpoints with orbax, for exact continuation.

A checkpoint stores the whole `TrainState` pytree plus a small JSON `meta` record (capacity of the
Gaussian buffers, rasterizer pair capacity, the config) that is needed to rebuild an abstract target
of the right shapes before restoring. Orbax writes each step into a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the last `keep` full-state checkpoints under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore_meta(self, step: Optional[int] = None) -> dict:
        step = self._resolve(step)
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, template_fn: Callable[[dict], Any], step: Optional[int] = None):
        """Restore (state, meta). `template_fn(meta)` builds a state of the right structure and shapes."""
        step = self._resolve(step)
        meta = self.restore_meta(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_fn(meta))
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"], meta

    def _resolve(self, step):
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        return step

    def close(self):
        self._manager.close()
