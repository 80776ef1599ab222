"""Defaults shared by every config file (the reference's R2-Gaussian / X2-Gaussian values).

Each config file in this folder is one `get_config(arg)` that starts from `base_config()` and changes
what its method needs; the docstring of each shows its launch command.
"""
import ml_collections


def lr(init: float, final: float, max_steps: int = 30000) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(init=init, final=final, max_steps=max_steps))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.resume = ""  # a run directory to continue exactly from its newest intact checkpoint
    # A --workdir that already holds a run is refused; True moves that run aside (renamed, not deleted) and starts over.
    c.overwrite = False
    # JAX's persistent compilation cache (x2gs_jax/compile_cache.py): "auto" = $X2GS_COMPILE_CACHE or
    # <$X2GS_CACHE or ~/.cache/x2gs_jax>/xla; "" = off; else a directory. A repeated run loads its compiled steps.
    c.compile_cache_dir = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # a NAF/X2GS *.pickle; empty = the embedded phantom below (generated once, cached)
    c.data.cache_dir = ""  # where the embedded phantom is cached; empty = $X2GS_CACHE or ~/.cache/x2gs_jax
    c.data.phantom = ml_collections.ConfigDict(dict(
        breathing="regular",  # "static" (3D case), "regular" or "irregular"
        size=128, detector=256, views=300, val_views=50, period_s=3.0, noise=0.0, seed=0,
        box_mm=300.0))  # side of the cubic reconstruction box (voxel size = box_mm / size)
    c.data.init = ml_collections.ConfigDict(dict(
        method="fdk", n_points=50000, density_thresh=0.05, density_rescale=0.15, seed=0))

    c.model = ml_collections.ConfigDict()
    c.model.kind = "static"
    # Scale activation: bounded sigmoid (R2) when both bounds > 0 (fractions of the volume size V),
    # otherwise exp (X2).
    c.model.scale_min = 0.0005
    c.model.scale_max = 0.5
    c.model.initial_capacity_factor = 1.25  # capacity = factor * initial points (grows by doubling)
    # ... rounded up to a multiple of this: on a GPU, XLA pads the decoder's activations (rows = capacity x times)
    # to a multiple of 1024 for its split-K weight-gradient GEMMs (H200 profile, 2026-12-03: every pad fusion of
    # the fine step, ~0.75 ms/it at 200k); doubling keeps the multiple. 1 = no rounding.
    c.model.capacity_multiple = 1024
    # When densification needs more slots than the buffers have, they grow (by doubling) to hold at least
    # headroom x the needed number: a burst of densification then costs one re-allocation and one
    # recompilation of the step instead of several (capped at densify.max_num_gaussians).
    c.model.capacity_headroom = 1.5

    c.train = ml_collections.ConfigDict()
    c.train.iterations = 30000
    c.train.coarse_iterations = 30000  # static (coarse) stage length of 4D models; static models ignore it (one stage)
    c.train.views_per_step = 1  # the global batch of views of a step (its loss: their mean); 1 = the reference
    # Iterations per jitted call (lax.scan): removes per-iteration host round trips. Calls also end at
    # densify, evaluation and checkpoint iterations, so results do not depend on this value.
    c.train.steps_per_call = 50
    # A shorter call inside a stage (the evaluation after iteration 1, the redo after a pair-buffer overflow) runs the
    # stage's full-length function padded with masked iterations instead of compiling its own (train_step.call_length):
    # right where a compilation costs seconds and an iteration milliseconds (GPUs); the CPU variants turn it off.
    c.train.pad_short_calls = True
    # One step function per phase of a stage (`DeformationModel.phase`; X2: before / after the periodic render
    # starts) instead of a `lax.cond` inside the differentiated step: no zero-filled residuals of the branch not
    # taken, at the cost of one more compilation (H200, X2 fine step at 200k / 512²: 12.16 -> 9.77 ms/it; BENCHMARKS.md,
    # Training, item 7). The CPU-sized variants turn it off (a compilation costs a minute there).
    c.train.static_phases = True
    # Compile the step function of the next static phase / of the fine stage in a background thread while the
    # current one trains (x2gs_jax/step_functions.py): H200, :ref64 with model.initial_capacity_factor=5.1 too (no
    # buffer growth, whose recompilations cannot be foreseen), the compilation the loop waits for 49.4 -> 6.6 s and
    # the run 157.0 -> 117.4 s (BENCHMARKS.md, Training, item 8); with the defaults alone (no sizing flag) the loop
    # waits 17.8 s and the run takes 135.8 s (item 10). The CPU-sized variants turn it off (the worker would share two
    # cores with the training).
    c.train.background_compile = True

    c.loss = ml_collections.ConfigDict(dict(
        lambda_dssim=0.25, lambda_tv=0.05, tv_vol_size=32,
        tv_culling="extent",  # "extent" (R2) or "center" (the X2 voxelizer variant)
        tv_mean_grad="true",  # "true" or "reference_h2" (reproduces the reference voxelizer bug)
    ))

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = ml_collections.ConfigDict(dict(
        xyz=lr(2e-4, 2e-5), density=lr(1e-2, 1e-3), scaling=lr(5e-3, 5e-4), rotation=lr(1e-3, 1e-4)))
    # Generic per-group controls, e.g. --config.optim.controls='{"xyz": {"freeze_until": 1000}}'.
    c.optim.controls = ml_collections.ConfigDict()

    c.densify = ml_collections.ConfigDict(dict(
        enabled=True, interval=100, from_iter=500, until_iter=15000, grad_threshold=5e-5,
        scale_threshold=0.1,  # fraction of V
        density_min=1e-5, max_num_gaussians=500000))

    # backend: "auto" (Triton on a GPU, else the pure-JAX reference), "reference" or "triton".
    # max_pairs: initial rasterizer pair buffer per view (0 = backend default); grows on overflow.
    c.render = ml_collections.ConfigDict(dict(backend="auto", max_pairs=0))

    # Data-parallel training (x2gs_jax/parallel.py, README "Several devices and hosts"): each step's
    # train.views_per_step views are split over `devices` devices of every process (-1: all local devices); the
    # state is replicated. distributed=True calls jax.distributed.initialize() first: coordinator_address
    # ("host:port" of process 0), num_processes and process_id, each from $JAX_COORDINATOR_ADDRESS,
    # $JAX_NUM_PROCESSES, $JAX_PROCESS_ID when left at "", 0, -1, else detected from the cluster (Slurm, Open MPI).
    c.parallel = ml_collections.ConfigDict(dict(devices=1, distributed=False, coordinator_address="",
                                                num_processes=0, process_id=-1))

    c.eval = ml_collections.ConfigDict(dict(iterations=(1, 5000, 10000, 20000, 30000), max_val_views=50))
    # Attenuation of water in the volumes' units, for `eval.py --units=hu`: the embedded phantom's soft tissue
    # (x2gs_jax.data.phantom.MU_SOFT); data in other units need their own value.
    c.eval.mu_water = 0.5
    # verify_writes: read each checkpoint back after writing it and compare its checksums (~+80 % per save on the
    # dev CPU; false leaves the check to the resume, which falls back to an older step on a damaged one)
    # background: the write and the read-back run in a thread while training goes on (a failure stops the run at
    # the next call, naming the step); false blocks the loop until the save is written and verified.
    c.checkpoint = ml_collections.ConfigDict(dict(every=2000, keep=3, verify_writes=True, background=True))
    c.log = ml_collections.ConfigDict(dict(every=20, tensorboard=True))
    return c
