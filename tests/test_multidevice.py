"""Data-parallel training over several devices and processes (x2gs_jax/parallel.py), on forced CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count must be set before JAX starts, so the runs happen in subprocesses
(tests/multidevice_worker.py, one process for every single-process run: the compiled step functions' cache is
shared) and this module compares their results:
  * a 4-device run with a global batch of 4 views = a 1-device run with the same batch (losses, the number of
    Gaussians, parameters, to float32 rounding: the two sum the views' gradients in another order), through a
    densification with a capacity growth (coarse stage), the stage switch and a densification in the fine stage;
  * a checkpoint written on 4 devices restores on 1 and on 2 devices and continues to the same result, and restores
    in a process that has a single device;
  * the replicated state is bit-identical on every device at every checkpoint;
  * two processes through jax.distributed (localhost coordinator, 2 devices each) reproduce the single-process
    4-device run;
  * a batch that does not split over the devices is a usage error naming the key.
Each run is small (tiny configs, 6 iterations): what costs is compiling the step functions (one per device count
and capacity), hence one worker process for all single-process runs and a persistent compilation cache.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2gs_jax import train_lib
from x2gs_jax.config_check import check_parallel
from x2gs_jax.data.naf import load_case
from x2gs_jax.densify import DensifyStats, accumulate, add_increments, render_increments
from x2gs_jax.models import ConfigError
from x2gs_jax.train_step import view_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multidevice_worker.py")
MODELS = ("x2_gaussian", "physx_boosted")
# Unoptimised CPU code generation: the step functions compile in about half the time (every run here uses it).
XLA_EXTRA = "--xla_backend_optimization_level=0"
RESUME_STEP = 3

# 6 iterations: coarse 1-2 with a densification at 2 that outgrows the buffers (capacity factor 1: no free slot),
# fine 3-6 with another densification at 4 (inside the grown capacity) and X2's periodic render from 4; checkpoints
# at 2 (stage end), 3 and 6.
COMMON = {"train.iterations": 6, "train.coarse_iterations": 2, "train.views_per_step": 4, "train.steps_per_call": 1,
          "densify.from_iter": 1, "densify.interval": 2, "densify.until_iter": 5, "model.initial_capacity_factor": 1.0,
          "model.capacity_multiple": 1,
          "loss.periodic_start": 3, "checkpoint.every": 3, "eval.iterations": [6], "eval.max_val_views": 0,
          "log.every": 1}


def _config(model: str):
    from configs import physx_boosted, x2_gaussian

    return {"x2_gaussian": x2_gaussian, "physx_boosted": physx_boosted}[model].get_config("tiny")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny case and its initial points, made once here (the runs only read them)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    config = _config("x2_gaussian")
    config.data.cache_dir = cache
    path = train_lib.resolve_case_path(config)
    train_lib.initial_points(path, load_case(path), config)
    return cache


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {XLA_EXTRA}")
    env.update(extra)
    return env


def _plan(path, runs, report, compilation_cache=None):
    with open(path, "w") as f:
        json.dump({"runs": runs, "report": str(report), "compilation_cache": compilation_cache}, f)
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """For each model: "d1" (1 device), "d4" (4 devices), "r1"/"r2" (d4's checkpoint 3 continued on 1/2 devices); one
    worker process with 4 forced CPU devices. Returns {model: {name: run dir}} and the worker's report."""
    root = tmp_path_factory.mktemp("multidevice")
    plan, dirs = [], {}
    for model in MODELS:
        common = {**COMMON, "data.cache_dir": cache}
        d = {name: str(root / f"{model}_{name}") for name in ("d1", "d4", "r1", "r2")}
        plan += [{"config": f"{model}:tiny", "workdir": d["d1"], "overrides": {**common, "parallel.devices": 1}},
                 {"config": f"{model}:tiny", "workdir": d["d4"], "overrides": {**common, "parallel.devices": 4}},
                 {"config": f"{model}:tiny", "workdir": d["r1"], "overrides": {**common, "parallel.devices": 1},
                  "resume_from": [d["d4"], RESUME_STEP]},
                 {"config": f"{model}:tiny", "workdir": d["r2"], "overrides": {**common, "parallel.devices": 2},
                  "resume_from": [d["d4"], RESUME_STEP]}]
        dirs[model] = d
    report = root / "report.json"
    log = root / "worker.log"
    with open(log, "w") as out:
        r = subprocess.run([sys.executable, WORKER, _plan(root / "plan.json", plan, report, str(root / "jax_cache"))],
                           env=_env(4), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    assert r.returncode == 0, f"worker failed:\n{_tail(log)}"
    with open(report) as f:
        return dirs, json.load(f)


def _tail(path, n=6000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _train_records(workdir) -> dict:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "train":
                out[r["step"]] = r
    return out


def _export(workdir) -> dict:
    """Every exported parameter: gaussians.npz, model_state.npz and the model's orbax trees (flattened)."""
    import orbax.checkpoint as ocp

    e = os.path.join(workdir, "export")
    with np.load(os.path.join(e, "gaussians.npz")) as z:
        out = {k: z[k] for k in z.files}
    if os.path.exists(os.path.join(e, "model_state.npz")):
        with np.load(os.path.join(e, "model_state.npz")) as z:
            out.update({f"model_state/{k}": z[k] for k in z.files})
    for name in sorted(os.listdir(e)):
        if os.path.isdir(os.path.join(e, name)):
            with ocp.StandardCheckpointer() as ck:
                tree = ck.restore(os.path.join(e, name))  # no target: the export records no device layout
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                out[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


# Adam (eps 1e-15) moves an entry whose gradient is zero in exact arithmetic, or below the rounding noise, by +-lr with
# the sign of that noise, so two runs that sum a batch's gradients in another order may move it in opposite
# directions. Structurally zero: the attention's key bias (softmax ignores a shift common to all logits); by chance:
# a few entries (seen: 4 of 24 000 PhysX-Boosted rotation components of Gaussians cloned one step before).
FLIP_FRACTION = 1e-3  # at most this share of an array's entries


def _key_bias(name: str, a: np.ndarray) -> np.ndarray:
    """Mask of the entries compared: all but the key part [d, 2d) of an attention block's in_proj_bias [3d]."""
    keep = np.ones(a.shape, bool)
    if name.endswith("['in_proj_bias']"):
        d = a.shape[0] // 3
        keep[d:2 * d] = False
    return keep


def _assert_same_run(a, b, steps, what, model="x2_gaussian"):
    """Losses and Gaussian counts at `steps`, and every exported parameter equal to float32 rounding (Adam's sign
    flips aside, see FLIP_FRACTION: rare, and each at most 2 lr per step apart)."""
    ra, rb = _train_records(a), _train_records(b)
    loss_rel = 0.0
    for s in steps:
        assert rb[s]["num_gaussians"] == ra[s]["num_gaussians"], (what, s)
        for k, v in ra[s].items():
            if k.startswith("loss"):
                assert rb[s][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (what, s, k)
                loss_rel = max(loss_rel, abs(rb[s][k] - v) / max(abs(v), 1e-7))
    max_flip = 2 * max(g.init for g in _config(model).optim.lr.values()) * len(steps)
    ea, eb = _export(a), _export(b)
    assert ea.keys() == eb.keys()
    param_rel, flips = 0.0, {}
    for k in ea:
        x, y = ea[k], eb[k]
        if x.dtype.kind in "biu":
            np.testing.assert_array_equal(y, x, err_msg=f"{what}: {k}")
            continue
        keep = _key_bias(k, x)
        scale = max(float(np.max(np.abs(x))) if x.size else 0.0, 1e-3)
        close = np.isclose(y, x, rtol=1e-5, atol=1e-5 * scale) | ~keep
        far = np.abs(y - x)[~close]
        assert far.size <= FLIP_FRACTION * x.size, (what, k, f"{far.size} of {x.size} entries differ, up to {far.max()}")
        assert np.all(far <= max_flip), (what, k, far.max(), max_flip)
        param_rel = max(param_rel, float(np.max(np.abs(y - x)[close & keep], initial=0.0)) / scale)
        if far.size:
            flips[k] = (int(far.size), float(far.max()))
    # Shown with pytest -rP: how close the runs are.
    print(f"{what}: losses within {loss_rel:.1e} (relative), parameters within {param_rel:.1e} of each array's "
          f"largest entry; Adam sign flips: {flips or 'none'}; key biases not compared")


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_four_devices_equal_one_device_with_the_same_batch(runs, model):
    dirs, _ = runs
    d1, d4 = dirs[model]["d1"], dirs[model]["d4"]
    counts = [r["num_gaussians"] for r in _train_records(d4).values()]
    assert counts[2] > counts[0] and counts[4] > counts[2], f"densification did not add Gaussians: {counts}"
    compiles = [json.loads(line) for line in open(os.path.join(d4, "metrics.jsonl")) if '"compile"' in line]
    assert [r["devices"] for r in compiles] == [4.0, 4.0]  # coarse stage, then fine stage after the growth
    assert compiles[1]["capacity"] > compiles[0]["capacity"], "the buffers did not grow"
    _assert_same_run(d1, d4, range(1, 7), f"{model}: 1 vs 4 devices", model)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_of_four_devices_continues_on_one_and_two(runs, model):
    dirs, _ = runs
    d4 = dirs[model]["d4"]
    for name, n in (("r1", 1), ("r2", 2)):
        recs = [json.loads(line) for line in open(os.path.join(dirs[model][name], "metrics.jsonl"))]
        assert [r["devices"] for r in recs if r["kind"] == "compile"] == [float(n)]
        assert min(r["step"] for r in recs if r["kind"] == "train") == RESUME_STEP + 1
        _assert_same_run(d4, dirs[model][name], range(RESUME_STEP + 1, 7), f"{model}: 4 devices -> {n}", model)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_of_four_devices_restores_in_a_one_device_process(runs, model, cache):
    """This process has one CPU device: the 4-device checkpoint restores onto it, as written (checksums checked)."""
    dirs, _ = runs
    from x2gs_jax.checkpoint import Checkpointer
    from x2gs_jax.run_state import template_state

    config = _config(model)
    config.data.cache_dir = cache
    for k, v in COMMON.items():
        *parents, leaf = k.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = tuple(v) if isinstance(v, list) else v
    path = train_lib.resolve_case_path(config)
    case = load_case(path)
    points = train_lib.initial_points(path, case, config)
    m = train_lib.make_model(config, case)
    ckpt = Checkpointer(dirs[model]["d4"], read_only=True)
    try:
        state, meta = ckpt.restore(lambda meta: template_state(config, case, points, m, meta), step=RESUME_STEP)
    finally:
        ckpt.close()
    assert int(state.step) == RESUME_STEP and state.capacity == meta["capacity"]
    assert {d for leaf in jax.tree.leaves(state) for d in leaf.devices()} == {jax.devices()[0]}


@pytest.mark.slow
def test_replicas_stay_bit_identical(runs):
    _, report = runs
    assert report["devices"] == 4 and report["processes"] == 1
    assert report["replicas"]["leaves_checked"] > 0
    assert report["replicas"]["differing"] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_reproduce_four_devices(runs, tmp_path, cache):
    """Two processes on this machine, 2 forced CPU devices each, joined through jax.distributed (coordinator on a free
    localhost port, process count and ids from $JAX_NUM_PROCESSES / $JAX_PROCESS_ID): the same losses and
    parameters as the single-process 4-device run. Process 0 alone writes the logs and the export files."""
    dirs, _ = runs
    workdir = tmp_path / "two_procs"
    overrides = {**COMMON, "data.cache_dir": cache, "parallel.devices": -1, "parallel.distributed": True}
    plan = _plan(tmp_path / "plan.json", [{"config": "x2_gaussian:tiny", "workdir": str(workdir),
                                           "overrides": overrides}], tmp_path / "report.json")
    address = f"localhost:{_free_port()}"
    procs, logs = [], []
    try:
        for pid in range(2):
            logs.append(tmp_path / f"process{pid}.log")
            env = _env(2, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
            with open(logs[-1], "w") as out:
                procs.append(subprocess.Popen([sys.executable, WORKER, plan], env=env, cwd=ROOT, stdout=out,
                                              stderr=subprocess.STDOUT))
        deadline = time.time() + 1800
        while time.time() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it at the next collective
            time.sleep(1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(f"--- process {i}\n{_tail(log)}"
                                                                  for i, log in enumerate(logs))
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert report["devices"] == 4 and report["processes"] == 2
    assert report["replicas"]["leaves_checked"] > 0 and report["replicas"]["differing"] == []
    _assert_same_run(dirs["x2_gaussian"]["d4"], workdir, range(1, 7), "2 processes x 2 devices vs 4 devices")


def test_batch_that_does_not_split_over_the_devices_is_a_usage_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config.train.views_per_step=6: .* 4 devices .* a multiple of 4"):
        check_parallel(_with(views=6), 4)
    check_parallel(_with(views=8), 4)
    # Through train.py with 4 forced devices: refused before anything is prepared or written.
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config=" + os.path.join(ROOT, "configs/r2_static.py:tiny"),
           f"--workdir={tmp_path / 'run'}", "--config.parallel.devices=4", "--config.train.views_per_step=6",
           f"--config.data.cache_dir={tmp_path / 'cache'}"]
    r = subprocess.run(cmd, env=_env(4), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "config.train.views_per_step=6" in r.stderr and "multiple of 4" in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    r = subprocess.run(cmd[:-3] + ["--config.parallel.devices=8"], env=_env(4), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "config.parallel.devices=8" in r.stderr and "1..4" in r.stderr


def _with(views: int):
    c = _config("x2_gaussian")
    c.train.views_per_step = views
    return c


def test_view_keys_depend_on_the_global_view_index_only():
    key = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(view_keys(key, jnp.int32(0), 1, 1), key[None])  # one view: the iteration's key
    whole = view_keys(key, jnp.int32(0), 4, 4)
    assert len({tuple(np.asarray(k)) for k in whole}) == 4
    for n in (1, 2):  # any split of the batch over devices draws the same keys
        parts = [view_keys(key, jnp.int32(first), n, 4) for first in range(0, 4, n)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_one_render_increment_equals_accumulate():
    rng = np.random.default_rng(0)
    c = 64
    stats = DensifyStats(grad_accum=jnp.asarray(rng.uniform(0, 1, c), jnp.float32),
                         count=jnp.asarray(rng.integers(0, 5, c), jnp.int32),
                         max_radii=jnp.asarray(rng.uniform(0, 9, c), jnp.float32))
    grads = jnp.asarray(rng.normal(size=(3, c, 2)), jnp.float32)
    radii = jnp.asarray(rng.integers(0, 12, (3, c)) * (rng.uniform(size=(3, c)) > 0.3), jnp.int32)
    one = add_increments(stats, render_increments(grads[:1], radii[:1]))
    ref = accumulate(stats, grads[0], radii[0])
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    seq = stats
    for v in range(3):
        seq = accumulate(seq, grads[v], radii[v])
    many = add_increments(stats, render_increments(grads, radii))
    np.testing.assert_array_equal(np.asarray(many.count), np.asarray(seq.count))
    np.testing.assert_array_equal(np.asarray(many.max_radii), np.asarray(seq.max_radii))
    np.testing.assert_allclose(np.asarray(many.grad_accum), np.asarray(seq.grad_accum), rtol=1e-6)
