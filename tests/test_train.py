"""Training: one real jitted step, gating semantics, exact continuation across processes (also after a
kill), loud failures, and a shrunken static reconstruction that must beat FDK."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import r2_static, x2_gaussian
from x2gs_jax import train_lib
from x2gs_jax.data.naf import load_case
from x2gs_jax.train_step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny static config, its generated case and initial points (generated once per module)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    config = r2_static.get_config("tiny")
    config.data.cache_dir = cache
    path = train_lib.resolve_case_path(config)
    case = load_case(path)
    points = train_lib.initial_points(path, case, config)
    return config, case, points, cache


@pytest.fixture(scope="module")
def step(tiny):
    """One compiled step of the tiny static config (its only stage ends at iteration 20), shared by the tests that
    call it on different states."""
    config, case, points, _ = tiny
    model = train_lib.StaticModel()
    state = train_lib.init_state(config, case, points, model)
    settings = train_lib.step_settings(config, case.scanner, "coarse", None)
    assert settings.stage_end == 20
    return jax.jit(make_train_step(model, settings, train_lib.build_optimizer(config, state.params, model)))


def test_one_real_training_step(tiny, step):
    config, case, points, _ = tiny
    model = train_lib.StaticModel()
    state = train_lib.init_state(config, case, points, model)
    data = train_lib.TrainData(case)
    before = jax.tree.map(np.asarray, state.params)
    new_state, metrics = step(state, data.batch([0]), jax.random.PRNGKey(1))
    assert int(new_state.step) == 1
    assert bool(metrics["finite"]) and not bool(metrics["overflow"])
    # Every Gaussian group stepped (iteration 1 is not a densify iteration). Rotations stay put: the init is
    # isotropic, and an isotropic Gaussian's image does not depend on its rotation (zero gradient).
    for k in ("xyz", "scaling", "rotation", "density"):
        assert int(new_state.opt_state.inner_states[k].inner_state.count) == 1
        if k != "rotation":
            assert not np.array_equal(before[k], np.asarray(new_state.params[k])), k
    np.testing.assert_array_equal(before["rotation"], np.asarray(new_state.params["rotation"]))
    # Inactive slots never move.
    inactive = ~np.asarray(state.active)
    assert inactive.any()
    np.testing.assert_array_equal(before["xyz"][inactive], np.asarray(new_state.params["xyz"])[inactive])
    # Densification statistics were accumulated for visible Gaussians only.
    assert int(np.asarray(new_state.stats.count).sum()) > 0
    assert np.all(np.asarray(new_state.stats.count)[inactive] == 0)
    # The loss is the documented sum of its terms.
    expect = float(metrics["loss_l1"]) + 0.25 * float(metrics["loss_dssim"]) + 0.05 * float(metrics["loss_tv"])
    assert float(metrics["loss"]) == pytest.approx(expect, rel=1e-5)


def test_in_training_evaluation_compiles_once_and_takes_the_state_as_arguments(tiny, caplog):
    """Evaluations at different states share one compiled volume query and one view renderer (the state is an
    argument, not a closure constant), and their results follow the state."""
    config, case, points, _ = tiny
    model = train_lib.StaticModel()
    state = train_lib.init_state(config, case, points, model)
    cache = {}
    r1 = train_lib.evaluate(state, model, case, config, "coarse", cache)
    fns = dict(cache["coarse"])
    assert len(fns) == 2  # volumes + views
    moved = state.replace(params={**state.params, "density": state.params["density"] - 0.5})
    r2 = train_lib.evaluate(moved, model, case, config, "coarse", cache)
    assert cache["coarse"] == fns  # same function objects
    for fn in fns.values():
        assert fn._cache_size() == 1  # one compilation served both evaluations
    assert not np.allclose(r1["volumes"], r2["volumes"])
    _, compiled = _compiled_programs(caplog, lambda: train_lib.evaluate(moved, model, case, config, "coarse", cache))
    assert compiled == [], compiled  # a later evaluation compiles nothing (the val cameras are kept too)
    r3 = train_lib.evaluate(moved, model, case, config, "coarse")  # no cache: fresh compile, same numbers
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(r2["volumes"], r3["volumes"])
        assert r2["psnr_2d"] == r3["psnr_2d"]
    else:  # GPU: the voxelizer's atomic float sums change order from call to call (H200: 1.5e-7 absolute, 3.9e-7
        # relative on values ~1e-2)
        np.testing.assert_allclose(r2["volumes"], r3["volumes"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r2["psnr_2d"], r3["psnr_2d"], rtol=1e-5)


@pytest.mark.parametrize("it", [10, 20], ids=["densify_iteration", "last_iteration_of_the_stage"])
def test_frozen_iterations_do_not_step_but_count_visits(tiny, step, it):
    """x2gaussian.md §9 / physx.md §0: Gaussian attributes do not move on a densify iteration (10 of the tiny config:
    from 5, every 5, until 16), and no optimiser step happens on a stage's last iteration (20, where the reference
    computes the loss but skips `optimizer.step()`); the densification statistics still count the visit."""
    config, case, points, _ = tiny
    state = train_lib.init_state(config, case, points, train_lib.StaticModel())
    data = train_lib.TrainData(case)
    state = state.replace(step=jnp.int32(it - 1))
    new_state, metrics = step(state, data.batch([3]), jax.random.PRNGKey(2))
    assert int(new_state.step) == it and bool(metrics["finite"])
    for k in ("xyz", "scaling", "rotation", "density"):
        np.testing.assert_array_equal(np.asarray(state.params[k]), np.asarray(new_state.params[k]))
        assert int(new_state.opt_state.inner_states[k].inner_state.count) == 0
    assert int(np.asarray(new_state.stats.count).sum()) > 0


def test_step_with_apply_false_returns_the_state_bit_identical(tiny, step):
    """The multi-step's padding / after-overflow iterations: `apply=False` leaves every leaf of the state (step,
    parameters, Adam state, statistics) exactly as it was, through the optimiser's gate rather than a select;
    `apply=True` is the plain step."""
    config, case, points, _ = tiny
    state = train_lib.init_state(config, case, points, train_lib.StaticModel())
    batch, key = train_lib.TrainData(case).batch([1]), jax.random.PRNGKey(4)
    state, _ = step(state, batch, key)  # Adam moments no longer zero
    kept, m = step(state, batch, key, jnp.asarray(False))
    assert bool(m["finite"]) and not bool(m["overflow"])
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved, _ = step(state, batch, key, jnp.asarray(True))
    plain, _ = step(state, batch, key)
    assert int(moved.step) == int(state.step) + 1
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(moved.params["xyz"]), np.asarray(state.params["xyz"]))


def test_guard_counts_non_finite_parameters_of_active_gaussians_and_losses(tiny, step):
    """The step's guard: a NaN in an active Gaussian's scale is counted for its group (the loss stays finite: the
    renderer drops that Gaussian), a NaN in a free slot is not, a NaN projection makes the loss non-finite; and
    check_iteration turns a bad record into an error naming the iteration, the group, the count and the newest
    checkpoint (only when there is one)."""
    config, case, points, _ = tiny
    state = train_lib.init_state(config, case, points, train_lib.StaticModel())
    data = train_lib.TrainData(case)
    first_free = int(np.flatnonzero(~np.asarray(state.active))[0])

    def poisoned(k, i):
        return state.replace(params={**state.params, k: state.params[k].at[i].set(jnp.nan)})

    _, m = step(poisoned("scaling", 0), data.batch([0]), jax.random.PRNGKey(1))
    assert not bool(m["finite"]) and np.isfinite(float(m["loss"]))
    assert int(m["nonfinite_scaling"]) == 3  # the three components of that one Gaussian
    _, m_free = step(poisoned("xyz", first_free), data.batch([0]), jax.random.PRNGKey(1))
    assert bool(m_free["finite"]) and all(int(v) == 0 for k, v in m_free.items() if k.startswith("nonfinite_"))
    batch = data.batch([0])
    _, m_loss = step(state, {**batch, "image": batch["image"] * jnp.nan}, jax.random.PRNGKey(1))
    assert not bool(m_loss["finite"]) and not np.isfinite(float(m_loss["loss"]))

    class _Ckpt:
        directory = "/runs/x/checkpoints"

        def __init__(self, latest):
            self.latest = latest

        def latest_step(self):
            return self.latest

    record = {k: np.asarray(v) for k, v in m.items()}
    with pytest.raises(train_lib.NonFiniteError, match=r"iteration 7\b.*'scaling': 3 non-finite entries of active "
                       r"Gaussians.*no checkpoint had been written"):
        train_lib.check_iteration(record, 7, config, _Ckpt(None))
    with pytest.raises(train_lib.NonFiniteError, match=r"last good checkpoint is step 6 in /runs/x/checkpoints"):
        train_lib.check_iteration(record, 7, config, _Ckpt(6))
    with pytest.raises(train_lib.NonFiniteError, match=r"iteration 1\b: loss terms \[.*'loss_l1'"):
        train_lib.check_iteration({k: np.asarray(v) for k, v in m_loss.items()}, 1, config, _Ckpt(None))


def test_view_order_is_an_epochwise_permutation():
    n = 7
    idx = [train_lib.view_index(i, 1, n, seed=3) for i in range(1, 3 * n + 1)]
    for e in range(3):
        assert sorted(idx[e * n:(e + 1) * n]) == list(range(n))
    assert idx[:n] != idx[n:2 * n]  # a fresh permutation each epoch
    assert idx == [train_lib.view_index(i, 1, n, seed=3) for i in range(1, 3 * n + 1)]


def _train_cmd(workdir, cache, *extra, config="configs/r2_static.py:tiny"):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config=" + os.path.join(ROOT, config),
            f"--workdir={workdir}", f"--config.data.cache_dir={cache}", *extra]


def _run_killed_after_first_checkpoint(cmd, workdir, env) -> list:
    """Start `cmd`, SIGKILL it as soon as its first checkpoint has landed; returns the checkpoint steps."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = workdir / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ckdir.exists() and any(p.name.isdigit() for p in ckdir.iterdir()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())


def _losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "train":
                out[r["step"]] = r["loss"]
    return out


@pytest.mark.slow
def test_exact_continuation_after_kill(tiny, tmp_path):
    """Uninterrupted 30 iterations == (run killed mid-way) + restore in a fresh process + the rest. Checkpoints every
    7 iterations: the run resumes off a densify iteration (10, 15), so the restored densification statistics are
    not zero and must carry over exactly; a gradient threshold near the tiny run's median makes densification
    selective, so they matter (at the default 5e-5 every Gaussian is cloned or split, whatever the statistics)."""
    _, _, _, cache = tiny
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    every = ("--config.checkpoint.every=7", "--config.densify.grad_threshold=1e-3")
    r = subprocess.run(_train_cmd(straight, cache, "--config.train.iterations=30", *every), check=True, env=env,
                       cwd=ROOT, capture_output=True, text=True)
    if jax.default_backend() == "cpu":  # train.py says once that the CPU backend will be slow (a warning, not an error)
        assert r.stderr.count("JAX backend: cpu (no GPU found): training will be slow") == 1
    # A long run, SIGKILLed as soon as its first checkpoint has landed; it writes TensorBoard events (with images at
    # the evaluation iterations, 20 and 30) from here on.
    tb = ("--config.log.tensorboard=True",)
    steps = _run_killed_after_first_checkpoint(
        _train_cmd(broken, cache, "--config.train.iterations=400", *every, *tb), broken, env)
    assert steps and steps[-1] < 30, f"the run was not interrupted mid-way (checkpoints {steps})"
    assert steps[-1] % 5 != 0, steps  # off a densify iteration: statistics accumulated since the last one
    subprocess.run(_train_cmd(broken, cache, "--config.train.iterations=30", f"--config.resume={broken}", *every, *tb),
                   check=True, env=env, cwd=ROOT, capture_output=True)
    a = np.load(straight / "export" / "gaussians.npz")
    b = np.load(broken / "export" / "gaussians.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    la, lb = _losses(straight), _losses(broken)
    for s in range(steps[-1] + 1, 31):
        assert la[s] == lb[s], (s, la[s], lb[s])
    # Each step once in metrics.jsonl (what the killed run logged past its checkpoint was dropped on resume) and in
    # TensorBoard (purge_step), with the uninterrupted run's losses throughout.
    recs = [json.loads(line) for line in open(broken / "metrics.jsonl")]
    train_steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert train_steps == list(range(1, 31))
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [20, 30]
    assert [r["step"] for r in recs if r["kind"] == "resume"] == [steps[-1]]
    from tests.test_tb_events import accumulate

    acc = accumulate(broken / "tb")
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 31))
    np.testing.assert_allclose([e.value for e in loss], [la[s] for s in range(1, 31)], rtol=1e-6)
    images = [t for t in acc.Tags()["images"]]
    assert {"eval/slice_axial_gt_pred", "eval/slice_coronal_gt_pred", "eval/projection_gt_pred"} <= set(images)
    for tag in images:
        assert [e.step for e in acc.Images(tag)] == [20, 30], tag
    # The static run's volume.nii.gz: the trained volume on the scanner's grid, read back by nibabel.
    from x2gs_jax.nifti import nifti_frame_mm, read_nifti

    vol, affine = read_nifti(straight / "volume.nii.gz")
    np.testing.assert_array_equal(vol, np.load(straight / "volume.npy"))
    spacing, origin = nifti_frame_mm(load_case(train_lib.resolve_case_path(tiny[0])).scanner)
    np.testing.assert_allclose(affine[:3, :3], np.diag(spacing), rtol=1e-6)
    np.testing.assert_allclose(affine[:3, 3], origin, rtol=1e-6, atol=1e-4)


def test_unknown_config_key_fails(tiny, tmp_path):
    _, _, _, cache = tiny
    r = subprocess.run(_train_cmd(tmp_path / "x", cache, "--config.train.no_such_key=1"), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "no_such_key" in r.stderr


def test_non_finite_parameter_stops_the_run_naming_the_group(tiny, tmp_path, monkeypatch):
    """One active Gaussian's scale is NaN from the start: the loss stays finite (the renderer drops it), but the run
    stops at iteration 1 naming the group and the count, and writes no export or volume."""
    _, _, _, cache = tiny
    config = r2_static.get_config("tiny")
    config.data.cache_dir = cache
    init = train_lib.init_state

    def poisoned(*args):
        state = init(*args)
        return state.replace(params={**state.params, "scaling": state.params["scaling"].at[0].set(jnp.nan)})

    monkeypatch.setattr(train_lib, "init_state", poisoned)
    workdir = tmp_path / "nan"
    with pytest.raises(train_lib.NonFiniteError, match=r"iteration 1\b.*'scaling': 3 non-finite entries.*no "
                       r"checkpoint had been written"):
        train_lib.train_and_evaluate(config, str(workdir))
    assert not (workdir / "export").exists() and not (workdir / "volume.npy").exists()


def test_pair_buffer_overflow_grows_and_redoes_the_iteration(tiny_static_runs):
    """A too-small rasterizer pair buffer is detected, grown from count_pairs, and the run ends exactly
    where a run with an exact (dynamic) buffer ends."""
    runs = tiny_static_runs["runs"]
    a, b = (np.load(runs[k] / "export" / "gaussians.npz") for k in ("mp64", "mp0"))
    assert a.files == b.files
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_results_do_not_depend_on_iterations_per_call(tiny, tmp_path):
    """One iteration per jitted call vs 7 per call (padded, masked scans; chunks cut at densify, eval and
    checkpoint iterations): the same parameters and losses."""
    _, _, _, cache = tiny
    exports, losses = [], []
    for per_call in (1, 7):
        config = r2_static.get_config("tiny")
        config.data.cache_dir = cache
        config.train.steps_per_call = per_call
        workdir = tmp_path / f"k{per_call}"
        train_lib.train_and_evaluate(config, str(workdir))
        exports.append(np.load(workdir / "export" / "gaussians.npz"))
        losses.append(_losses(workdir))
    # Differently compiled scans may round differently: ~2e-7 on the ~1e-3 quaternion components of a CPU run.
    for k in exports[0].files:
        np.testing.assert_allclose(exports[0][k], exports[1][k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert losses[0].keys() == losses[1].keys()
    for s in losses[0]:
        assert losses[0][s] == pytest.approx(losses[1][s], rel=1e-6), s


def test_grown_capacity_headroom():
    # 85 needed > 62 slots: with 1.5x headroom (128) the buffer doubles twice at once, not once now and again soon.
    assert train_lib.grown_capacity(85, 62, 1.5, 10_000) == 248
    assert train_lib.grown_capacity(85, 62, 1.0, 10_000) == 124  # plain doubling
    # Near the cap the headroom shrinks to max_gaussians, never below what is needed.
    assert train_lib.grown_capacity(450, 400, 1.5, 500) == 800
    assert train_lib.grown_capacity(600, 400, 1.5, 500) == 800
    with pytest.raises(ValueError, match="capacity_headroom"):
        train_lib.grown_capacity(85, 62, 0.5, 10_000)


def _compiled_programs(caplog, fn):
    """(fn(), the names of the programs JAX compiled while it ran) from JAX's compile log."""
    import logging

    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            out = fn()
    finally:
        jax.config.update("jax_log_compiles", previous)
    return out, [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling ")]


def test_setup_compiles_a_few_programs_not_one_per_array(tiny, caplog):
    """The state, the optimiser state and the training cameras are built by a handful of compiled programs: eager
    per-array operations (zeros, `.at[].set`, jnp.asarray of host arrays, one op per camera step) compiled 81
    programs in a `:ref64` setup before (12 now), each a compilation of its own on the device."""
    config, case, points, _ = tiny
    model = train_lib.StaticModel()

    def setup():
        state = train_lib.init_state(config, case, points, model)
        state = state.replace(opt_state=train_lib.init_opt_state(
            train_lib.build_optimizer(config, state.params, model), state.params))  # the stage switch's
        return train_lib.TrainData(case)

    _, compiled = _compiled_programs(caplog, setup)
    assert len(compiled) <= 12, compiled
    assert not [c for c in compiled if c in ("Compiling jit(broadcast_in_dim)", "Compiling jit(scatter)")], compiled


def test_growing_the_buffers_compiles_one_program(tiny, caplog):
    """grow_state pads every per-Gaussian leaf (parameters, Adam moments, statistics) in one compiled program, not
    one per leaf shape, and keeps every value."""
    config, case, points, _ = tiny
    model = train_lib.StaticModel()
    state = train_lib.init_state(config, case, points, model)
    new = 2 * state.capacity + 7
    grown, compiled = _compiled_programs(caplog, lambda: train_lib.grow_state(state, new, model))
    assert len(compiled) <= 1, compiled
    assert grown.capacity == new
    for k in ("xyz", "scaling", "rotation", "density"):
        np.testing.assert_array_equal(np.asarray(grown.params[k])[:state.capacity], np.asarray(state.params[k]))
    assert not np.any(np.asarray(grown.active)[state.capacity:])


def test_pair_sizing_is_one_program_and_counts_the_worst_sampled_view(tiny, caplog):
    """grown_pair_capacity: twice the largest pair count over 16 spread training views, rounded up to a power of
    two, from one compiled program (run eagerly, every op of the count compiled its own at each capacity)."""
    from x2gs_jax.render.rasterize_ref import count_pairs, pair_capacity

    config, case, points, _ = tiny
    model = train_lib.StaticModel()
    state = train_lib.init_state(config, case, points, model)
    data = train_lib.TrainData(case)
    got, compiled = _compiled_programs(caplog, lambda: train_lib.grown_pair_capacity(state, data, None))
    assert len(compiled) <= 1, compiled
    g = state.gaussians()
    idx = np.unique(np.linspace(0, data.n_train - 1, min(16, data.n_train)).astype(int))
    worst = max(int(count_pairs(g.get_xyz(), g.get_scale(), g.get_rotation(), g.get_density(),
                                jax.tree.map(lambda x, i=i: x[i], data.cameras))) for i in idx)
    assert got == pair_capacity(2 * worst)
    assert train_lib.grown_pair_capacity(state, data, got) == 2 * got  # a growth at least doubles


def test_initial_capacity_is_a_rounded_multiple_that_doubling_keeps():
    from x2gs_jax.run_state import initial_capacity

    assert initial_capacity(200_000, 1.25, 1024) == 250_880 == 245 * 1024  # not 250 000: no GEMM pad on a GPU
    assert initial_capacity(50_000, 1.25, 1024) == 63_488
    assert initial_capacity(50_000, 1.25, 1) == 62_500  # 1 = the reference's ceil(factor x points)
    assert initial_capacity(1024, 1.0, 1024) == 1024  # already a multiple: unchanged
    assert initial_capacity(1, 1.0, 1024) == 1024
    cap = initial_capacity(50_000, 1.25, 1024)
    for needed in (cap + 1, 3 * cap, 5 * cap + 7):
        assert train_lib.grown_capacity(needed, cap, 1.5, 10 ** 7) % 1024 == 0
    config = x2_gaussian.get_config()  # the default run's buffers: multiples of 1024 from the start
    assert initial_capacity(config.data.init.n_points, config.model.initial_capacity_factor,
                            config.model.capacity_multiple) % 1024 == 0


def test_padded_scan_length():
    from x2gs_jax.train_step import padded_length

    assert [padded_length(n, 50) for n in (1, 2, 3, 17, 32, 33, 49, 50)] == [1, 2, 4, 32, 32, 50, 50, 50]
    assert padded_length(5, 1) == 1


def test_call_length_compiles_each_stage_once():
    from x2gs_jax.train_step import call_length, padded_length

    # A full-length call follows: the full length (the evaluation after iteration 1, an overflow's redo).
    assert call_length(1, 5000, 50) == 50 and call_length(13, 163, 50) == 50
    # None follows (the stage's tail): the call's own padded length, as without padding.
    assert call_length(13, 62, 50) == 16 and call_length(4, 12, 50) == 4
    # The shortest compiled length that holds the call.
    assert call_length(13, 4000, 50, [50]) == 50 and call_length(2, 13, 50, [16, 50]) == 16
    assert call_length(20, 40, 50, [16]) == 32  # 16 cannot hold it
    # Every call of a stage (same capacity and buffers) fits the first length compiled.
    for remaining, per_call in ((5000, 50), (37, 50), (20, 7), (4, 50)):
        compiled, left = [], remaining
        while left > 0:
            n = min(left, per_call, 1 + left // 3)  # calls cut short by boundaries
            length = call_length(n, left, per_call, compiled)
            assert length >= n and (not compiled or length in compiled or length == padded_length(n, per_call))
            compiled = sorted(set(compiled) | {length})
            left -= n
        assert len(compiled) <= 2, (remaining, per_call, compiled)  # the full length, and at most the tail's
    # Off (the CPU variants): the call's own padded length.
    assert call_length(1, 5000, 50, [50], pad_short=False) == 1
    with pytest.raises(ValueError, match="n <= remaining"):
        call_length(5, 4, 50)


def test_a_short_call_inside_a_stage_compiles_nothing_more(tiny, tmp_path):
    """The evaluation after iteration 1 makes a one-iteration call: it runs the stage's full-length function
    (padded with masked iterations, which leave the state bit-identical: test_step_with_apply_false...), so the
    run compiles once (without padding: lengths 1 and 4)."""
    config, _, _, cache = tiny
    config = config.copy_and_resolve_references()
    config.data.cache_dir = cache
    config.train.iterations = 8
    config.eval.iterations = (1, 8)
    config.checkpoint.every = 8
    config.densify.enabled = False
    config.train.steps_per_call = 4
    config.train.pad_short_calls = True  # the GPU configs' setting (the CPU variants turn it off)
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    compiles = [r for r in recs if r["kind"] == "compile"]
    assert [(r["step"], r["scan_length"]) for r in compiles] == [(1, 4)]  # calls 1, 2-4, 5-8: one function
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [1, 8]
    assert [r["step"] for r in recs if r["kind"] == "train"][:1] == [1]


def test_chunks_end_on_boundaries(tiny):
    config = r2_static.get_config("tiny")
    config.train.steps_per_call = 7
    ends, it = [], 1
    while it <= 20:
        e = train_lib.chunk_end(it, config, 20, 20)
        assert e >= it
        ends.append(e)
        it = e + 1
    # tiny: densify every 5 from 5 until 16 (iterations 10, 15), checkpoints every 10, eval at 20, calls of
    # at most 7 aligned to multiples of 7.
    assert ends == [7, 10, 14, 15, 20]


@pytest.mark.slow
def test_x2_demo_through_train_py_and_exact_continuation(tmp_path):
    """The 4D model at :demo size through train.py (coarse stage, stage switch, fine stage with the periodic
    render): a run killed after its first checkpoint and resumed in a fresh process ends with exactly the
    parameters (Gaussians, period, field) and losses of an uninterrupted run."""
    cache = str(tmp_path / "cache")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    common = ["--config.train.coarse_iterations=3", "--config.loss.periodic_start=5", "--config.densify.enabled=False",
              "--config.checkpoint.every=2", "--config.log.every=1", "--config.log.tensorboard=False",
              "--config.eval.iterations=(8,)"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    kw = dict(config="configs/x2_gaussian.py:demo")
    subprocess.run(_train_cmd(straight, cache, "--config.train.iterations=8", *common, **kw), check=True, env=env,
                   cwd=ROOT, capture_output=True)
    steps = _run_killed_after_first_checkpoint(
        _train_cmd(broken, cache, "--config.train.iterations=400", *common, **kw), broken, env)
    assert steps and steps[-1] < 8, f"the run was not interrupted mid-way (checkpoints {steps})"
    subprocess.run(_train_cmd(broken, cache, "--config.train.iterations=8", f"--config.resume={broken}", *common, **kw),
                   check=True, env=env, cwd=ROOT, capture_output=True)
    a = np.load(straight / "export" / "gaussians.npz")
    b = np.load(broken / "export" / "gaussians.npz")
    assert "period" in a.files
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        fa = ck.restore(os.path.abspath(straight / "export" / "field"))
        fb = ck.restore(os.path.abspath(broken / "export" / "field"))
    for x, y in zip(jax.tree.leaves(fa), jax.tree.leaves(fb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    la, lb = _losses(straight), _losses(broken)
    assert set(range(1, 9)) <= set(la)
    for s in range(steps[-1] + 1, 9):
        assert la[s] == lb[s], (s, la[s], lb[s])
    # The fine stage really ran with the periodic term (iterations > 5) and the field moved.
    recs = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    fine = [r for r in recs if r["kind"] == "train" and r["step"] > 5]
    assert fine and all(r["loss_render_prior"] > 0 for r in fine)
    # Where the time went: one `compile` record per compiled step function (both stages), whose times add up to
    # the final `timing` record's compilation totals.
    compiles = [r for r in recs if r["kind"] == "compile"]
    timing = [r for r in recs if r["kind"] == "timing"]
    assert {r["fine_stage"] for r in compiles} == {0.0, 1.0} and len(timing) == 1
    assert all(r["xla_compile_s"] > 0 and r["trace_and_lower_s"] > 0 for r in compiles)
    for part in ("trace_and_lower_s", "xla_compile_s"):
        assert abs(sum(r[part] for r in compiles) - timing[0][part]) < 1e-6 * max(1.0, timing[0][part])
    # Phases never overlap: together they stay within the run's wall time (data generation timed on its own).
    # `other_s` is the rest of the wall time (the loop's own host work).
    phases = sum(v for k, v in timing[0].items() if k.endswith("_s") and k not in ("total_s", "other_s"))
    assert "data_generation_s" in timing[0] and timing[0]["setup_s"] > 0 and phases <= timing[0]["total_s"] + 1e-6
    assert timing[0]["other_s"] == pytest.approx(timing[0]["total_s"] - phases, abs=1e-6)
