"""Dense, static-shape volume segmentation primitives (jit- and vmap-able): shifts, erosion, in-plane border
fill, connected components by label propagation, fixed-bin histograms, Otsu's split and smoothed histogram
modes. Used by `x2gs_jax.tidal` for the lung segmentation.

Volumes and masks are [nx, ny, nz] (z = axial); nothing here depends on the units of the values. Connectivity
(components, the border fill) is max-propagation by segmented scans along the axes (`run_max`), repeated in a
`lax.while_loop` until nothing changes (under vmap: until every member has converged); a pass is 2 scans per axis
and 2-3 passes sufficed on the test anatomies with noise, so the cost is a small number of dense passes and no
gather (slow on XLA's CPU backend). Histograms are int32 scatter-adds (native integer atomics on GPUs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Otsu / mode histogram resolution: 256 bins over the volume's robust range (0.1 %..99.9 % quantiles) resolve
# ~0.4 % of that range, far below the lung-tissue contrast (tens of % of it) in any unit.
HIST_BINS = 256
# Bins of the coarse [min, max] histogram whose quantiles give the robust range.
RANGE_BINS = 1024
RANGE_QUANTILE = 1e-3
# Scatter-adds on GPUs are atomics, and atomics to one address serialise: one histogram of a 128^3 volume, whose
# air fills a few bins, took 0.6 ms, and one component-size count (a lung's or the body's voxels all adding to one
# label) 1.1 ms, together half of the segmentation (H200 profile of the tidal curve, 2026-12-03, BENCHMARKS.md).
# On accelerators the histograms therefore count into HIST_COUNTERS // bins private copies (voxel k into copy
# k mod copies) summed at the end, and component sizes add run lengths along z (`component_sizes`). XLA's CPU
# scatter is a serial loop without atomics: there the plain scatter is kept (less work).
HIST_COUNTERS = 1 << 18
# Gaussian smoothing (in bins) before taking a histogram mode: tames per-bin count noise of small or noisy
# volumes (a 48^3 lung has a few thousand voxels) while moving a clean peak by well under a bin.
MODE_SMOOTH_BINS = 3.0


def shift(mask: jax.Array, axis: int, step: int, fill) -> jax.Array:
    """mask shifted by `step` (+1 or -1) voxels along `axis`, the vacated layer set to `fill`."""
    n = mask.shape[axis]
    pad = [(0, 0)] * mask.ndim
    pad[axis] = (1, 0) if step > 0 else (0, 1)
    padded = jnp.pad(mask, pad, constant_values=fill)
    start = 0 if step > 0 else 1
    return jax.lax.slice_in_dim(padded, start, start + n, axis=axis)


def erode(mask: jax.Array, voxels: int) -> jax.Array:
    """3D erosion of a bool mask by `voxels` steps of the 6-neighbourhood (outside the array = False)."""
    for _ in range(int(voxels)):
        out = mask
        for axis in range(mask.ndim):
            for step in (1, -1):
                out = out & shift(mask, axis, step, False)
        mask = out
    return mask


def _by_backend(method: str, accelerator: str, cpu: str) -> str:
    """The one place the segmentation picks an algorithm by backend: `method` itself, or for "auto" the `cpu`
    one on XLA's CPU backend and the `accelerator` one elsewhere."""
    if method == "auto":
        return cpu if jax.default_backend() == "cpu" else accelerator
    if method not in (accelerator, cpu):
        raise ValueError(f"method must be 'auto', {accelerator!r} or {cpu!r}, got {method!r}")
    return method


def _run_max_associative(values: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    def combine(a, b):  # a precedes b; b's flag: b is linked all the way back to a's first voxel
        va, la = a
        vb, lb = b
        return jnp.where(lb, jnp.maximum(va, vb), vb), la & lb

    out = values
    for direction in (1, -1):
        linked = mask & shift(mask, axis, direction, False)  # the voxel and its predecessor are both in mask
        v, _ = jax.lax.associative_scan(combine, (values, linked), axis=axis, reverse=direction < 0)
        out = jnp.maximum(out, v)
    return out


def _run_max_sequential(values: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    v, m = jnp.moveaxis(values, axis, 0), jnp.moveaxis(mask, axis, 0)
    zero = jnp.zeros((), values.dtype)

    def step(running, xs):  # running: the max of the current run up to the previous voxel (0 after a gap)
        vi, mi = xs
        cur = jnp.where(mi, jnp.maximum(vi, running), zero)
        return cur, cur

    _, fwd = jax.lax.scan(step, jnp.zeros_like(v[0]), (v, m))
    _, bwd = jax.lax.scan(step, jnp.zeros_like(v[0]), (v, m), reverse=True)
    return jnp.moveaxis(jnp.maximum(fwd, bwd), 0, axis)


def run_max(values: jax.Array, mask: jax.Array, axis: int, method: str = "auto") -> jax.Array:
    """values replaced, inside `mask`, by their maximum over the voxel's run of consecutive `mask` voxels along
    `axis` (values outside `mask` must be the dtype's minimum, 0 / False, and are returned unchanged).

    A forward and a backward segmented max-scan, so a run of any length is covered at once. method: "associative"
    (`lax.associative_scan`, O(log n) dense levels: few kernel launches on accelerators), "sequential" (`lax.scan`
    over the axis: on XLA's CPU backend 1.6x faster and ~4x quicker to compile, but one step per voxel of the
    axis), or "auto" (sequential when jax.default_backend() is "cpu"). Both are exact and give identical results
    (tests/test_lung_segmentation.py). No gathers: those are slow on XLA's CPU backend.
    """
    if _by_backend(method, "associative", "sequential") == "sequential":
        return _run_max_sequential(values, mask, axis)
    return _run_max_associative(values, mask, axis)


def propagate_max(values: jax.Array, mask: jax.Array, axes=(0, 1, 2), method: str = "auto") -> jax.Array:
    """The maximum of `values` over each connected component of `mask` (connectivity: face neighbours along
    `axes`), written to every voxel of the component; 0 / False outside `mask`.

    Each pass sweeps `run_max` along every axis in turn (each sweep starts from the previous one's result), so a
    value crosses a whole component in as many passes as its path needs turns between axes (2-3 on the
    anatomies of tests/test_lung_segmentation.py, noise included), not one voxel per pass. The loop stops after a
    pass whose sweeps after the first changed nothing: the first sweep's result is then stable under every axis
    (`run_max` is idempotent), so no extra pass is spent confirming convergence. method: as in `run_max`.
    """
    zero = jnp.zeros((), values.dtype)
    values = jnp.where(mask, values, zero)

    def one_pass(state):
        v, _ = state
        v = run_max(v, mask, axes[0], method)
        changed = jnp.array(False)
        for axis in axes[1:]:
            new = run_max(v, mask, axis, method)
            changed = changed | jnp.any(new != v)
            v = new
        return v, changed

    out, _ = jax.lax.while_loop(lambda s: s[1], one_pass, (values, jnp.array(True)))
    return out


def inplane_border_fill(passable: jax.Array, method: str = "auto") -> jax.Array:
    """bool [nx, ny, nz]: voxels of `passable` reachable from the x/y border of their axial slice through
    `passable` (4-connected in-plane; slices are independent). method: as in `run_max`."""
    border = jnp.zeros(passable.shape, bool)
    border = border.at[0].set(True).at[-1].set(True).at[:, 0].set(True).at[:, -1].set(True)
    return propagate_max(passable & border, passable, axes=(0, 1), method=method)


def label_components(mask: jax.Array, method: str = "auto") -> jax.Array:
    """int32 [nx, ny, nz]: 6-connected components of `mask`; each voxel gets 1 + the largest flat (C-order) index
    in its component, background 0 (`propagate_max` of the voxel indices)."""
    n = mask.size
    if n >= 2**31 - 1:
        raise ValueError(f"label_components: {n} voxels overflow int32 labels")
    idx = jnp.arange(1, n + 1, dtype=jnp.int32).reshape(mask.shape)
    return propagate_max(jnp.where(mask, idx, 0), mask, method=method)


def component_sizes(labels: jax.Array, method: str = "auto") -> jax.Array:
    """int32 [..., nz]: the voxel count of each voxel's component (`label_components` output), 0 on background.

    method: "scatter" (each voxel adds 1 to its label's counter), "runs" (each run of equal labels along the last
    axis adds its length once, at its last voxel: as many atomic adds to a label as its component has runs, not
    voxels), or "auto" (scatter on XLA's CPU backend, runs elsewhere; see HIST_COUNTERS). Both are exact.
    """
    method = _by_backend(method, "runs", "scatter")
    flat = labels.reshape(-1)
    n = flat.shape[0]
    if method == "scatter":
        counts = jnp.zeros(n + 1, jnp.int32).at[flat].add(1).at[0].set(0)
        return counts[flat].reshape(labels.shape)
    axis = labels.ndim - 1
    z = jax.lax.broadcasted_iota(jnp.int32, labels.shape, axis)
    differs = labels != shift(labels, axis, 1, -1)  # the previous voxel along z has another label (or is outside)
    start = jax.lax.cummax(jnp.where(differs, z, 0), axis=axis)  # first voxel of the voxel's run
    last = labels != shift(labels, axis, -1, -1)  # the run's last voxel
    target = jnp.where(last & (labels > 0), labels, n + 1).reshape(-1)  # n + 1: out of range, dropped
    counts = jnp.zeros(n + 1, jnp.int32).at[target].add((z - start + 1).reshape(-1), mode="drop")
    return counts[flat].reshape(labels.shape)


def largest_component(mask: jax.Array) -> jax.Array:
    """bool [nx, ny, nz]: the largest 6-connected component of `mask` (ties: the one with the larger label);
    all False when `mask` is empty."""
    lab = label_components(mask)
    size = component_sizes(lab)
    best = jnp.max(jnp.where(size == jnp.max(size), lab, 0))
    return mask & (lab == best)


def large_components(mask: jax.Array, min_fraction: float) -> jax.Array:
    """bool [nx, ny, nz]: the 6-connected components of `mask` holding at least `min_fraction` x the voxels of
    its largest component (a fraction, so the rule does not depend on the voxel size)."""
    size = component_sizes(label_components(mask))
    floor = jnp.asarray(min_fraction, jnp.float32) * jnp.max(size).astype(jnp.float32)
    return mask & (size.astype(jnp.float32) >= floor)


def histogram(values: jax.Array, lo, hi, bins: int, weights=None, copies: int | None = None) -> jax.Array:
    """int32 [bins]: counts of `values` on `bins` equal bins over [lo, hi]; values outside fall in the end bins.
    `weights`: optional bool/int mask of the same shape (only those voxels are counted). copies: private copies
    the counts are spread over and summed (None: 1 on XLA's CPU backend, HIST_COUNTERS // bins elsewhere); the
    result does not depend on it."""
    width = jnp.maximum(hi - lo, jnp.finfo(jnp.float32).tiny) / bins
    i = jnp.clip(jnp.floor((values - lo) / width), 0, bins - 1).astype(jnp.int32).reshape(-1)
    w = jnp.ones(i.shape, jnp.int32) if weights is None else weights.reshape(-1).astype(jnp.int32)
    if copies is None:
        copies = 1 if _by_backend("auto", "copies", "one") == "one" else max(1, HIST_COUNTERS // bins)
    copies = int(min(max(copies, 1), i.shape[0]))
    if copies == 1:
        return jnp.zeros(bins, jnp.int32).at[i].add(w)
    copy = jnp.arange(i.shape[0], dtype=jnp.int32) % copies
    return jnp.zeros(copies * bins, jnp.int32).at[copy * bins + i].add(w).reshape(copies, bins).sum(0)


def robust_range(values: jax.Array, q: float = RANGE_QUANTILE, bins: int = RANGE_BINS):
    """(lo, hi): the q and 1 - q quantiles of `values`, to a 1/bins of [min, max] (bin edges taken outward),
    so isolated outliers (a streak, a hot voxel) do not stretch the histogram used for the thresholds."""
    vmin, vmax = jnp.min(values), jnp.max(values)
    h = histogram(values, vmin, vmax, bins)
    cdf = jnp.cumsum(h) / jnp.maximum(jnp.sum(h), 1)
    width = jnp.maximum(vmax - vmin, jnp.finfo(jnp.float32).tiny) / bins
    lo_bin = jnp.argmax(cdf > q)  # first bin whose cumulative share exceeds q
    hi_bin = jnp.argmax(cdf >= 1.0 - q)
    lo = vmin + lo_bin * width
    hi = vmin + (hi_bin + 1) * width
    return lo, jnp.maximum(hi, lo + width)


def otsu_bin(hist: jax.Array) -> jax.Array:
    """Index k maximising Otsu's between-class variance for the split {bins <= k} | {bins > k} (int32 scalar)."""
    p = hist.astype(jnp.float32) / jnp.maximum(jnp.sum(hist), 1).astype(jnp.float32)
    k = jnp.arange(hist.shape[0], dtype=jnp.float32)
    omega = jnp.cumsum(p)
    mu = jnp.cumsum(p * k)
    var_b = (mu[-1] * omega - mu) ** 2 / jnp.maximum(omega * (1.0 - omega), 1e-12)
    var_b = jnp.where((omega > 0) & (omega < 1), var_b, -1.0)
    return jnp.argmax(var_b).astype(jnp.int32)


def smooth_hist(hist: jax.Array, sigma_bins: float = MODE_SMOOTH_BINS) -> jax.Array:
    """float32 [bins]: `hist` convolved with a normalised Gaussian of `sigma_bins` (zero beyond the ends)."""
    r = int(3 * sigma_bins + 0.5)
    x = jnp.arange(-r, r + 1, dtype=jnp.float32)
    kernel = jnp.exp(-0.5 * (x / sigma_bins) ** 2)
    return jnp.convolve(hist.astype(jnp.float32), kernel / jnp.sum(kernel), mode="same")


def mode_bins(hist: jax.Array, split_bin) -> tuple[jax.Array, jax.Array]:
    """(low, high): the bins of the smoothed histogram's peak at or below `split_bin` and the one above it."""
    h = smooth_hist(hist)
    k = jnp.arange(hist.shape[0])
    low = jnp.argmax(jnp.where(k <= split_bin, h, -1.0))
    high = jnp.argmax(jnp.where(k > split_bin, h, -1.0))
    return low, high


__all__ = ["HIST_BINS", "HIST_COUNTERS", "shift", "erode", "run_max", "propagate_max", "inplane_border_fill",
           "label_components", "component_sizes", "largest_component", "large_components", "histogram",
           "robust_range", "otsu_bin", "smooth_hist", "mode_bins"]
