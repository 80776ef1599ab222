"""Data-parallel training over a device mesh, and multi-process (multi-host) launch through `jax.distributed`.

The training state is replicated on every device of a one-axis `Mesh` (axis `AXIS`); each jitted call of the
training loop runs `train_step.make_multi_step` per device under `shard_map`, each device taking its contiguous
share of the global batch of views (`P(None, AXIS)` on the [K, B, ...] batch). Inside, the step reduces explicitly
(psum / pmax over `AXIS`), so every device ends the call with bit-identical state (`train_step.py` says what is
reduced how). `shard_map` runs with the replication checks off (`check_vma=False`): with them on, `jax.grad` of a
replicated input inside the map would already be summed over the devices (the step could not write the reduction
the same way with and without a mesh), and the jax-triton launch primitive has no replication rule.

Between calls (densify/prune, capacity growth, evaluation, pair-buffer sizing) the loop works on `local(state)`,
this process's copy on its first mesh device, and `replicate` puts the result back on every device. With several
processes, every process runs the same loop on the same data (each feeds its own devices); `is_writer` (process 0)
alone writes logs, configs, volumes and the non-orbax export files, while orbax saves are made by every process
together (orbax requires it: only the replica on process 0's device is written).

Shapes: K = iterations per call, B = global views per step (config.train.views_per_step), N = mesh devices,
V = B / N views per device.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from x2gs_jax.models import ConfigError

AXIS = "views"  # the mesh axis the views of a step are split over

try:  # jax >= 0.7: public, replication checks named check_vma
    from jax import shard_map as _jax_shard_map

    def _shard_map(f, mesh, in_specs, out_specs):
        return _jax_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
except ImportError:  # pragma: no cover - older jax: the experimental API (check_rep)
    from jax.experimental.shard_map import shard_map as _exp_shard_map

    def _shard_map(f, mesh, in_specs, out_specs):
        return _exp_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name, "")
    return int(v) if v.strip() else None


def initialize_distributed(p) -> None:
    """`jax.distributed.initialize` from config.parallel (`p`), falling back to the environment and then to JAX's
    cluster auto-detection (Slurm, Open MPI, ...): coordinator_address or $JAX_COORDINATOR_ADDRESS,
    num_processes (> 0) or $JAX_NUM_PROCESSES, process_id (>= 0) or $JAX_PROCESS_ID. Must run before any JAX
    computation; a second call in the same process does nothing."""
    if jax.distributed.is_initialized():
        return
    try:  # cross-process collectives of the CPU backend (the default in recent jax; other backends ignore it)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # pragma: no cover - a jax without the option
        pass
    address = str(p.coordinator_address) or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    n = int(p.num_processes) if int(p.num_processes) > 0 else _env_int("JAX_NUM_PROCESSES")
    pid = int(p.process_id) if int(p.process_id) >= 0 else _env_int("JAX_PROCESS_ID")
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)


@dataclasses.dataclass(frozen=True)
class Parallel:
    """The training mesh (one axis `AXIS`, ordered by process, then local device) and how arrays are placed on it."""

    mesh: Mesh

    @property
    def n_devices(self) -> int:
        return int(self.mesh.devices.size)

    @property
    def devices(self) -> list:
        return list(self.mesh.devices.flat)

    @property
    def local_devices(self) -> list:
        """This process's mesh devices, in mesh order (the first one holds `local` copies)."""
        me = jax.process_index()
        return [d for d in self.devices if d.process_index == me]

    @property
    def is_writer(self) -> bool:
        """Process 0 writes the run's files (logs, config, volumes, export files)."""
        return jax.process_index() == 0

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def views_sharding(self) -> NamedSharding:
        """[K, B, ...] batches: the view axis (1) split over the devices, V = B / N contiguous views each."""
        return NamedSharding(self.mesh, P(None, AXIS))

    # -------------------------------------------------------------------------------- placement
    def replicate(self, tree: Any) -> Any:
        """Every leaf as one array replicated on all mesh devices (leaves already placed so are kept as they are).
        A leaf may be a host array, a single-device array, or a fully replicated multi-device array; in multi-process
        runs each process passes its own (equal) value and places it on its own devices."""
        target = self.replicated
        local = self.local_devices

        def place(x):
            if isinstance(x, jax.Array) and x.sharding == target:
                return x
            if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
                x = _shard_on(x, local[0])
            shards = [jax.device_put(x, d) for d in local]
            return jax.make_array_from_single_device_arrays(tuple(np.shape(x)), target, shards)

        return jax.tree.map(place, tree)

    def local(self, tree: Any) -> Any:
        """This process's copy of a replicated tree, on its first mesh device (no copy: the shard's own buffer).
        Single-device leaves are returned as they are."""
        dev = self.local_devices[0]
        return jax.tree.map(lambda x: _shard_on(x, dev) if isinstance(x, jax.Array) and
                            len(x.sharding.device_set) > 1 else x, tree)

    def per_device(self, tree: Any) -> list:
        """One copy of a (host or local) tree on each local mesh device: the data every device gathers its views
        from (the copy on the first device is the tree's own buffers when they are there already)."""
        return [jax.tree.map(lambda x, d=d: jax.device_put(x, d), tree) for d in self.local_devices]

    def gather_views(self, replicas: list, views: np.ndarray) -> Any:
        """The batch of views [K, B] (indices into the data's leading axis) as arrays [K, B, ...] split over the
        mesh by `views_sharding`: each local device gathers its own V views from its own copy (`per_device`)."""
        views = np.asarray(views, np.int32)
        k, b = views.shape
        n, v = self.n_devices, b // self.n_devices
        if v * n != b:
            raise ValueError(f"{b} views per step do not split over {n} devices (config_check refuses this)")
        position = {d: i for i, d in enumerate(self.devices)}
        parts = []
        for d, data in zip(self.local_devices, replicas):
            m = position[d]
            idx = jax.device_put(views[:, m * v:(m + 1) * v], d)
            parts.append(_take(data, idx))
        sharding = self.views_sharding
        return jax.tree.map(lambda *xs: jax.make_array_from_single_device_arrays((k, b) + xs[0].shape[2:], sharding,
                                                                                 list(xs)), *parts)

    # -------------------------------------------------------------------------------- execution
    def shard(self, multi: Callable) -> Callable:
        """`multi(state, batches, keys, n_valid)` (train_step.make_multi_step over a step built with
        axis_name=AXIS) run per device: state, keys [K, 2] and n_valid replicated, batches [K, B, ...] split along
        their view axis; the outputs (state, metrics) are replicated (the step reduces them itself)."""
        return _shard_map(multi, mesh=self.mesh, in_specs=(P(), P(None, AXIS), P(), P()), out_specs=(P(), P()))

    def barrier(self, name: str) -> None:
        """Every process waits here until all have arrived (no-op with one process)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)


def _shard_on(x: jax.Array, device) -> jax.Array:
    """The shard of a fully replicated array that lives on `device` (its own buffer, no copy)."""
    if not x.is_fully_replicated:
        raise ValueError(f"expected a replicated array, got sharding {x.sharding}")
    for s in x.addressable_shards:
        if s.device == device:
            return s.data
    raise ValueError(f"the array has no shard on {device}")


@jax.jit
def _take(tree, idx):
    return jax.tree.map(lambda x: x[idx], tree)


def mesh_devices(devices_per_process: int) -> list:
    """The first `devices_per_process` local devices of every process (-1: all of them), ordered by process: the
    mesh is the same on every process. Raises ConfigError when a process has fewer."""
    n_local = jax.local_device_count()
    want = n_local if devices_per_process == -1 else int(devices_per_process)
    if want > n_local:
        raise ConfigError(f"invalid config:\n  config.parallel.devices={devices_per_process!r}: this process has "
                          f"{n_local} local {jax.default_backend()} device(s); allowed: -1 (all) or 1..{n_local}")
    out = []
    for proc in range(jax.process_count()):
        mine = sorted((d for d in jax.devices() if d.process_index == proc), key=lambda d: d.id)
        out.extend(mine[:want])
    return out


def setup(config) -> Parallel:
    """The run's mesh from config.parallel: `jax.distributed.initialize` first when `distributed` is set (before any
    JAX computation of the run), then config.parallel.devices devices of every process."""
    p = config.parallel
    if p.distributed:
        initialize_distributed(p)
    return Parallel(Mesh(np.array(mesh_devices(int(p.devices))), (AXIS,)))
