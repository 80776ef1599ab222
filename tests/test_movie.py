"""Movies: GIF (Pillow) and H.264 MP4 (imageio-ffmpeg's ffmpeg) of the same frames, read back frame by frame."""
import warnings

import numpy as np
import pytest

from x2gs_jax import viz
from x2gs_jax.viz import movie


def _frames(n=5, h=30, w=41):
    """Smooth colour ramps moving with the frame index (odd sizes: the MP4 pads them to multiples of 16)."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.stack([np.stack([(x * 6 + 20 * i) % 256, (y * 8) % 256, np.full_like(x, 40 * i)], -1)
                    for i in range(n)])
    return out.astype(np.uint8)


def _mp4_usable() -> bool:
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def test_mp4_round_trip(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    frames = _frames()
    path = tmp_path / "m.mp4"
    movie.write_mp4(str(path), frames, fps=8)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    assert meta["fps"] == 8 and tuple(meta["size"]) == (48, 32)  # (W, H) padded to multiples of 16
    back = np.stack([np.frombuffer(f, np.uint8).reshape(32, 48, 3) for f in reader])
    assert back.shape[0] == 5
    # Lossy (H.264, 4:2:0 chroma): close on the frames' own pixels, white padding beyond them.
    err = np.abs(back[:, :30, :41].astype(float) - frames.astype(float))
    assert err.mean() < 6.0, err.mean()
    assert back[:, 31, 47].min() > 230
    assert [p.name for p in tmp_path.iterdir()] == ["m.mp4"]  # no temporary file left


def test_gif_round_trip(tmp_path):
    from PIL import Image, ImageSequence

    frames = _frames(3)
    movie.write_gif(str(tmp_path / "m.gif"), frames, fps=4)
    with Image.open(tmp_path / "m.gif") as im:
        back = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
        assert im.info["duration"] == 250 and im.info["loop"] == 0
    assert len(back) == 3 and back[0].shape == (30, 41, 3)
    assert np.abs(back[2].astype(float) - frames[2]).mean() < 12.0  # 256-colour palette


def test_breathing_movies_share_their_frames(tmp_path):
    vols = np.zeros((3, 8, 6, 10), np.float32)
    for i in range(3):
        vols[i, :, :, : 3 + 2 * i] = 1.0  # a slab growing along z
    frames = viz.breathing_frames(vols, [0.0, 1.0, 2.0])
    assert frames.dtype == np.uint8 and frames.shape[0] == 3 and frames.shape[-1] == 3
    assert not np.array_equal(frames[0], frames[2])
    # The MP4 needs imageio-ffmpeg (not in the GPU image, say): without it the GIF alone, as the test below checks.
    mp4 = [str(tmp_path / "b.mp4")] if _mp4_usable() else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if not mp4 else "error", RuntimeWarning)
        paths = viz.save_breathing_movies(str(tmp_path / "b"), vols, [0.0, 1.0, 2.0])
    assert paths == [str(tmp_path / "b.gif")] + mp4
    with pytest.raises(ValueError, match="3 volumes but 2 times"):
        viz.breathing_frames(vols, [0.0, 1.0])
    with pytest.raises(ValueError, match="uint8"):
        movie.write_mp4(str(tmp_path / "x.mp4"), frames.astype(np.float32), 8)


def test_without_imageio_ffmpeg_the_gif_is_written_and_a_warning_says_why(tmp_path, monkeypatch):
    """A machine without imageio-ffmpeg (or its ffmpeg) loses the MP4 only, with a warning naming the fix."""
    import sys

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` raises ImportError
    vols = np.zeros((2, 8, 6, 10), np.float32)
    vols[1, :, :, :4] = 1.0
    with pytest.warns(RuntimeWarning, match="b.mp4 not written.*pip install imageio-ffmpeg"):
        paths = viz.save_breathing_movies(str(tmp_path / "b"), vols, [0.0, 1.0])
    assert paths == [str(tmp_path / "b.gif")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gif"]  # no MP4, no temporary file
    with pytest.raises(movie.MovieUnavailable, match="imageio-ffmpeg"):
        movie.write_mp4(str(tmp_path / "x.mp4"), _frames(2), 8)
