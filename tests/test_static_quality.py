"""A shrunken version of the static (R2-Gaussian) acceptance run: on a small static phantom with 50
noiseless views, Gaussian reconstruction beats FDK from the same views (the full-size run and its
figures are in README.md / BENCHMARKS.md)."""
import numpy as np
import pytest

from configs import r2_static
from x2gs_jax import train_lib
from x2gs_jax.ct.fdk import fdk
from x2gs_jax.data.naf import load_case
from x2gs_jax.metrics import volume_metrics_host


@pytest.mark.slow
def test_static_reconstruction_beats_fdk(tmp_path):
    config = r2_static.get_config("tiny")
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.phantom.update(dict(size=32, detector=48, views=50, val_views=4))
    config.data.init.n_points = 3000
    config.train.iterations = config.train.coarse_iterations = 400
    config.densify.update(dict(from_iter=100, interval=100, until_iter=301))
    config.loss.tv_vol_size = 16
    config.eval.iterations = (400,)
    config.checkpoint.every = 1000
    config.log.every = 100
    report = train_lib.train_and_evaluate(config, str(tmp_path / "run"))

    case = load_case(train_lib.resolve_case_path(config))
    fdk_psnr = volume_metrics_host(case.volumes, np.asarray(fdk(case.train.projections, case.scanner,
                                                                   case.train.angles)))["psnr_3d"]
    print(f"PSNR3D gaussians {report['psnr_3d_mean']:.2f} dB vs FDK {fdk_psnr:.2f} dB")
    assert report["psnr_3d_mean"] > fdk_psnr + 1.0
