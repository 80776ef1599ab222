"""Run logging: metrics.jsonl and TensorBoard events (tensorboardX), read back with TensorBoard's own
EventAccumulator; on resume each step is recorded once (metrics.jsonl truncated, TensorBoard purge_step)."""
import json

import numpy as np
import pytest

from x2gs_jax.run_log import RunLogger, eval_images, truncate_metrics


def accumulate(logdir):
    """TensorBoard's reader over every event file of `logdir`, keeping all scalars and images."""
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea_mod.EventAccumulator(str(logdir), size_guidance={ea_mod.SCALARS: 0, ea_mod.IMAGES: 0})
    acc.Reload()
    return acc


def records(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _log_steps(logger, steps, offset):
    for s in steps:
        logger.write(s, {"loss": offset + s, "num_gaussians": 100 + s})


def test_scalars_and_images_read_back_by_tensorboard(tmp_path):
    log = RunLogger(str(tmp_path))
    _log_steps(log, range(1, 6), 0.0)
    rng = np.random.default_rng(0)
    gt, pred = rng.random((6, 5, 4)).astype(np.float32), rng.random((6, 5, 4)).astype(np.float32)
    images = eval_images(gt, pred, rng.random((7, 9)), rng.random((7, 9)))
    log.write(5, {"psnr_3d_mean": 21.5}, prefix="eval")
    log.add_images(5, images)
    log.close()
    acc = accumulate(tmp_path / "tb")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(s, float(s)) for s in range(1, 6)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/psnr_3d_mean")] == [(5, 21.5)]
    assert set(acc.Tags()["images"]) == set(images)
    for tag, img in images.items():
        (ev,) = acc.Images(tag)
        assert ev.step == 5 and (ev.height, ev.width) == img.shape
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4, 5, 5]


def test_resume_records_each_step_once(tmp_path):
    """A run logs 1..10 and dies (its last line cut short); the resumed one restores step 6 and logs 7..12 with other
    values: metrics.jsonl and TensorBoard hold each step once, steps 7..10 with the resumed run's values."""
    first = RunLogger(str(tmp_path))
    _log_steps(first, range(1, 11), 0.0)
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "kind": "tra')  # killed mid-write
    second = RunLogger(str(tmp_path), resume_step=6)
    assert second.dropped == 5  # steps 7..10 and the cut line
    second.write(6, {"damaged_steps": []}, prefix="resume")
    _log_steps(second, range(7, 13), 1000.0)
    second.close()
    train = [r for r in records(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["loss"] for r in train] == [float(s) for s in range(1, 7)] + [1000.0 + s for s in range(7, 13)]
    assert [r["kind"] for r in records(tmp_path)].count("resume") == 1
    assert len(list((tmp_path / "tb").iterdir())) == 2  # one event file per process
    events = accumulate(tmp_path / "tb").Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, 13))
    assert [e.value for e in events] == [float(s) for s in range(1, 7)] + [1000.0 + s for s in range(7, 13)]


def test_sync_puts_every_event_on_disk(tmp_path):
    """tensorboardX writes from a queue in a background thread: after sync() (called before each checkpoint), every
    event logged so far is readable from disk, with the writer still in use; later events go to a new file."""
    log = RunLogger(str(tmp_path))
    _log_steps(log, range(1, 6), 0.0)
    log.add_images(5, {"eval/x": np.full((3, 4), 0.5)})
    log.sync()
    acc = accumulate(tmp_path / "tb")
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert [e.step for e in acc.Images("eval/x")] == [5]
    _log_steps(log, range(6, 9), 0.0)
    log.close()
    assert [e.step for e in accumulate(tmp_path / "tb").Scalars("train/loss")] == list(range(1, 9))
    assert len(list((tmp_path / "tb").iterdir())) == 2


def test_truncate_metrics(tmp_path):
    p = tmp_path / "metrics.jsonl"
    assert truncate_metrics(str(p), 3) == 0 and not p.exists()
    p.write_text("".join(json.dumps({"step": s, "kind": "train"}) + "\n" for s in (1, 2, 3, 4)))
    before = p.read_bytes()
    assert truncate_metrics(str(p), 4) == 0 and p.read_bytes() == before  # nothing to drop: untouched
    assert truncate_metrics(str(p), 2) == 2
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2]


def test_eval_images_layout():
    """GT left, prediction right, on the GT's grey scale; slices shown superior/anterior up."""
    gt = np.zeros((4, 6, 8), np.float32)
    gt[1, 3, 7] = 2.0  # top of the middle coronal slice (largest z), x = 1
    pred = gt * 0.5
    img = eval_images(gt, pred)
    cor = img["eval/slice_coronal_gt_pred"]
    assert cor.shape == (8, 4 + 2 + 4)
    assert cor[0, 1] == 1.0 and cor[0, 4 + 2 + 1] == 0.5  # row 0 = largest z
    assert np.all(cor[:, 4:6] == 1.0)  # the white gap
    assert "eval/projection_gt_pred" not in img
    proj = eval_images(gt, pred, np.full((3, 5), 4.0), np.full((3, 5), 8.0))["eval/projection_gt_pred"]
    assert proj.shape == (3, 12) and proj[0, 0] == 1.0 and proj[0, -1] == 1.0  # clipped to [0, 1]
