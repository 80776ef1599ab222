"""The training loop's inputs: which view each iteration trains on, the device-resident training data, the
iterations' random keys, and the size of the rasterizer's pair buffer (used by `train_lib`)."""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from x2gs_jax import parallel
from x2gs_jax.data.naf import Case
from x2gs_jax.render.rasterize_ref import count_pairs, pair_capacity
from x2gs_jax.train_state import TrainState


def view_index(iteration: int, stage_start: int, n_views: int, seed: int) -> int:
    """Epoch-wise sampling without replacement (the reference's popped stack), as a pure function of the
    iteration so that a resumed run draws exactly the same views: iteration i of a stage that started at
    `stage_start` uses permutation(epoch) at position (i - stage_start) mod n."""
    k = iteration - stage_start
    epoch, pos = divmod(k, n_views)
    return int(_epoch_permutation(seed, stage_start, epoch, n_views)[pos])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, stage_start: int, epoch: int, n_views: int) -> np.ndarray:
    """One epoch's view order, drawn once (a generator per iteration cost ~12 µs, 0.6 ms per call of 50 on the dev
    CPU)."""
    perm = np.random.default_rng([seed, stage_start, epoch]).permutation(n_views)
    perm.flags.writeable = False
    return perm


class TrainData:
    """Device-resident training data: scene-scaled projections, stacked cameras, times.

    With a `parallel.Parallel`, every local device of the mesh holds a copy (each gathers its own views of a step:
    `sharded_batch`); `images`, `cameras` and `times` are then the copy on the first one."""

    def __init__(self, case: Case, par: Optional[parallel.Parallel] = None):
        sc = case.scanner
        self.scanner = sc
        self.n_train = len(case.train)
        self.images = jnp.asarray(case.train.projections * sc.scene_scale, jnp.float32)
        # One compiled program (eagerly, each op of the camera construction compiled its own).
        self.cameras = jax.jit(jax.vmap(sc.camera))(jnp.asarray(case.train.angles, jnp.float32))
        times = case.train.times if case.train.times is not None else np.zeros(self.n_train)
        self.times = jnp.asarray(times, jnp.float32)
        self._par = par
        if par is not None:
            self._replicas = par.per_device({"image": self.images, "camera": self.cameras, "time": self.times})
            first = self._replicas[0]
            self.images, self.cameras, self.times = first["image"], first["camera"], first["time"]

    def batch(self, indices) -> dict:
        idx = jnp.asarray(indices, jnp.int32)
        return {"image": self.images[idx], "camera": jax.tree.map(lambda x: x[idx], self.cameras),
                "time": self.times[idx]}

    def sharded_batch(self, views) -> dict:
        """The batches of views [K, B] as arrays [K, B, ...] split over the mesh (needs `par`)."""
        return self._par.gather_views(self._replicas, views)


def grown_pair_capacity(state: TrainState, data: "TrainData", current: Optional[int], views: int = 16) -> int:
    """A power-of-two pair capacity with 2x headroom over the worst of a spread of training views."""
    idx = np.unique(np.linspace(0, data.n_train - 1, min(views, data.n_train)).astype(np.int32))
    needed = pair_capacity(2 * int(_most_pairs(state.gaussians(), data.cameras, idx)))
    return max(needed, 2 * current) if current else needed


@jax.jit
def _most_pairs(g, cameras, idx) -> jax.Array:
    """The largest pair count over the views `idx` [V] of the stacked `cameras` for the Gaussians g. One program:
    run eagerly, each of its ops compiled on its own at every new capacity (CPU, 50k / 200k Gaussians, 16 views:
    3.2 / 5.3 s eagerly against 0.8 / 1.8 s as one program, the first call)."""
    args = (g.get_xyz(), g.get_scale(), g.get_rotation(), g.get_density())
    return jnp.max(jax.vmap(lambda cam: count_pairs(*args, cam))(jax.tree.map(lambda x: x[idx], cameras)))


@jax.jit
def iteration_keys(key: jax.Array, its: jax.Array) -> jax.Array:
    """[K, 2] the keys of iterations `its` [K] (fold_in of the run's key): one program; eagerly vmapped it was
    traced again at every call (0.74 against 0.13 ms per call on the dev CPU)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(its)
