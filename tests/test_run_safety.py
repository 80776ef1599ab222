"""Nothing lost, nothing silently wrong: a run directory that already holds a run is refused (and left byte-identical)
or moved aside; damaged newest checkpoints fall back to the newest intact one; config values that cannot work are
refused by key before any work; the initial point cloud is made again when what it was made from changed.

The runs are the session's two finished 4-iteration `r2_static:tiny` runs (conftest `tiny_static_runs`), copied
before anything changes them."""
import copy
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import physx, r2_static, x2_gaussian
from x2gs_jax import train_lib
from x2gs_jax.checkpoint import Checkpointer
from x2gs_jax.config_check import check_config, check_stages
from x2gs_jax.data.naf import DataError, load_case
from x2gs_jax.data.prepare import init_record_path, initial_points
from x2gs_jax.models import ConfigError
from x2gs_jax.run_dir import RunDirError, plan_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(directory) -> dict:
    """{relative path: sha256} of every file below `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, directory)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _copy_run(runs, tmp_path, name="run"):
    dest = tmp_path / name
    shutil.copytree(runs["runs"]["mp0"], dest)
    return dest


def _config(runs, **changes):
    config = copy.deepcopy(runs["config"])
    config.overwrite = False
    for key, value in changes.items():
        node = config
        *path, last = key.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    return config


def _largest_array_file(step_dir) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
             if os.sep + "d" + os.sep in os.path.join(r, f)]
    return max(files, key=os.path.getsize)


def _damage(step_dir, how: str) -> None:
    if how == "truncated":
        path = _largest_array_file(step_dir)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "metadata_deleted":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    elif how == "byte_flipped":  # restores without any error from orbax: only the checksums see it
        path = _largest_array_file(step_dir)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 3)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x40]))
    else:
        raise ValueError(how)


# ---------------------------------------------------------------------------------------------- run directories
@pytest.mark.slow
def test_a_second_run_into_a_finished_run_is_refused_and_changes_nothing(tiny_static_runs, tmp_path):
    run = _copy_run(tiny_static_runs, tmp_path)
    before = _snapshot(run)
    # A fresh train.py (shorter, as in the report): a usage error naming the ways on, no traceback, no change.
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                        "--config=" + os.path.join(ROOT, "configs/r2_static.py:tiny"), f"--workdir={run}",
                        f"--config.data.cache_dir={tiny_static_runs['cache']}", "--config.train.iterations=2",
                        "--config.eval.iterations=(2,)"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert f"--config.resume={run}" in r.stderr and "--config.overwrite=true" in r.stderr
    assert "new --workdir" in r.stderr and "Traceback" not in r.stderr
    assert _snapshot(run) == before
    # Resuming a finished run: no step to run, so nothing is evaluated, exported or rewritten.
    assert train_lib.train_and_evaluate(_config(tiny_static_runs, resume=str(run)), str(run)) == {}
    assert _snapshot(run) == before
    # Resuming with fewer iterations than the checkpoint holds: refused by key.
    with pytest.raises(ConfigError, match=r"train.iterations=2: .*step 4"):
        train_lib.train_and_evaluate(_config(tiny_static_runs, resume=str(run), train__iterations=2,
                                             eval__iterations=(2,)), str(run))
    assert _snapshot(run) == before
    # Nothing to resume from: refused, and no directory is created.
    empty, new = tmp_path / "empty", tmp_path / "new"
    empty.mkdir()
    with pytest.raises(ConfigError, match="config.resume=.*no checkpoint found"):
        train_lib.train_and_evaluate(_config(tiny_static_runs, resume=str(empty)), str(new))
    assert not new.exists()


def test_overwrite_moves_the_old_run_aside(tiny_static_runs):
    """conftest wrote "mp0" with config.overwrite=True over a directory holding an earlier run (and a file of the
    user's): that directory was renamed whole, byte-identical, and the new run's files are its own."""
    run, aside = tiny_static_runs["runs"]["mp0"], tiny_static_runs["aside"]
    assert len(aside) == 1
    assert {name: (aside[0] / name).read_bytes() for name in os.listdir(aside[0])} == tiny_static_runs["earlier"]
    assert not (run / "notes.txt").exists()
    assert json.loads((run / "config.json").read_text())["overwrite"] is True
    assert all(json.loads(line)["kind"] != "x" for line in (run / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(RunDirError, match="contradict"):
        plan_run_dir(str(run), str(run), True)


# ------------------------------------------------------------------------------------------------- checkpoints
def _template(runs):
    config = _config(runs)
    path = train_lib.resolve_case_path(config)
    case = load_case(path)
    points = initial_points(path, case, config)
    model = train_lib.make_model(config, case)
    return lambda meta: train_lib.template_state(config, case, points, model, meta)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_static_runs, tmp_path, capsys):
    template = _template(tiny_static_runs)
    for how in ("truncated", "metadata_deleted", "byte_flipped"):
        run = _copy_run(tiny_static_runs, tmp_path, how)
        _damage(run / "checkpoints" / "4", how)
        ckpt = Checkpointer(str(run), read_only=True)
        state, meta = ckpt.restore(template)
        err = capsys.readouterr().err
        assert int(state.step) == meta["step"] == 2, how
        assert [s for s, _ in ckpt.damaged] == [4], how
        assert f"checkpoint step 4 in {run / 'checkpoints'} is damaged" in err, (how, err)
        assert "restored checkpoint step 2, the newest intact one" in err, how
        ckpt.close()


def test_resume_past_a_damaged_checkpoint_continues_exactly(tiny_static_runs, tmp_path, capsys):
    """train.py --config.resume on a run whose newest checkpoint is truncated: it resumes from step 2, moves step 4
    aside (kept), trains 3..4 again and ends with exactly the parameters of the undamaged run."""
    run = _copy_run(tiny_static_runs, tmp_path)
    _damage(run / "checkpoints" / "4", "truncated")
    train_lib.train_and_evaluate(_config(tiny_static_runs, resume=str(run)), str(run))
    assert "checkpoint step 4" in capsys.readouterr().err
    a = np.load(tiny_static_runs["runs"]["mp0"] / "export" / "gaussians.npz")
    b = np.load(run / "export" / "gaussians.npz")
    for k in a.files:
        if jax.default_backend() == "cpu":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:  # GPU: the rasterizer's atomic float sums differ in order from run to run (H200: ≤ 2.3e-5 relative),
            # and where a gradient is near zero Adam's normalised step turns that into up to ~lr per step (H200: one
            # rotation entry of 7 500 off by 4.0e-6 after 2 steps, another time one of 8 192 by 5.9e-5). So: nearly
            # every entry equal to rtol 1e-4 / atol 1e-5, and none further off than the two redone Adam steps can
            # move it (2 x the largest learning rate, density's 1e-2).
            x, y = a[k].astype(np.float64), b[k].astype(np.float64)  # the active mask is bool
            close = np.isclose(x, y, rtol=1e-4, atol=1e-5)
            assert close.mean() >= 0.999, (k, close.mean())
            assert float(np.max(np.abs(x - y))) <= 2 * 1e-2, k
    assert sorted(Checkpointer(str(run), read_only=True).all_steps()) == [2, 4]
    assert [p.split("-")[0] for p in os.listdir(run / "damaged_checkpoints")] == ["4"]
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "resume"]
    assert resumed == [{"step": 2, "kind": "resume", "damaged_steps": [4.0]}]


def test_leaf_digests_see_every_bit_and_read_the_first_format():
    """The CRC-32 digest changes with any one flipped bit, with the dtype and with the shape; digests of the first
    format (BLAKE2, un-prefixed) are still compared with BLAKE2."""
    from x2gs_jax.checkpoint import _digest, _mismatch, leaf_checksums

    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(7, 3)).astype(np.float32), "b": {"c": np.arange(5, dtype=np.int32)}}
    ref = leaf_checksums(tree)
    assert all(d.startswith("crc32:") for d in ref.values()) and _mismatch(ref, tree) is None
    for leaf in ("a", "c"):
        for byte in range(0, tree["a"].nbytes if leaf == "a" else tree["b"]["c"].nbytes, 5):
            bad = copy.deepcopy(tree)
            arr = bad["a"] if leaf == "a" else bad["b"]["c"]
            arr.view(np.uint8).reshape(-1)[byte] ^= 1 << (byte % 8)
            assert _mismatch(ref, bad) is not None, (leaf, byte)
    assert leaf_checksums({"a": tree["a"].view(np.int32)})["['a']"] != ref["['a']"]  # same bytes, other dtype
    assert leaf_checksums({"a": tree["a"].reshape(3, 7)})["['a']"] != ref["['a']"]  # same bytes, other shape
    legacy = {k: _digest(np.asarray(v), "blake2b") for k, v in
              {"['a']": tree["a"], "['b']['c']": tree["b"]["c"]}.items()}
    assert not any(d.startswith("crc32:") for d in legacy.values())
    assert _mismatch(legacy, tree) is None
    flipped = copy.deepcopy(tree)
    flipped["a"][0, 0] += 1
    assert "['a']" in _mismatch(legacy, flipped)


def test_verify_writes_reads_each_save_back(tmp_path, monkeypatch):
    """With verify_writes a save that does not read back bit-exactly raises, naming the step; without it the save
    returns and the damage is found by the digests when the step is restored."""
    from x2gs_jax.checkpoint import CheckpointError

    state = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array(3, np.int32)}
    ok = Checkpointer(str(tmp_path / "ok"), verify_writes=True)
    ok.save(1, state, {"step": 1})
    back, meta = ok.restore(lambda meta: state)
    np.testing.assert_array_equal(back["x"], state["x"])
    ok.close()
    for verify in (True, False):
        ckpt = Checkpointer(str(tmp_path / f"bad{verify}"), verify_writes=verify)
        real = ckpt._manager.restore

        def corrupt(step, args=None, _real=real):  # what a disk that loses writes would return
            out = _real(step, args=args)
            if "state" in out:
                out["state"]["x"] = out["state"]["x"] + 1
            return out
        monkeypatch.setattr(ckpt._manager, "restore", corrupt)
        if verify:
            with pytest.raises(CheckpointError, match=r"checkpoint step 5 .* did not read back as written"):
                ckpt.save(5, state, {"step": 5})
        else:
            ckpt.save(5, state, {"step": 5})
            with pytest.raises(CheckpointError, match=r"no intact checkpoint.*step 5: .*\['x'\]"):
                ckpt.restore(lambda meta: state)
        ckpt.close()


def test_background_saves_are_verified_and_their_failure_is_raised_naming_the_step(tmp_path, monkeypatch):
    """save(background=True) returns before orbax's write and the read-back end; the step then restores bit-exactly.
    A background save that does not read back is raised, naming its step, by poll (once known), the next save,
    wait and close; the caller's arrays may change right after save returns (the trainer donates them)."""
    from x2gs_jax.checkpoint import CheckpointError

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = {"x": x, "n": np.array(3, np.int32)}
    ok = Checkpointer(str(tmp_path / "ok"))
    ok.save(1, state, {"step": 1}, background=True)
    x += 100  # what donation does to the buffers the save was given
    ok.poll()
    back, meta = ok.restore(lambda meta: state)  # waits for the save first
    np.testing.assert_array_equal(back["x"], np.arange(12, dtype=np.float32).reshape(3, 4))
    assert meta["step"] == 1 and ok.all_steps() == [1]
    ok.close()

    bad = Checkpointer(str(tmp_path / "bad"))
    real = bad._manager.restore

    def corrupt(step, args=None):  # odd steps do not read back as written
        out = real(step, args=args)
        if "state" in out and step % 2:
            out["state"]["x"] = out["state"]["x"] + 1
        return out
    monkeypatch.setattr(bad._manager, "restore", corrupt)
    bad.save(5, state, {"step": 5}, background=True)
    bad._pending.exception()  # let the thread finish: poll then raises (it never blocks)
    with pytest.raises(CheckpointError, match=r"checkpoint step 5 .* did not read back as written"):
        bad.poll()
    bad.poll()  # raised once
    bad.save(6, state, {"step": 6}, background=True)
    bad.wait()  # step 6 reads back: no error
    bad.save(7, state, {"step": 7}, background=True)
    with pytest.raises(CheckpointError, match=r"checkpoint step 7"):
        bad.save(8, state, {"step": 8}, background=True)  # the next save raises the previous one's failure
    assert 8 not in bad._manager.all_steps()  # ... before it writes anything
    bad.save(9, state, {"step": 9}, background=True)
    with pytest.raises(CheckpointError, match=r"checkpoint step 9"):
        bad.close()


def test_a_failed_background_checkpoint_stops_training_naming_the_step(tiny_static_runs, tmp_path, monkeypatch):
    """The trainer saves in the background by default; a save that fails its read-back stops the run with the
    step, instead of training on without a checkpoint."""
    from x2gs_jax import checkpoint
    from x2gs_jax.checkpoint import CheckpointError

    real = checkpoint.Checkpointer._finish

    def fail_at_2(self, step, host, checksums):
        real(self, step, host, checksums)
        if step == 2:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} did not read back as written: test")
    monkeypatch.setattr(checkpoint.Checkpointer, "_finish", fail_at_2)
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 .* did not read back as written"):
        train_lib.train_and_evaluate(_config(tiny_static_runs), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "export").exists()  # the run did not report success


# ----------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("key,value", [
    ("train.iterations", -1), ("train.iterations", 0), ("train.coarse_iterations", -3),
    ("train.steps_per_call", 0), ("optim.lr.xyz.init", 0.0), ("optim.lr.density.final", -1e-3),
    ("optim.lr.scaling.max_steps", 0), ("data.init.n_points", 0), ("data.phantom.size", 0),
    ("model.initial_capacity_factor", 0.5), ("model.capacity_multiple", 0), ("densify.interval", 0), ("checkpoint.every", 0),
    ("eval.iterations", (5, 30))])
def test_config_values_that_cannot_work_are_refused_by_key(key, value):
    config = r2_static.get_config("tiny")  # 20 iterations
    node = config
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(ConfigError, match=re.escape(f"config.{key}={value!r}: ") + ".*(must|allowed)"):
        check_config(config)


def test_config_checks_accept_every_shipped_config_and_need_a_fine_stage_for_4d():
    for module, variants in ((r2_static, (None, "demo", "tiny")), (x2_gaussian, (None, "demo", "ref64", "tiny")),
                             (physx, (None, "demo", "ref64", "tiny"))):
        for variant in variants:
            config = module.get_config(variant)
            check_config(config)
            check_stages(config, config.model.kind != "static")
    config = x2_gaussian.get_config("tiny")  # 16 iterations
    config.train.coarse_iterations = 16
    with pytest.raises(ConfigError, match=r"config.train.coarse_iterations=16: a 4D model .* needs a fine stage"):
        check_stages(config, True)
    check_stages(config, False)  # static models train in one stage: coarse_iterations does not apply
    # Several problems are reported at once.
    config.train.iterations, config.checkpoint.every = 0, -1
    with pytest.raises(ConfigError, match=r"(?s)train.iterations=0.*checkpoint.every=-1"):
        check_config(config)


def test_bad_config_or_data_stop_train_py_before_any_work(tiny_static_runs, tmp_path):
    """A usage error without a traceback, and no run directory created."""
    workdir = tmp_path / "new"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                        "--config=" + os.path.join(ROOT, "configs/r2_static.py:tiny"), f"--workdir={workdir}",
                        "--config.train.iterations=-5"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "config.train.iterations=-5: must be an integer >= 1" in r.stderr
    assert "Traceback" not in r.stderr and not workdir.exists()
    with pytest.raises(DataError, match="config.data.path=.*no such file"):
        train_lib.train_and_evaluate(_config(tiny_static_runs, data__path=str(tmp_path / "none.pickle")),
                                     str(workdir))
    assert not workdir.exists()


# ------------------------------------------------------------------------------------------ initial point cloud
def test_init_point_cloud_is_made_again_when_its_inputs_change(tiny_static_runs, tmp_path, capsys):
    src = train_lib.resolve_case_path(_config(tiny_static_runs))
    case_path = str(tmp_path / "case.pickle")
    shutil.copy(src, case_path)
    config = _config(tiny_static_runs, data__path=case_path)
    npy = tmp_path / "init_case.npy"
    first = initial_points(case_path, load_case(case_path), config)
    record = json.loads(open(init_record_path(case_path)).read())
    assert len(first) == 1500 and record["init"]["n_points"] == 1500 and record["case_file"] == "case.pickle"
    stamp = os.stat(npy).st_mtime_ns
    np.testing.assert_array_equal(initial_points(case_path, load_case(case_path), config), first)
    assert os.stat(npy).st_mtime_ns == stamp  # reused, not made again
    capsys.readouterr()

    config.data.init.n_points = 700  # a changed setting
    smaller = initial_points(case_path, load_case(case_path), config)
    assert len(smaller) == 700 and "data.init.n_points changed" in capsys.readouterr().out

    with open(case_path, "rb") as f:  # a case regenerated under the same name
        raw = pickle.load(f)
    raw["train"]["projections"] = raw["train"]["projections"] * 0.5
    with open(case_path, "wb") as f:
        pickle.dump(raw, f)
    again = initial_points(case_path, load_case(case_path), config)
    assert "the case file case.pickle changed" in capsys.readouterr().out
    assert len(again) == 700 and not np.array_equal(again, smaller)

    # A point cloud without a record (shipped with the case) is the user's: used as it is.
    os.remove(init_record_path(case_path))
    np.save(npy, np.array([[0.0, 0.0, 0.0, 0.5]] * 3))
    assert len(initial_points(case_path, load_case(case_path), config)) == 3
    assert "as given" in capsys.readouterr().out
