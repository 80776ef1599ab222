"""Evaluate a trained X2-Gaussian / R2-Gaussian run: metrics, baselines, tidal curve, pictures, exports (the same
command as the installed `x2gs-eval`).

  python eval.py --workdir=runs/x2                              # the run's inference export
  python eval.py --workdir=runs/x2 --step=-1                    # its latest checkpoint instead
  python eval.py --workdir=runs/x2 --data=case.pickle --tidal_points=600 --export_times=0.0,0.025
  python eval.py --workdir=runs/x2 --export_times=0.0025 --units=hu --mu_water=0.5

Writes <workdir>/eval/: metrics.json, tidal.csv, tidal.png, slices_T{k}.png, breathing.gif + breathing.mp4,
projections.png, export/vol_t{t}.npy|.nii.gz, export/phases_4d.nii.gz (4D runs); prints a short table.
"""
from x2gs_jax.cli.eval import main, run  # noqa: F401  (main: for callers that drive it with absl themselves)

if __name__ == "__main__":
    run()
