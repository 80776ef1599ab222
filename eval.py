"""Evaluate a trained X2-Gaussian / R2-Gaussian run: metrics, baselines, tidal curve, pictures, exports.

  python eval.py --workdir=runs/x2                              # the run's inference export
  python eval.py --workdir=runs/x2 --step=-1                    # its latest checkpoint instead
  python eval.py --workdir=runs/x2 --data=case.pickle --tidal_points=600 --export_times=0.0,0.025

Writes <workdir>/eval/: metrics.json, tidal.csv, tidal.png, slices_T{k}.png, breathing.gif,
projections.png, export/vol_t{t}.npy|.nii.gz; prints a short table.
"""
from absl import app, flags, logging

from x2gs_jax import eval_lib, tidal
from x2gs_jax.data.naf import DataError

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py (config.json, export/, checkpoints/).")
_DATA = flags.DEFINE_string("data", None, "Case pickle to evaluate on (default: the run's config data.path or its "
                            "cached embedded phantom). Its scanner must match export/meta.json.")
_STEP = flags.DEFINE_integer("step", None, "Evaluate the checkpoint of this step instead of the inference export "
                             "(-1: the latest checkpoint).")
_TIDAL = flags.DEFINE_integer("tidal_points", 600, "Times of the lung-volume curve over the whole scan (4D; 0: skip).")
_NO_PICS = flags.DEFINE_bool("no_pictures", False, "Do not write PNG/GIF pictures.")
_EXPORT = flags.DEFINE_list("export_times", [], "Normalised times (seconds / scan length, the pickle's `time`) whose "
                            "volumes are written as .npy and .nii.gz (3D runs: the volume is always written).")
_BASELINES = flags.DEFINE_bool("baselines", True, "Compute the static FDK and phase-binned 4D-FDK baselines.")
_LUNG = flags.DEFINE_float("lung_threshold", None, "Lung segmentation: a fixed air threshold (mu below it is air, in "
                           "the volume's units) for the body and the lungs. Default: chosen per volume from its own "
                           "histogram (midpoint of the lung and soft-tissue peaks; see x2gs_jax/tidal.py).")
_ERODE = flags.DEFINE_integer("erode_voxels", tidal.ERODE_VOXELS, "Lung segmentation: erosion of the body mask before "
                              "taking the air inside it (voxels; drops the skin's partial-volume rim).", lower_bound=0)
_MIN_COMP = flags.DEFINE_float("lung_min_component", tidal.MIN_COMPONENT_FRACTION, "Lung segmentation: keep air "
                               "components inside the body holding at least this fraction of the largest one "
                               "(0 keeps every air voxel).", lower_bound=0.0, upper_bound=1.0)
_CHUNK = flags.DEFINE_integer("chunk", 8, "Times per vmapped volume query (memory vs speed).")
_GIF = flags.DEFINE_integer("gif_frames", 12, "Frames of the breathing GIF (one learned period).")
_VIEWS = flags.DEFINE_integer("proj_views", 4, "Val views in projections.png.")
_CYCLES = flags.DEFINE_list("cycles", [], "Also evaluate the phases of these breathing cycles (0 = the first, the "
                            "reference convention) against the phantom's exact volumes (cases made by "
                            "x2gs_jax.data.generate only), e.g. --cycles=0,5,10,19.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        times = [float(t) for t in _EXPORT.value]
    except ValueError as err:
        raise app.UsageError(f"--export_times: expected comma-separated numbers, got {_EXPORT.value}") from err
    try:
        cycles = [int(c) for c in _CYCLES.value]
    except ValueError as err:
        raise app.UsageError(f"--cycles: expected comma-separated integers, got {_CYCLES.value}") from err
    try:
        eval_lib.evaluate_run(_WORKDIR.value, data=_DATA.value, step=_STEP.value, tidal_points=_TIDAL.value,
                              pictures=not _NO_PICS.value, export_times=times, baselines=_BASELINES.value,
                              lung_threshold=_LUNG.value, erode_voxels=_ERODE.value, chunk=_CHUNK.value,
                              gif_frames=_GIF.value, proj_views=_VIEWS.value, cycles=cycles,
                              min_component_fraction=_MIN_COMP.value)
    except (eval_lib.RunError, eval_lib.MismatchError, DataError) as err:
        # A missing/damaged run or data of another case: the message names the file (no traceback).
        raise app.UsageError(str(err)) from err


if __name__ == "__main__":
    app.run(main)
