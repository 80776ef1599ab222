"""Runs a plan of training runs in one process, for tests/test_multidevice.py (which starts it with forced CPU devices,
`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set before JAX is imported; as one process or as one of the
processes of a `jax.distributed` run).

  python tests/multidevice_worker.py PLAN.json

PLAN: {"runs": [{"config": "x2_gaussian:tiny", "workdir": ..., "overrides": {"train.views_per_step": 4, ...},
                 "resume_from": [run dir, step] (optional)}, ...],
       "report": path of the JSON report (process 0 writes it),
       "compilation_cache": a directory for JAX's persistent compilation cache (optional: runs that compile the same
                            step function, e.g. a resume on one device after a one-device run, compile it once)}

Test conditions, the same for every run:
  * The initial Gaussians are made anisotropic and randomly rotated (fixed seed). Isotropic Gaussians have rotation
    gradients that are zero in exact arithmetic, i.e. pure rounding noise, which Adam's first step (eps 1e-15) turns
    into moves of +-lr with the sign of that noise (tests/test_train_backends.py): any two runs that sum a batch's
    gradients in another order (one device's vmap vs a psum over devices) would then differ by 2 lr there.
  * Every checkpoint save first checks that each leaf of the state is bit-identical on all of this process's devices
    (the report counts the leaves checked and lists any that differ).
  * "resume_from": the run directory gets a copy of that run's checkpoint `step` only and resumes from it in place.
"""
import importlib
import json
import os
import shutil
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from x2gs_jax import checkpoint, train_lib  # noqa: E402

REPLICAS = {"leaves_checked": 0, "differing": []}


def _anisotropic(init_state):
    def init(config, case, points, model):
        state = init_state(config, case, points, model)
        rng = np.random.default_rng(0)
        params = dict(state.params)
        params["scaling"] = params["scaling"] + rng.uniform(-0.4, 0.4, params["scaling"].shape).astype(np.float32)
        params["rotation"] = rng.normal(size=params["rotation"].shape).astype(np.float32)
        return state.replace(params=jax.tree.map(jax.numpy.asarray, params))
    return init


def _checked_save(save):
    def checked(self, step, state, meta):
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            shards = [np.asarray(s.data) for s in leaf.addressable_shards]
            REPLICAS["leaves_checked"] += 1
            if any(a.tobytes() != shards[0].tobytes() for a in shards[1:]):
                REPLICAS["differing"].append(f"step {step} {jax.tree_util.keystr(path)}")
        return save(self, step, state, meta)
    return checked


def _config(name: str, overrides: dict):
    module, _, arg = name.partition(":")
    config = importlib.import_module(f"configs.{module}").get_config(arg or None)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    if plan.get("compilation_cache"):
        jax.config.update("jax_compilation_cache_dir", plan["compilation_cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    train_lib.init_state = _anisotropic(train_lib.init_state)
    checkpoint.Checkpointer.save = _checked_save(checkpoint.Checkpointer.save)
    for run in plan["runs"]:
        config = _config(run["config"], run.get("overrides", {}))
        workdir = run["workdir"]
        if run.get("resume_from"):
            src, step = run["resume_from"]
            if jax.process_index() == 0 and not os.path.exists(workdir):
                shutil.copytree(os.path.join(src, "checkpoints", str(step)),
                                os.path.join(workdir, "checkpoints", str(step)))
            config.resume = workdir
        train_lib.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        with open(plan["report"], "w") as f:
            json.dump({"replicas": REPLICAS, "devices": jax.device_count(), "processes": jax.process_count()}, f)


if __name__ == "__main__":
    main(sys.argv[1])
