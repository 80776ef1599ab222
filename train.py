"""Train an X2-Gaussian / R2-Gaussian model.

  python train.py --config=configs/x2_gaussian.py --workdir=runs/x2
  python train.py --config=configs/r2_static.py:demo --workdir=runs/r2_demo
  python train.py --config=configs/x2_gaussian.py --workdir=runs/x2 --config.data.path=case.pickle
  python train.py --config=configs/x2_gaussian.py --workdir=runs/x2 --config.resume=runs/x2   # continue
  python train.py --config=configs/x2_gaussian.py --workdir=runs/x2 --config.overwrite=true  # start over

Any config key can be overridden with --config.<key>=<value>; unknown keys fail. A --workdir that already holds a
run is refused unless --config.resume names it or --config.overwrite=true moves it aside.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from x2gs_jax import train_lib
from x2gs_jax.checkpoint import CheckpointError
from x2gs_jax.data.naf import DataError
from x2gs_jax.models import ConfigError
from x2gs_jax.run_dir import RunDirError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, exports).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    try:
        train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, RunDirError, DataError) as err:
        # What the user asked for cannot work: the message says why and what is allowed (no traceback).
        raise app.UsageError(str(err)) from err
    except (train_lib.NonFiniteError, CheckpointError) as err:
        # The run stopped on bad values or unreadable checkpoints: the message names the iteration or step.
        sys.exit(f"train.py: {err}")


if __name__ == "__main__":
    app.run(main)
