"""Train an X2-Gaussian / R2-Gaussian model (`x2gs-train`, `python train.py`).

  x2gs-train --config=configs/x2_gaussian.py --workdir=runs/x2
  x2gs-train --config=configs/r2_static.py:demo --workdir=runs/r2_demo
  x2gs-train --config=configs/x2_gaussian.py --workdir=runs/x2 --config.data.path=case.pickle
  x2gs-train --config=configs/r2_static.py --workdir=runs/r2 --config.data.path=<R2-Gaussian case folder>
  x2gs-train --config=configs/x2_gaussian.py --workdir=runs/x2 --config.resume=runs/x2   # continue
  x2gs-train --config=configs/x2_gaussian.py --workdir=runs/x2 --config.overwrite=true  # start over

Any config key can be overridden with --config.<key>=<value>; unknown keys fail. A --workdir that already holds a
run is refused unless --config.resume names it or --config.overwrite=true moves it aside.
"""
import sys

from absl import app, flags, logging

_FLAGS = {}


def define_flags() -> None:
    """The absl flags of this command (defined once per process, when the command starts)."""
    if _FLAGS:
        return
    from ml_collections import config_flags

    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                                       lock_config=True)
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, exports).")
    flags.mark_flags_as_required(["config", "workdir"])


def warn_if_cpu() -> str:
    """A one-line warning when JAX computes on the CPU (no GPU backend found); returns the backend's name."""
    import jax

    backend = jax.default_backend()
    if backend == "cpu":
        logging.warning("JAX backend: cpu (no GPU found): training will be slow; the :demo and :tiny config variants "
                        "are sized for CPUs (a GPU needs a CUDA build of jax, README 'Install')")
    return backend


def main(argv):
    from x2gs_jax import train_lib
    from x2gs_jax.checkpoint import CheckpointError
    from x2gs_jax.data.naf import DataError
    from x2gs_jax.models import ConfigError
    from x2gs_jax.run_dir import RunDirError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    warn_if_cpu()
    try:
        train_lib.train_and_evaluate(_FLAGS["config"].value, _FLAGS["workdir"].value)
    except (ConfigError, RunDirError, DataError) as err:
        # What the user asked for cannot work: the message says why and what is allowed (no traceback).
        raise app.UsageError(str(err)) from err
    except (train_lib.NonFiniteError, CheckpointError) as err:
        # The run stopped on bad values or unreadable checkpoints: the message names the iteration or step.
        sys.exit(f"train.py: {err}")


def run() -> None:
    """The `x2gs-train` console entry point."""
    from x2gs_jax.cli import launch

    launch(__doc__, define_flags, _FLAGS, main, configs_from_argv=True)


if __name__ == "__main__":
    run()
