"""Train an X2-Gaussian / R2-Gaussian model (the same command as the installed `x2gs-train`).

  python train.py --config=configs/x2_gaussian.py --workdir=runs/x2
  python train.py --config=configs/r2_static.py:demo --workdir=runs/r2_demo
  python train.py --config=configs/x2_gaussian.py --workdir=runs/x2 --config.data.path=case.pickle
  python train.py --config=configs/r2_static.py --workdir=runs/r2 --config.data.path=<R2-Gaussian case folder>
  python train.py --config=configs/x2_gaussian.py --workdir=runs/x2 --config.resume=runs/x2   # continue
  python train.py --config=configs/x2_gaussian.py --workdir=runs/x2 --config.overwrite=true  # start over

Any config key can be overridden with --config.<key>=<value>; unknown keys fail. A --workdir that already holds a
run is refused unless --config.resume names it or --config.overwrite=true moves it aside.
"""
from x2gs_jax.cli.train import main, run  # noqa: F401  (main: for callers that drive it with absl themselves)

if __name__ == "__main__":
    run()
