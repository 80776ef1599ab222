"""Static (R2-Gaussian) reconstruction of a 3D case: the coarse stage of X2-Gaussian on its own.

  python train.py --config=configs/r2_static.py --workdir=runs/r2 --config.data.path=case.pickle
  python train.py --config=configs/r2_static.py:demo --workdir=runs/r2_demo   # CPU, a few minutes
  python train.py --config=configs/r2_static.py:tiny --workdir=/tmp/r2_tiny     # smoke test, seconds

With no data path, a static phantom case (128^3 GT, 256^2 detector, 50 noiseless views over 360 deg) is
generated once and cached.
"""
from configs.common import base_config


def get_config(arg=None):
    c = base_config()
    c.model.kind = "static"
    c.data.phantom.breathing = "static"
    c.data.phantom.views = 50
    c.data.phantom.val_views = 25
    if arg == "demo":
        c.data.phantom.update(dict(size=64, detector=96, views=50, val_views=10))
        c.data.init.n_points = 10000
        c.train.pad_short_calls = False  # CPU-sized: a masked iteration costs a fraction of a second here
        c.train.iterations = 600
        c.train.coarse_iterations = 600
        for group in c.optim.lr.values():
            group.max_steps = 600
        c.densify.until_iter = 450
        c.densify.from_iter = 100
        c.eval.iterations = (1, 300, 600)
        c.checkpoint.every = 300
    elif arg == "tiny":  # smoke tests: seconds on a CPU
        c.data.phantom.update(dict(size=24, detector=32, views=24, val_views=4))
        c.data.init.n_points = 1500
        c.train.pad_short_calls = False  # CPU-sized
        c.train.iterations = 20
        c.train.coarse_iterations = 20
        c.densify.from_iter = 5
        c.densify.interval = 5
        c.densify.until_iter = 16
        c.loss.tv_vol_size = 8
        c.eval.iterations = (20,)
        c.checkpoint.every = 10
        c.log.every = 1
        c.log.tensorboard = False
    elif arg:
        raise ValueError(f"configs/r2_static.py: unknown variant {arg!r} (known: demo, tiny)")
    return c
