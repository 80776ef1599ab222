"""Robustness datasets of the PhysX-Boosted fork (physx.md §6, reference `tools/create_robustness_datasets.py`):
a case with perturbed acquisition times ("phase noise") or with a subset of its training views ("sparse views").

  python -m x2gs_jax.data.robustness --data case.pickle --phase_noise 0.15 [--seed 42] [--output out.pickle]
  python -m x2gs_jax.data.robustness --data case.pickle --view_ratio 0.5 --view_strategy uniform|random|phase_balanced
  add --generate_init to also write the new case's initial point cloud (init_<stem>.npy beside the output),
  --overwrite to replace existing outputs.

Exactly one of --phase_noise / --view_ratio per call. Default outputs, beside the input:
`<base>_noise{σ}.pickle` (e.g. case_noise0.15.pickle) and `<base>_sparse{100·r}.pickle` (e.g. case_sparse50.pickle),
`<base>` = the input's basename without its extension.

* Phase noise σ_rel: P = number of distinct train phases, noise std = σ_rel / P (σ_rel is a fraction of one phase
  bin). Train times get i.i.d. N(0, std²), are clipped to [0, 1 - 1e-6], and train phases become ⌊t·P⌋ (the time
  decile, no longer the breathing phase: the reference does the same). Val times/phases get the same treatment with
  the next draws of the same random stream. Projections, angles and GT volumes are unchanged.
* Sparse views r: n_keep = ⌊n_train·r⌋ train views, chosen "uniform" (int cast of linspace(0, n_train-1, n_keep)),
  "random" (sorted draw without replacement) or "phase_balanced" (⌊n_keep/P⌋ random views of every phase). Val is
  unchanged.

Randomness: one `numpy.random.default_rng(--seed)` stream per call, so the draws differ from the reference's legacy
`np.random.seed(42)` stream; their distribution is the same. The input file is only read; the output is written
atomically through `naf.save_case` (validated as `load_case` would) and records what was done in its
`robustness` key (a list, one entry per operation, so chained operations stay traceable).

User errors (bad flags, unreadable case, refused overwrite) print one line naming the flag/file and exit with
status 2.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np
from absl import flags

from x2gs_jax.data.naf import Case, DataError, Split, init_path, load_case, save_case

STRATEGIES = ("uniform", "random", "phase_balanced")
# Upper clip of the perturbed times: keeps ⌊t·P⌋ <= P - 1 and times inside the scan's [0, 1) (reference value).
TIME_MAX = 1.0 - 1e-6
CASE_EXTENSIONS = (".pickle", ".pkl")  # what the trainer's reader accepts (data_format.md §1)
META_KEY = "robustness"


class RobustnessError(ValueError):
    """An operation cannot be applied to this case with these arguments; the message says why."""


# ===================================================================================== library
def _phase_count(case: Case, what: str) -> tuple[np.ndarray, int]:
    """(distinct train phases, their number P). P comes from the train split, as in the reference."""
    if case.train.phases is None:
        raise RobustnessError(f"{what} needs phase labels, but this case is 3D (image [nx, ny, nz], no "
                              "train time/phase)")
    phases = np.unique(case.train.phases)
    if phases.size == 0:
        raise RobustnessError(f"{what} needs training views, but the case has none")
    return phases, int(phases.size)


def _append_record(meta: dict, entry: dict) -> dict:
    """Deep copy of `meta` with `entry` appended to meta['robustness'] (a list: operations can be chained)."""
    meta = copy.deepcopy(meta)
    prev = meta.get(META_KEY)
    if prev is None:
        records = []
    elif isinstance(prev, list):
        records = list(prev)
    else:  # something foreign under our key: keep it rather than drop it
        records = [prev]
    meta[META_KEY] = records + [entry]
    return meta


def perturb_phases(case: Case, sigma_rel: float, rng: np.random.Generator) -> Case:
    """Add Gaussian noise to the acquisition times of a 4D case (physx.md §6 "phase perturbation").

    Args:
      case: a 4D case (`case.is_4d`): train/val `times` [n] float64 (normalised, seconds / scan length) and
        `phases` [n] int64.
      sigma_rel: noise level relative to one phase bin (> 0, finite); the std in normalised time is
        sigma_rel / P, P = number of distinct train phases (10 for X2GS cases: 0.15 -> std 0.015, ~0.9 s of a
        60 s scan).
      rng: the generator; draws n_train normals for train, then n_val for val (that order, like the reference).
    Returns:
      A new Case: times = clip(times + noise, 0, 1 - 1e-6) [n] float64, phases = ⌊times·P⌋ [n] int64 (the time
      decile, as in the reference, not the breathing phase) for both splits; projections, angles, volumes and
      scanner are the input's arrays (shared, not copied: treat them as read-only); meta is deep-copied with an
      entry appended to meta['robustness'].
    Raises:
      RobustnessError: sigma_rel not > 0 / not finite, or a 3D case (no times to perturb).
    """
    sigma_rel = float(sigma_rel)
    if not (math.isfinite(sigma_rel) and sigma_rel > 0):
        raise RobustnessError(f"phase noise must be a finite number > 0, got {sigma_rel}")
    if not case.is_4d:
        raise RobustnessError("phase noise needs a 4D case (image [P, nx, ny, nz] with train/val time and phase); "
                              "this case is 3D (image [nx, ny, nz], no acquisition times)")
    _, n_phases = _phase_count(case, "phase noise")
    std = sigma_rel / n_phases

    def perturb(split: Split) -> Split:
        t = np.clip(split.times + rng.normal(0.0, std, size=len(split)), 0.0, TIME_MAX)
        # The minimum only matters for P > 1e6, where 1 - 1e-6 no longer keeps ⌊t·P⌋ below P.
        ph = np.minimum(np.floor(t * n_phases), n_phases - 1).astype(np.int64)
        return dataclasses.replace(split, times=t, phases=ph)

    train = perturb(case.train)  # train first, then val from the next draws (reference order)
    val = perturb(case.val)
    meta = _append_record(case.meta, {"operation": "phase_noise", "phase_noise": sigma_rel,
                                      "n_phases": n_phases, "noise_std": std, "time_clip": [0.0, TIME_MAX]})
    return dataclasses.replace(case, train=train, val=val, meta=meta)


def n_keep_of(n_train: int, ratio: float) -> int:
    """⌊n_train·ratio⌋, robust to binary rounding (100 · 0.29 is 28.999999999999996 in floating point)."""
    return int(math.floor(n_train * ratio + 1e-9))


def sparse_indices(case: Case, ratio: float, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices [n_kept] int64 of the train views kept by `sparse_views` (see there)."""
    ratio = float(ratio)
    if strategy not in STRATEGIES:
        raise RobustnessError(f"view strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not (math.isfinite(ratio) and 0 < ratio <= 1):
        raise RobustnessError(f"view ratio must satisfy 0 < ratio <= 1, got {ratio}")
    n = len(case.train)
    n_keep = n_keep_of(n, ratio)
    if n_keep < 1:
        raise RobustnessError(f"view ratio {ratio} keeps ⌊{n}·{ratio}⌋ = 0 of the {n} training views; "
                              f"it must be at least 1/{n} = {1 / n if n else float('inf'):.4g}")
    if strategy == "uniform":
        # Integer cast (truncation) of an evenly spaced grid, exactly as the reference; no random draws.
        return np.linspace(0, n - 1, n_keep).astype(np.int64)
    if strategy == "random":
        return np.sort(rng.choice(n, size=n_keep, replace=False)).astype(np.int64)
    phases, n_phases = _phase_count(case, "view strategy phase_balanced")
    per_phase = n_keep // n_phases
    if per_phase < 1:
        raise RobustnessError(f"view strategy phase_balanced keeps ⌊n_keep/P⌋ = ⌊{n_keep}/{n_phases}⌋ = 0 "
                              f"views per phase; the view ratio must keep at least {n_phases} views")
    picks = []
    for p in phases:  # ascending phase order; one draw per phase from the shared stream
        members = np.flatnonzero(case.train.phases == p)
        if members.size < per_phase:
            raise RobustnessError(f"view strategy phase_balanced needs {per_phase} views of every phase, but phase "
                                  f"{int(p)} has only {members.size}; lower the view ratio or use uniform/random")
        picks.append(rng.choice(members, size=per_phase, replace=False))
    # Sorted so the kept views stay in acquisition order.
    return np.sort(np.concatenate(picks)).astype(np.int64)


def take_train(case: Case, indices: np.ndarray) -> Case:
    """The case with only train views `indices` (angles, projections, times, phases subset; numTrain follows
    on save). Val, volumes and scanner are the input's; meta is deep-copied."""
    idx = np.asarray(indices, dtype=np.int64)
    tr = case.train
    train = Split(projections=tr.projections[idx], angles=tr.angles[idx],
                  times=None if tr.times is None else tr.times[idx],
                  phases=None if tr.phases is None else tr.phases[idx])
    return dataclasses.replace(case, train=train, meta=copy.deepcopy(case.meta))


def sparse_views(case: Case, ratio: float, strategy: str, rng: np.random.Generator) -> Case:
    """Keep a subset of the training views (physx.md §6 "sparse views").

    Args:
      case: a 3D or 4D case (phase_balanced needs 4D phase labels).
      ratio: fraction of train views to keep, 0 < ratio <= 1; n_keep = ⌊n_train·ratio⌋ must be >= 1.
      strategy: "uniform" (int cast of linspace(0, n_train - 1, n_keep); no draws), "random" (sorted choice of
        n_keep without replacement) or "phase_balanced" (⌊n_keep/P⌋ views drawn without replacement from each of
        the P distinct train phases, in ascending phase order, then sorted; it keeps P·⌊n_keep/P⌋ <= n_keep views).
      rng: the generator (unused by "uniform").
    Returns:
      A new Case whose train split is the kept rows ([n_kept, H, W] projections, [n_kept] angles/times/phases, in
      acquisition order); val, volumes and scanner are the input's arrays (shared); meta is deep-copied with an
      entry (including the kept indices) appended to meta['robustness'].
    Raises:
      RobustnessError: bad ratio/strategy, n_keep < 1, or phase_balanced on a 3D case or with a phase holding
        fewer than ⌊n_keep/P⌋ views (the message names the phase).
    """
    idx = sparse_indices(case, ratio, strategy, rng)
    out = take_train(case, idx)
    meta = _append_record(case.meta, {"operation": "sparse_views", "view_ratio": float(ratio),
                                      "view_strategy": strategy, "n_train_source": len(case.train),
                                      "n_train": int(idx.size), "indices": [int(i) for i in idx]})
    return dataclasses.replace(out, meta=meta)


def default_output(data: str, *, phase_noise: Optional[float] = None, view_ratio: Optional[float] = None) -> str:
    """The reference's output name beside the input: <base>_noise{σ}.pickle or <base>_sparse{int(100·r)}.pickle.

    <base> is the basename without its extension. σ is written as Python prints the float (0.15 -> "0.15",
    1 -> "1.0"); 100·r is rounded to 6 decimals before the int cast so 0.29 gives sparse29 (the reference's plain
    int(100·0.29) gives 28).
    """
    base = os.path.splitext(os.path.basename(data))[0]
    if phase_noise is not None:
        suffix = f"_noise{float(phase_noise)}"
    else:
        suffix = f"_sparse{int(round(100 * float(view_ratio), 6))}"
    return os.path.join(os.path.dirname(data), base + suffix + ".pickle")


# ===================================================================================== CLI
class _UsageError(Exception):
    """A user error of the CLI: printed as one line, exit status 2."""


def _define_flags() -> flags.FlagValues:
    """A fresh, private flag set: importing this module (or calling main twice) never touches absl's global
    FLAGS, whose --data is also defined by eval.py."""
    fv = flags.FlagValues()
    flags.DEFINE_string("data", None, "Input case pickle (NAF/X2GS *.pickle); only read, never modified.",
                        flag_values=fv)
    flags.DEFINE_float("phase_noise", None, "Relative time noise σ_rel > 0 (std = σ_rel / P in normalised time).",
                       flag_values=fv)
    flags.DEFINE_float("view_ratio", None, "Fraction 0 < r <= 1 of the training views to keep.", flag_values=fv)
    flags.DEFINE_enum("view_strategy", None, STRATEGIES, "How views are kept (with --view_ratio; default uniform).",
                      flag_values=fv)
    flags.DEFINE_integer("seed", 42, "Seed of the numpy Generator (>= 0).", flag_values=fv)
    flags.DEFINE_string("output", None, "Output pickle (default: <base>_noise{σ}.pickle / <base>_sparse{100r}.pickle "
                        "beside the input).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing output (and init file).", flag_values=fv)
    flags.DEFINE_bool("generate_init", False, "Also write the output's initial point cloud init_<stem>.npy beside it.",
                      flag_values=fv)
    # Defaults = config.data.init of configs/common.py (what the trainer would generate).
    flags.DEFINE_enum("init_method", "fdk", ("fdk", "random"), "Initial point cloud method.", flag_values=fv)
    flags.DEFINE_integer("init_n_points", 50000, "Initial points (>= 1).", flag_values=fv)
    flags.DEFINE_float("init_density_thresh", 0.05, "FDK value a voxel must exceed (>= 0).", flag_values=fv)
    flags.DEFINE_float("init_density_rescale", 0.15, "Initial density = FDK value × this (> 0).", flag_values=fv)
    flags.DEFINE_integer("init_seed", 0, "Seed of the initial point draw (>= 0).", flag_values=fv)
    return fv


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _check_args(fv: flags.FlagValues) -> tuple[str, Optional[str]]:
    """Validate flag combinations and paths before anything is loaded; returns (output, init path or None)."""
    if fv.data is None:
        raise _UsageError("--data is required (the input case pickle)")
    if not os.path.isfile(fv.data):
        raise _UsageError(f"--data: no such file {fv.data!r}")
    noise, ratio = fv.phase_noise, fv.view_ratio
    if (noise is None) == (ratio is None):
        raise _UsageError("exactly one of --phase_noise (σ_rel > 0) or --view_ratio (0 < r <= 1) is required, got "
                          + ("neither" if noise is None else f"both (--phase_noise={noise}, --view_ratio={ratio})"))
    if noise is not None:
        if not (math.isfinite(noise) and noise > 0):
            raise _UsageError(f"--phase_noise: must be a finite number > 0, got {noise}")
        if fv.view_strategy is not None:
            raise _UsageError("--view_strategy: only applies with --view_ratio, not with --phase_noise")
    elif not (math.isfinite(ratio) and 0 < ratio <= 1):
        raise _UsageError(f"--view_ratio: must satisfy 0 < r <= 1, got {ratio}")
    if fv.seed < 0:
        raise _UsageError(f"--seed: must be >= 0, got {fv.seed}")
    if fv.generate_init:
        if fv.init_n_points < 1:
            raise _UsageError(f"--init_n_points: must be >= 1, got {fv.init_n_points}")
        if not (math.isfinite(fv.init_density_thresh) and fv.init_density_thresh >= 0):
            # Negative thresholds admit voxels of density <= 0, which load_init_points refuses.
            raise _UsageError(f"--init_density_thresh: must be a finite number >= 0, got {fv.init_density_thresh}")
        if not (math.isfinite(fv.init_density_rescale) and fv.init_density_rescale > 0):
            raise _UsageError(f"--init_density_rescale: must be a finite number > 0, got {fv.init_density_rescale}")
        if fv.init_seed < 0:
            raise _UsageError(f"--init_seed: must be >= 0, got {fv.init_seed}")

    output = fv.output or default_output(fv.data, phase_noise=noise, view_ratio=ratio)
    flag = "--output" if fv.output else "default output"
    if not output.endswith(CASE_EXTENSIONS):
        raise _UsageError(f"--output: {output!r} must end in {' or '.join(CASE_EXTENSIONS)} (the trainer picks the "
                          "reader by extension)")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise _UsageError(f"{flag}: directory {out_dir!r} does not exist")
    if _same_file(output, fv.data):
        raise _UsageError(f"{flag}: {output!r} is the input file; the input is never overwritten")
    if os.path.exists(output) and not fv.overwrite:
        raise _UsageError(f"{flag}: {output!r} already exists; pass --overwrite to replace it")
    try:
        out_init = init_path(output)
    except DataError as e:
        raise _UsageError(f"{flag}: {e}") from None
    if os.path.realpath(out_init) == os.path.realpath(init_path(fv.data)):
        # The trainer finds a case's init by its stem (basename cut at the first dot): an output with the input's
        # stem in the input's folder would silently train from the input's point cloud (or clobber it).
        raise _UsageError(f"{flag}: {os.path.basename(output)!r} has the same case name (text before the first "
                          f"dot) as the input, so both would use {out_init!r}; choose another --output name")
    if fv.generate_init and os.path.exists(out_init) and not fv.overwrite:
        raise _UsageError(f"--generate_init: {out_init!r} already exists (the init file of every case named "
                          f"{os.path.basename(out_init)[5:-4]!r}, the text before the first dot of the output's "
                          "name); the trainer reuses it: omit --generate_init or pass --overwrite")
    return output, (out_init if fv.generate_init else None)


def _run(fv: flags.FlagValues) -> str:
    output, out_init = _check_args(fv)
    try:
        case = load_case(fv.data)
    except DataError as e:
        raise _UsageError(f"--data: {e}") from None
    rng = np.random.default_rng(fv.seed)
    strategy = fv.view_strategy or "uniform"
    flag = "--phase_noise" if fv.phase_noise is not None else f"--view_ratio={fv.view_ratio} --view_strategy={strategy}"
    try:
        if fv.phase_noise is not None:
            new = perturb_phases(case, fv.phase_noise, rng)
        else:
            new = sparse_views(case, fv.view_ratio, strategy, rng)
    except RobustnessError as e:
        raise _UsageError(f"{flag}: {fv.data}: {e}") from None
    # Provenance: which file and which stream produced this case (the draws are not the reference's).
    new.meta[META_KEY][-1].update({"source": os.path.basename(fv.data), "seed": int(fv.seed),
                                   "rng": "numpy.random.default_rng"})

    points = None
    if out_init is not None:  # computed before anything is written, so a failure leaves no half-made output
        from x2gs_jax.ct.init_pcd import init_points

        try:
            points = init_points(new, n_points=fv.init_n_points, density_thresh=fv.init_density_thresh,
                                 density_rescale=fv.init_density_rescale, method=fv.init_method,
                                 seed=fv.init_seed, name=os.path.basename(output), progress=False)
        except ValueError as e:
            raise _UsageError(f"--generate_init: {e}") from None
    try:
        save_case(output, new)
    except DataError as e:  # should not happen: the operations keep the case valid
        raise _UsageError(f"--output: {e}") from None
    msg = f"wrote {output} ({len(new.train)} train / {len(new.val)} val views)"
    if points is not None:
        from x2gs_jax.ct.init_pcd import save_points

        save_points(out_init, points)
        msg += f" and {out_init} ({len(points)} points, {fv.init_method})"
    return msg


def main(argv: Sequence[str]) -> int:
    """CLI entry: `argv` = [program, flags...] (as sys.argv). Returns the exit status: 0 done, 2 user error
    (one line on stderr naming the flag/file and what is allowed; no traceback)."""
    prog = "python -m x2gs_jax.data.robustness"
    fv = _define_flags()
    argv = list(argv)
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(__doc__ + "\nflags:\n" + fv.get_help())
        return 0
    try:
        try:
            rest = fv(argv)  # absl parse: type and enum errors raise flags.Error
        except flags.Error as e:
            raise _UsageError(str(e)) from None
        if len(rest) > 1:
            raise _UsageError(f"unexpected arguments: {rest[1:]} (all options are --flags)")
        print(f"{prog}: {_run(fv)}")
    except _UsageError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
