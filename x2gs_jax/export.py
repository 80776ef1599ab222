"""Run outputs: the final volumes (npy + NIfTI) and the inference export, written by the trainer and read by the
evaluator (the export format lives here, below both).

export/
  gaussians.npz     raw Gaussian parameters (xyz, scaling, rotation, density), the active mask, and the period tau
                    when the model has one
  model_state.npz   the model's non-trained state (e.g. PhysX anchors and KNN binding), when it has any
  <key>/            every other parameter pytree of the model (X2 "field", PhysX "anchor_net"), orbax
  meta.json         config, scanner, scene scale, step, scale bound
"""
from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from x2gs_jax.data.naf import Case
from x2gs_jax.fileio import atomic_write_bytes
from x2gs_jax.train_state import GAUSSIAN_KEYS, TrainState
from x2gs_jax.volume_export import write_phase_series, write_volume_files

PERIOD_KEY = "period"  # a scalar parameter stored in gaussians.npz (X2's tau)


def save_outputs(workdir: str, report: dict, case: Case, times_s=None) -> None:
    """The final evaluation's volumes (μ, the model's units): volumes/vol_pred_T{k}.npy|.nii.gz per phase and
    volumes/vol_pred_4d.nii.gz (all phases, time = the fourth axis) for 4D cases; volume.npy|.nii.gz for static ones.

    times_s: [P] the phases' times in seconds (4D); the 4D file is written when they are equally spaced.
    """
    vols = report["volumes"]
    if case.is_4d:
        os.makedirs(os.path.join(workdir, "volumes"), exist_ok=True)
        for k, v in enumerate(vols):
            write_volume_files(os.path.join(workdir, "volumes", f"vol_pred_T{k}"), v, case.scanner)
        write_phase_series(os.path.join(workdir, "volumes", "vol_pred_4d.nii.gz"), vols, times_s, case.scanner)
    else:
        write_volume_files(os.path.join(workdir, "volume"), vols[0], case.scanner)


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def array_keys(params: dict) -> list[str]:
    """The model's single-array parameters (the period τ, PhysX-Boosted's balance τ_α and ρ): stored in
    gaussians.npz beside the Gaussians (orbax's standard save takes pytrees, not lone arrays)."""
    return [k for k in params if k not in GAUSSIAN_KEYS and hasattr(params[k], "shape")]


def pytree_keys(params: dict) -> list[str]:
    """The parameter keys exported as orbax pytrees: everything but the Gaussians and the single arrays."""
    return [k for k in params if k not in GAUSSIAN_KEYS and not hasattr(params[k], "shape")]


def export_inference(workdir: str, state: TrainState, config, case: Case, writer: bool = True) -> None:
    """The inference export (module docstring): Gaussians, the model's parameters and state, config, scanner.

    Multi-process runs call it on every process with the replicated state: orbax's saves need every process (it
    writes once), the other files are written by the `writer` process alone."""
    import orbax.checkpoint as ocp

    out = os.path.join(workdir, "export")
    if writer:
        os.makedirs(out, exist_ok=True)
        flat = {"active": state.active, **{k: state.params[k] for k in GAUSSIAN_KEYS}}
        flat.update({k: state.params[k] for k in array_keys(state.params)})
        atomic_write_bytes(os.path.join(out, "gaussians.npz"), _npz_bytes(flat))
        if state.model_state:
            atomic_write_bytes(os.path.join(out, "model_state.npz"), _npz_bytes(state.model_state))
    for k in pytree_keys(state.params):
        # Host copies: the export records no device layout (a tree saved from N devices restores anywhere).
        with ocp.StandardCheckpointer() as ckptr:  # context: waits for the async write to finish
            ckptr.save(os.path.abspath(os.path.join(out, k)), jax.device_get(state.params[k]), force=True)
    if not writer:
        return
    meta = {"config": json.loads(config.to_json_best_effort()), "scanner": {k: (v.tolist() if hasattr(v, "tolist") else v)
            for k, v in case.scanner.to_naf().items()}, "scene_scale": case.scanner.scene_scale,
            "step": int(state.step), "scale_bound": state.scale_bound}
    atomic_write_bytes(os.path.join(out, "meta.json"), json.dumps(meta, indent=2).encode())


class ExportError(FileNotFoundError):
    """A file of the inference export is missing or incomplete (the message names it)."""


def load_export(export: str, model, case: Case) -> tuple[dict, dict, np.ndarray, dict]:
    """(params, model_state, active, meta) of an inference export written by `export_inference`.

    The model's parameter pytrees are restored into the structure of `model.init_params` (so their shapes must
    match the run's config). Raises ExportError naming the missing file or key.
    """
    import orbax.checkpoint as ocp

    meta_path = os.path.join(export, "meta.json")
    if not os.path.exists(meta_path):
        raise ExportError(f"{meta_path}: missing")
    with open(meta_path) as f:
        meta = json.load(f)
    path = os.path.join(export, "gaussians.npz")
    if not os.path.exists(path):
        raise ExportError(f"{path}: missing")
    with np.load(path) as z:
        flat = {k: z[k] for k in z.files}
    need = list(GAUSSIAN_KEYS) + ["active"]
    missing = [k for k in need if k not in flat]
    if missing:
        raise ExportError(f"{path}: keys {missing} missing (expected {need} [+ the model's single-array parameters])")
    params = {k: jnp.asarray(flat[k]) for k in GAUSSIAN_KEYS}
    template = model.init_params(jax.random.PRNGKey(0), case)
    for k in array_keys(template):
        if k not in flat:
            raise ExportError(f"{path}: the {model.kind} model's '{k}' is missing")
        params[k] = jnp.asarray(flat[k])
    for k in pytree_keys(template):
        sub = os.path.abspath(os.path.join(export, k))
        if not os.path.isdir(sub):
            raise ExportError(f"{sub}: the {model.kind} model's '{k}' parameters are missing from the export")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template[k])
        with ocp.StandardCheckpointer() as ckptr:
            params[k] = ckptr.restore(sub, abstract)
    model_state = {}
    state_path = os.path.join(export, "model_state.npz")
    if os.path.exists(state_path):
        with np.load(state_path) as z:
            model_state = {k: jnp.asarray(z[k]) for k in z.files}
    return params, model_state, np.asarray(flat["active"]), meta
