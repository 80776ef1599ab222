"""Evaluate a trained X2-Gaussian / R2-Gaussian run: metrics, baselines, tidal curve, pictures, exports
(`x2gs-eval`, `python eval.py`).

  x2gs-eval --workdir=runs/x2                              # the run's inference export
  x2gs-eval --workdir=runs/x2 --step=-1                    # its latest checkpoint instead
  x2gs-eval --workdir=runs/x2 --data=case.pickle --tidal_points=600 --export_times=0.0,0.025
  x2gs-eval --workdir=runs/x2 --export_times=0.0025 --units=hu --mu_water=0.5

Writes <workdir>/eval/: metrics.json, tidal.csv, tidal.png, slices_T{k}.png, breathing.gif + breathing.mp4,
projections.png, export/vol_t{t}.npy|.nii.gz, export/phases_4d.nii.gz (4D runs); prints a short table.
"""
from absl import app, flags, logging

_FLAGS = {}


def define_flags() -> None:
    """The absl flags of this command (defined once per process, when the command starts)."""
    if _FLAGS:
        return
    from x2gs_jax import tidal

    f = _FLAGS
    f["workdir"] = flags.DEFINE_string("workdir", None, "Run directory written by train.py (config.json, export/, "
                                       "checkpoints/).")
    f["data"] = flags.DEFINE_string("data", None, "Case to evaluate on: a NAF/X2GS pickle or an R2-Gaussian case "
                                    "folder (default: the run's config data.path or its cached embedded phantom). Its "
                                    "scanner must match export/meta.json.")
    f["step"] = flags.DEFINE_integer("step", None, "Evaluate the checkpoint of this step instead of the inference "
                                     "export (-1: the latest checkpoint).")
    f["tidal"] = flags.DEFINE_integer("tidal_points", 600, "Times of the lung-volume curve over the whole scan (4D; "
                                      "0: skip).")
    f["no_pics"] = flags.DEFINE_bool("no_pictures", False, "Do not write PNG/GIF/MP4 pictures.")
    f["export"] = flags.DEFINE_list("export_times", [], "Normalised times (seconds / scan length, the pickle's `time`) "
                                    "whose volumes are written as .npy and .nii.gz (3D runs: the volume is always "
                                    "written; 4D runs: the phase volumes always, as one 4D NIfTI).")
    f["units"] = flags.DEFINE_enum("units", "mu", ["mu", "hu"], "Value units of the exported volumes: mu = the "
                                   "attenuation as trained (the GT volume's units); hu = Hounsfield units, "
                                   "1000 (mu - mu_water) / mu_water. Metrics and pictures stay in mu.")
    f["mu_water"] = flags.DEFINE_float("mu_water", None, "Attenuation of water in the volume's units, for --units=hu "
                                       "(default: the run config's eval.mu_water, else the embedded phantom's soft "
                                       "tissue, 0.5).")
    f["baselines"] = flags.DEFINE_bool("baselines", True, "Compute the static FDK and phase-binned 4D-FDK baselines.")
    f["lung"] = flags.DEFINE_float("lung_threshold", None, "Lung segmentation: a fixed air threshold (mu below it is "
                                   "air, in the volume's units) for the body and the lungs. Default: chosen per volume "
                                   "from its own histogram (midpoint of the lung and soft-tissue peaks; see "
                                   "x2gs_jax/tidal.py).")
    f["erode"] = flags.DEFINE_integer("erode_voxels", tidal.ERODE_VOXELS, "Lung segmentation: erosion of the body "
                                      "mask before taking the air inside it (voxels; drops the skin's partial-volume "
                                      "rim).", lower_bound=0)
    f["min_comp"] = flags.DEFINE_float("lung_min_component", tidal.MIN_COMPONENT_FRACTION, "Lung segmentation: keep "
                                       "air components inside the body holding at least this fraction of the largest "
                                       "one (0 keeps every air voxel).", lower_bound=0.0, upper_bound=1.0)
    f["chunk"] = flags.DEFINE_integer("chunk", 8, "Times per vmapped volume query (memory vs speed).")
    f["gif"] = flags.DEFINE_integer("gif_frames", 12, "Frames of the breathing movies (GIF and MP4; one learned "
                                    "period).")
    f["views"] = flags.DEFINE_integer("proj_views", 4, "Val views in projections.png.")
    f["cycles"] = flags.DEFINE_list("cycles", [], "Also evaluate the phases of these breathing cycles (0 = the first, "
                                    "the reference convention) against the phantom's exact volumes (cases made by "
                                    "x2gs_jax.data.generate only), e.g. --cycles=0,5,10,19.")
    flags.mark_flags_as_required(["workdir"])


def main(argv):
    from x2gs_jax import eval_lib
    from x2gs_jax.data.naf import DataError

    f = _FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        times = [float(t) for t in f["export"].value]
    except ValueError as err:
        raise app.UsageError(f"--export_times: expected comma-separated numbers, got {f['export'].value}") from err
    try:
        cycles = [int(c) for c in f["cycles"].value]
    except ValueError as err:
        raise app.UsageError(f"--cycles: expected comma-separated integers, got {f['cycles'].value}") from err
    mu_water = f["mu_water"].value
    if mu_water is not None and not mu_water > 0:
        raise app.UsageError(f"--mu_water: expected a positive attenuation (the volume's units), got {mu_water}")
    try:
        eval_lib.evaluate_run(f["workdir"].value, data=f["data"].value, step=f["step"].value,
                              tidal_points=f["tidal"].value, pictures=not f["no_pics"].value, export_times=times,
                              baselines=f["baselines"].value, lung_threshold=f["lung"].value,
                              erode_voxels=f["erode"].value, chunk=f["chunk"].value, gif_frames=f["gif"].value,
                              proj_views=f["views"].value, cycles=cycles, min_component_fraction=f["min_comp"].value,
                              units=f["units"].value, mu_water=mu_water)
    except (eval_lib.RunError, eval_lib.MismatchError, DataError) as err:
        # A missing/damaged run or data of another case: the message names the file (no traceback).
        raise app.UsageError(str(err)) from err


def run() -> None:
    """The `x2gs-eval` console entry point."""
    from x2gs_jax.cli import launch

    launch(__doc__, define_flags, _FLAGS, main)


if __name__ == "__main__":
    run()
