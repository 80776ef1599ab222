"""The X2 model's training-step hooks: the joint deformation at [t, t + kT] (`view_gaussians`, one vmap over the
two times so the spatial-plane samples and their gradient scatter happen once) gives the same losses and
gradients as deforming at each time separately (the `cache=None` path)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2gs_jax.fields import DeformationConfig
from x2gs_jax.geometry import Scanner
from x2gs_jax.gaussians import Gaussians
from x2gs_jax.models.x2 import X2Model, X2Settings
from x2gs_jax.render import rasterize
from x2gs_jax.train_state import gaussians_from_params, params_from_gaussians


class _Settings:  # the two StepSettings fields the model reads
    stage = "fine"
    scale_bound = None


def _setup(seed=0, n=60, views=2):
    rng = np.random.default_rng(seed)
    g = Gaussians.from_activated(rng.uniform(-0.6, 0.6, (n, 3)).astype(np.float32),
                                 np.full((n, 3), 0.08, np.float32),
                                 np.tile(np.array([[1.0, 0, 0, 0]], np.float32), (n, 1)),
                                 rng.uniform(0.2, 1.0, n).astype(np.float32), capacity=n + 4)
    field = DeformationConfig(resolution=(6, 6, 6, 10), multires=(1, 2), features=4, net_width=8)
    model = X2Model(X2Settings(field=field, periodic_start=5, period_init_s=2.8))
    params = params_from_gaussians(g)
    params.update(model.init_params(jax.random.PRNGKey(seed), None))
    # Random planes (the reference init has constant time planes, which would hide time-dependence errors).
    leaves, tree = jax.tree.flatten(params["field"]["grid"])
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    params["field"]["grid"] = jax.tree.unflatten(
        tree, [jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5) for k, x in zip(keys, leaves)])
    sc = Scanner(mode="cone", DSD=7.0, DSO=5.0, n_detector=(16, 16), d_detector=(0.2, 0.2), n_voxel=(8, 8, 8),
                 d_voxel=(0.25,) * 3)
    cams = jax.vmap(sc.camera)(jnp.asarray(rng.uniform(0, 6.28, views), jnp.float32))
    batch = {"camera": cams, "image": jnp.asarray(rng.uniform(0, 1, (views, 16, 16)), jnp.float32),
             "time": jnp.asarray(rng.uniform(0.05, 0.9, views), jnp.float32)}
    return model, params, g.active, batch


def _render(g, cam):
    return rasterize(g, cam, backend="reference")


def _loss(model, params, active, batch, it, joint):
    canonical = gaussians_from_params(params, active, None)
    key = jax.random.PRNGKey(3)
    if joint:
        deformed, cache = model.view_gaussians(params, {}, canonical, batch["time"], key, it, _Settings)
    else:
        deformed = jax.vmap(lambda t: model.gaussians_at(params, {}, canonical, t, key, "fine"))(batch["time"])
        cache = None
    main = jnp.mean(jax.vmap(lambda g, c, im: jnp.mean(jnp.abs(_render(g, c) - im)))(
        deformed, batch["camera"], batch["image"]))
    extra, terms = model.extra_losses(params, {}, active, batch, key, it, _Settings, _render, cache)
    return main + extra, terms


@pytest.mark.parametrize("it", [3, pytest.param(9, marks=pytest.mark.slow)])  # before / after periodic_start = 5
def test_joint_deformation_matches_separate_deformations(it):
    model, params, active, batch = _setup()
    grad = lambda joint: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: _loss(model, p, active, batch, jnp.int32(it), joint), has_aux=True))(params)
    (l_j, t_j), g_j = grad(True)
    (l_s, t_s), g_s = grad(False)
    assert float(t_j["loss_render_prior"]) == pytest.approx(float(t_s["loss_render_prior"]), rel=1e-5, abs=1e-9)
    if it > 5:
        assert float(t_j["loss_render_prior"]) > 0
        assert float(jnp.abs(g_j["period"]).sum()) > 0  # the period learns only through the shifted render
    else:
        assert float(t_j["loss_render_prior"]) == 0.0
    np.testing.assert_allclose(float(l_j), float(l_s), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_j)[0], jax.tree.leaves(g_s)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * scale, jax.tree_util.keystr(path)


@pytest.mark.parametrize("it", [pytest.param(3, marks=pytest.mark.slow), 9])  # before / after periodic_start = 5
def test_static_phase_equals_the_cond(it):
    """train.static_phases: the step of the iteration's phase (`X2Model.phase`, Python branches) gives the losses
    and gradients of the `lax.cond` form."""
    model, params, active, batch = _setup(seed=4)

    class Static(_Settings):
        phase = model.phase(it, "fine")

    assert Static.phase == int(it > 5) and model.phase(it, "coarse") is None
    grad = lambda settings: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: _loss_with(model, p, active, batch, jnp.int32(it), settings), has_aux=True))(params)
    (l_c, t_c), g_c = grad(_Settings)
    (l_s, t_s), g_s = grad(Static)
    np.testing.assert_allclose(float(l_s), float(l_c), rtol=1e-6)
    for k in t_c:
        np.testing.assert_allclose(np.asarray(t_s[k]), np.asarray(t_c[k]), rtol=1e-6, atol=1e-9, err_msg=k)
    # Two programs, so two fusions and GEMM splits: the CPU agrees to 1e-5 of each gradient's largest entry; on a GPU
    # the split-K GEMMs and the field kernel's atomic plane-gradient sums reorder more (H200: decoder kernel 7.7e-7
    # against a largest entry of 0.041, 1.9e-5 of it; one plane grid 2.7e-7 against 2.6e-3, 1.03e-4 of it), so 5e-4
    # there: a wrong phase or branch moves a gradient by its own size.
    rel = 1e-5 if jax.default_backend() == "cpu" else 5e-4
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_s)[0], jax.tree.leaves(g_c)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        assert float(jnp.max(jnp.abs(a - b))) <= rel * scale, jax.tree_util.keystr(path)


def _loss_with(model, params, active, batch, it, settings):
    canonical = gaussians_from_params(params, active, None)
    key = jax.random.PRNGKey(3)
    deformed, cache = model.view_gaussians(params, {}, canonical, batch["time"], key, it, settings)
    main = jnp.mean(jax.vmap(lambda g, c, im: jnp.mean(jnp.abs(_render(g, c) - im)))(
        deformed, batch["camera"], batch["image"]))
    extra, terms = model.extra_losses(params, {}, active, batch, key, it, settings, _render, cache)
    return main + extra, terms


@pytest.mark.slow  # an end-to-end train.py run (~1 min on 2 CPU cores); the phases' equality is tested above
def test_static_phases_compile_one_step_per_phase_and_split_calls(tmp_path):
    """The loop with train.static_phases: one fine-stage step function per phase, and no call spans the switch."""
    import json

    from configs import x2_gaussian
    from x2gs_jax import train_lib

    config = x2_gaussian.get_config("tiny")
    config.data.cache_dir = str(tmp_path / "cache")
    config.train.iterations = 4
    config.train.coarse_iterations = 0  # straight into the fine stage (one compilation less)
    config.loss.periodic_start = 2
    config.train.static_phases = True
    config.densify.enabled = False
    config.eval.iterations = (4,)
    config.checkpoint.every = 4
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    compiles = [(r["step"], r["fine_stage"], r["phase"]) for r in records if r["kind"] == "compile"]
    assert compiles == [(1, 1.0, 0.0), (3, 1.0, 1.0)], compiles
    steps = sorted(r["step"] for r in records if r["kind"] == "train")
    assert steps == [1, 2, 3, 4], steps


@pytest.mark.slow  # two end-to-end train.py runs (~2 min on 2 CPU cores); the registry itself: test_step_functions.py
def test_background_compile_prefetches_the_next_phase_and_changes_nothing(tmp_path):
    """train.background_compile: the fine stage's functions are compiled by the worker ahead of use (coarse -> fine,
    phase 0 -> phase 1), and the run ends with exactly the parameters of the run that compiles in the loop."""
    import json

    from configs import x2_gaussian
    from x2gs_jax import train_lib

    def run(name, background):
        config = x2_gaussian.get_config("tiny")
        config.data.cache_dir = str(tmp_path / "cache")
        config.train.iterations = 6
        config.train.coarse_iterations = 2
        config.loss.periodic_start = 4
        config.train.static_phases = True
        config.train.background_compile = background
        config.compile_cache_dir = ""  # both runs compile
        config.densify.enabled = False
        config.eval.iterations = (6,)
        config.checkpoint.every = 6
        train_lib.train_and_evaluate(config, str(tmp_path / name))
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        compiles = [(r["step"], r["fine_stage"], r["phase"], r["background"]) for r in records if r["kind"] == "compile"]
        timing = [r for r in records if r["kind"] == "timing"][-1]
        return compiles, timing, np.load(tmp_path / name / "export" / "gaussians.npz")

    c0, t0, g0 = run("loop", False)
    c1, t1, g1 = run("background", True)
    assert c0 == [(1, 0.0, -1.0, 0), (3, 1.0, 0.0, 0), (5, 1.0, 1.0, 0)], c0
    assert c1 == [(1, 0.0, -1.0, 0), (3, 1.0, 0.0, 1), (5, 1.0, 1.0, 1)], c1
    assert "compile_wait_s" in t1 and "compile_wait_s" not in t0
    for k in g0.files:
        np.testing.assert_array_equal(g0[k], g1[k], err_msg=k)
