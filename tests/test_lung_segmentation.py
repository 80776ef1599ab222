"""Unit-free lung segmentation (issue 17): the dense primitives against scipy, the thresholds' invariance to the
units, and the tidal curve on the embedded phantom and on a second, differently built chest (tests/lung_cases.py)
at density scales 0.5x-3x, noiseless and with Gaussian noise of 10 % of the tissue-lung contrast, against the
exact lung volumes. Run with -s to see the figures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import lung_cases as L
from x2gs_jax import segment as seg
from x2gs_jax import tidal
from x2gs_jax.data.breathing import BreathingSignal
from x2gs_jax.data.generate import geometry_mm
from x2gs_jax.data.phantom import MU_LUNG, MU_SOFT, ThoraxPhantom
from x2gs_jax.geometry import Scanner

N = 48
SCALES = (0.5, 1.0, 3.0)
NOISE = (0.0, 0.1)  # std as a fraction of the tissue-lung contrast
STATES = (0.0, 0.2, 0.45, 0.7, 0.9, 1.0)  # anatomy B breathing states


# --------------------------------------------------------------------------------------- dense primitives
def test_label_components_match_scipy():
    """Two random masks of a non-cubic grid, labelled in one vmapped call: the same partition as scipy's 3D
    face-connected labelling, each component labelled 1 + its largest flat index, with either scan (the
    accelerators' associative one and the CPU's sequential one); the size rule likewise (`largest_component` is
    the body rule, tested on the couch below)."""
    shape = (33, 20, 17)
    rng = np.random.default_rng(0)
    masks = np.stack([rng.random(shape) < p for p in (0.45, 0.6)])
    fns = jax.jit(jax.vmap(lambda m: (seg.label_components(m, "sequential"), seg.large_components(m, 0.3),
                                      seg.label_components(m, "associative"))))
    labs, larges, labs_assoc = (np.asarray(x) for x in fns(jnp.asarray(masks)))
    np.testing.assert_array_equal(labs_assoc, labs)
    flat = np.arange(masks[0].size).reshape(shape)
    for m, lab, large in zip(masks, labs, larges):
        ref, k = ndimage.label(m)
        assert k > 3 and np.all(lab[~m] == 0)
        for c in range(1, k + 1):
            assert set(np.unique(lab[ref == c])) == {flat[ref == c].max() + 1}
        sizes = np.concatenate([[0], np.bincount(ref.ravel())[1:]])
        np.testing.assert_array_equal(large, m & (sizes[ref] >= 0.3 * sizes.max()))


def test_component_sizes_by_runs_equal_the_scatter_count():
    """The accelerators' run-length count (one add per run along z) against the per-voxel scatter and numpy's
    bincount: random masks labelled by `label_components`, vmapped, with components that touch either z end."""
    shape = (9, 14, 23)
    rng = np.random.default_rng(3)
    masks = np.stack([rng.random(shape) < p for p in (0.3, 0.55, 0.8)])
    masks[0, :, :, -1] = True  # runs ending at the last voxel along z
    masks[1, :, :, 0] = True  # and starting at the first
    fn = jax.jit(jax.vmap(lambda m: (seg.label_components(m, "sequential"),
                                     seg.component_sizes(seg.label_components(m, "sequential"), "runs"),
                                     seg.component_sizes(seg.label_components(m, "sequential"), "scatter"))))
    labs, runs, scat = (np.asarray(x) for x in fn(jnp.asarray(masks)))
    np.testing.assert_array_equal(runs, scat)
    for lab, size in zip(labs, runs):
        want = np.bincount(lab.ravel(), minlength=lab.size + 1)
        want[0] = 0
        np.testing.assert_array_equal(size, want[lab])
        assert size.max() > 50 and np.all(size[lab == 0] == 0)
    with pytest.raises(ValueError, match="method"):
        seg.component_sizes(jnp.asarray(labs[0]), "sort")


def test_histogram_copies_do_not_change_the_counts():
    rng = np.random.default_rng(4)
    x = jnp.asarray(np.concatenate([np.full(5000, 0.05), rng.random(3001)]).astype(np.float32))  # a crowded bin
    w = jnp.asarray(rng.random(x.shape[0]) < 0.7)
    for weights in (None, w):
        one = np.asarray(seg.histogram(x, 0.0, 1.0, 64, weights, copies=1))
        for copies in (2, 7, 1024, 10**6):
            np.testing.assert_array_equal(np.asarray(seg.histogram(x, 0.0, 1.0, 64, weights, copies=copies)), one)
        assert one.sum() == (x.shape[0] if weights is None else int(w.sum()))


def test_inplane_border_fill_matches_scipy():
    m = np.random.default_rng(1).random((20, 24, 6)) < 0.62
    got = np.asarray(seg.inplane_border_fill(jnp.asarray(m), "sequential"))
    np.testing.assert_array_equal(np.asarray(seg.inplane_border_fill(jnp.asarray(m), "associative")), got)
    want = np.zeros_like(m)
    for z in range(m.shape[2]):
        ref, _ = ndimage.label(m[:, :, z])  # 2D 4-connectivity
        edge = np.unique(np.concatenate([ref[0], ref[-1], ref[:, 0], ref[:, -1]]))
        want[:, :, z] = np.isin(ref, edge[edge > 0])
    np.testing.assert_array_equal(got, want)
    assert 0 < got.sum() < m.sum()


def test_histogram_range_and_otsu():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0.1, 0.02, 3000), rng.normal(0.6, 0.05, 7000), [25.0]]).astype(np.float32)

    @jax.jit
    def stats(x):
        h = seg.histogram(x, 0.0, 1.0, 50)
        k = seg.otsu_bin(h)
        return h, seg.robust_range(x), k, seg.mode_bins(h, k)

    h, (lo, hi), k, (low, high) = jax.tree.map(np.asarray, stats(jnp.asarray(x)))
    np.testing.assert_array_equal(h, np.histogram(np.clip(x, 0, 1 - 1e-6), bins=50, range=(0, 1))[0])
    assert lo <= np.quantile(x, 1e-3) and hi >= np.quantile(x, 1 - 1e-3) and hi < 1.0  # the outlier is cut off
    c = np.arange(50.0)  # brute-force Otsu: the split of maximal between-class variance
    var = [h[:j + 1].sum() * h[j + 1:].sum() * ((h[:j + 1] @ c[:j + 1]) / max(h[:j + 1].sum(), 1)
                                                - (h[j + 1:] @ c[j + 1:]) / max(h[j + 1:].sum(), 1)) ** 2
           for j in range(49)]
    assert int(k) == int(np.argmax(var)) and 0.15 < (k + 1) / 50 < 0.5
    assert abs((low + 0.5) / 50 - 0.1) <= 0.02 and abs((high + 0.5) / 50 - 0.6) <= 0.02


# ------------------------------------------------------------------------------------------------ test cases
@pytest.fixture(scope="module")
def anatomy_b():
    data = [L.chest_b(N, s) for s in STATES]
    return np.stack([d[0] for d in data]), np.array([d[1] for d in data]), data[0][2]


@pytest.fixture(scope="module")
def embedded():
    """The embedded phantom's exact volumes at 0, 0.3, ..., 1.5 s (end-exhale to end-inhale) and the closed-form
    lungs + airways volume."""
    sc = Scanner.from_naf(geometry_mm(N, 32))
    ph = ThoraxPhantom.default(BreathingSignal(period_s=3.0))
    times = np.arange(6) * 0.3 / ph.scan_s
    vols = np.stack([ph.volume_at(float(t), sc, supersample=3) for t in times])
    return vols, tidal.phantom_gt_curve_ml(ph.breathing, times, sc), sc.d_voxel_mm


def _noisy(vols, scale, noise, contrast, seed=0):
    rng = np.random.default_rng(seed)
    return (vols * scale + rng.normal(0.0, noise * contrast * scale, vols.shape)).astype(np.float32)


def _check_curve(name, ml, gt, scale, noise):
    r = tidal.curve_agreement(ml, gt)
    mean_err = np.mean(ml) / np.mean(gt) - 1
    print(f"\n{name} scale {scale} noise {noise:.0%}: corr {r['tidal_corr']:.4f}, mean {np.mean(ml):.0f} vs "
          f"{np.mean(gt):.0f} mL ({mean_err:+.1%}), p2p {r['tidal_amplitude_ml']:.0f} vs "
          f"{r['tidal_amplitude_gt_ml']:.0f} mL ({r['tidal_amplitude_rel_error']:.1%})")
    assert r["tidal_corr"] >= 0.98
    assert abs(mean_err) <= 0.10
    assert r["tidal_amplitude_rel_error"] <= 0.15


# ------------------------------------------------------------------------------------------------ acceptance
@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("scale", SCALES)
def test_tidal_curve_anatomy_b(anatomy_b, scale, noise):
    vols, gt, mm = anatomy_b
    ml, thr = L.lung_ml(_noisy(vols, scale, noise, L.MU["tissue"] - L.MU["lung"]), mm)
    _check_curve("anatomy B", ml, gt, scale, noise)
    # The threshold sits between the lungs and the soft tissue in every unit: near their midpoint (0.175 x scale).
    np.testing.assert_allclose(thr / scale, 0.5 * (L.MU["lung"] + L.MU["tissue"]), atol=0.02)


@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("scale", SCALES)
def test_tidal_curve_embedded_phantom(embedded, scale, noise):
    vols, gt, mm = embedded
    ml, thr = L.lung_ml(_noisy(vols, scale, noise, MU_SOFT - MU_LUNG), mm)
    _check_curve("embedded", ml, gt, scale, noise)
    np.testing.assert_allclose(thr / scale, 0.5 * (MU_LUNG + MU_SOFT), atol=0.02)


def test_manual_threshold_override(anatomy_b, embedded):
    """lung_threshold=<number> is the old fixed recipe: it still reproduces the embedded phantom at its own units
    (within 2 %), and on anatomy B at 0.6x it finds no lung (the failure of issue 17) where auto does."""
    vols, gt, mm = embedded
    ml, thr = L.lung_ml(vols, mm, lung_threshold=0.285)
    np.testing.assert_allclose(ml, gt, rtol=0.02)
    assert np.all(thr == np.float32(0.285))
    vols_b, gt_b, mm_b = anatomy_b
    fixed, _ = L.lung_ml(vols_b * 0.6, mm_b, lung_threshold=0.285)
    auto, _ = L.lung_ml(vols_b * 0.6, mm_b)
    assert np.all(fixed < 0.05 * gt_b)
    np.testing.assert_allclose(auto, gt_b, rtol=0.05)


def test_thresholds_are_unit_free(anatomy_b):
    """Any positive affine change of units (x0.5, x3, mu -> HU with mu_water = 0.29) moves the thresholds with it
    and leaves the masks unchanged (the histograms are taken over each volume's own quantile range)."""
    vols, _, _ = anatomy_b
    v = _noisy(vols[2:3], 1.0, 0.1, L.MU["tissue"] - L.MU["lung"], seed=3)[0]
    maps = [(1.0, 0.0), (0.5, 0.0), (3.0, 0.0), (1000.0 / 0.29, -1000.0)]
    lungs, body, thr = L.segment(np.stack([a * v + b for a, b in maps]))
    for i, (a, b) in enumerate(maps):
        assert thr[i] == pytest.approx(a * thr[0] + b, rel=1e-4, abs=1e-3 * a)
        assert np.sum(lungs[i] != lungs[0]) <= 1e-3 * lungs[0].sum()
        assert np.sum(body[i] != body[0]) <= 1e-3 * body[0].sum()


def test_couch_and_gas_pockets_are_not_lung(anatomy_b):
    """The couch (outside the body, enclosing air) is left out of the body mask by the largest-component rule, and
    the abdominal gas pockets (0.27 % of the larger lung) are dropped by the component-size rule: both stay out of
    the lungs."""
    vols, _, _ = anatomy_b
    v = _noisy(vols[:1], 1.0, 0.1, L.MU["tissue"] - L.MU["lung"])
    reg = L.regions(N)
    lungs, body, thr = L.segment(v)
    assert not np.any(body[0] & reg["couch"]) and not np.any(lungs[0] & (reg["couch"] | reg["pockets"]))
    # Without those rules they would be counted. The slice fill alone encloses the couch's hollow (checked with
    # scipy: in every axial slice the hollow's air does not reach the slice border) ...
    air = v[0] < thr[0]
    for z in range(0, N, 7):
        ref, _ = ndimage.label(air[:, :, z])
        edge = np.unique(np.concatenate([ref[0], ref[-1], ref[:, 0], ref[:, -1]]))
        hollow = ref[reg["hollow"][:, :, z]]
        assert np.any(hollow > 0) and not np.any(np.isin(hollow, edge[edge > 0]))
    # ... and every air voxel inside the body includes the pockets.
    all_air, _, _ = L.segment(v, min_component_fraction=0.0)
    assert np.any(all_air[0] & reg["pockets"]) and all_air[0].sum() > lungs[0].sum()


def test_batch_members_are_independent(embedded):
    """vmap over times: a volume segments the same alone in a batch (copies of itself) as beside other volumes."""
    vols, _, mm = embedded
    ml, thr = L.lung_ml(vols, mm)
    for i in (0, 5):
        alone, t_alone = L.lung_ml(np.repeat(vols[i:i + 1], L.BATCH, axis=0), mm)
        assert np.all(alone == ml[i]) and np.all(t_alone == thr[i])


def test_accelerator_and_cpu_paths_segment_identically(embedded, monkeypatch):
    """Everything `segment` picks by backend (associative vs sequential scans, histogram copies, run-length vs
    per-voxel component sizes) gives the same masks and thresholds: the accelerators' choices, forced here on the
    CPU, against the CPU's, on noisy embedded-phantom volumes."""
    vols, _, _ = embedded
    noisy = jnp.asarray(_noisy(vols[:2], 1.0, 0.1, MU_SOFT - MU_LUNG, seed=5))
    run = lambda: jax.tree.map(np.asarray, jax.jit(jax.vmap(lambda v: tidal.segment_lungs(v)))(noisy))
    cpu = run()
    monkeypatch.setattr(seg.jax, "default_backend", lambda: "gpu")
    gpu = run()
    assert "cummax" in str(jax.make_jaxpr(lambda v: tidal.segment_lungs(v))(noisy[0]))  # the run-length path ran
    for a, b in zip(cpu, gpu):
        np.testing.assert_array_equal(a, b)
    assert cpu[0].sum() > 1000
