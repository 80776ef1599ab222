"""TensorBoard event files written without TensorFlow: CRC-32C, record framing, Event/Summary encoding."""
import struct

import numpy as np
import pytest

from x2gs_jax import tb_events


def test_crc32c_known_vectors():
    assert tb_events.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert tb_events.crc32c(b"") == 0
    assert tb_events.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def _varint(buf, i):
    shift = n = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(buf):
    """Minimal protobuf wire-format decoder: {field number: [values]}."""
    out, i = {}, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = struct.unpack("<d", buf[i:i + 8])[0], i + 8
        elif wt == 5:
            v, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
        elif wt == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        else:
            raise AssertionError(f"unexpected wire type {wt}")
        out.setdefault(num, []).append(v)
    return out


def read_records(path):
    data = open(path, "rb").read()
    i, recs = 0, []
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == tb_events.masked_crc32c(header)
        payload = data[i + 12:i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == tb_events.masked_crc32c(payload)
        recs.append(payload)
        i += 16 + n
    return recs


def test_writer_round_trip(tmp_path):
    w = tb_events.EventWriter(str(tmp_path / "tb"))
    logged = [("train/loss", 0.125, 1), ("train/psnr", 31.5, 20), ("eval/psnr_3d_mean", -2.0, 3_000_000_000)]
    for tag, v, s in logged:
        w.add_scalar(tag, v, s)
    w.close()
    recs = read_records(w.path)
    first = _fields(recs[0])
    assert first[3] == [b"brain.Event:2"] and first[1][0] > 1e9
    for payload, (tag, v, s) in zip(recs[1:], logged):
        ev = _fields(payload)
        assert ev[2] == [s]
        value = _fields(_fields(ev[5][0])[1][0])
        assert value[1] == [tag.encode()]
        assert value[2][0] == pytest.approx(v)
    assert len(recs) == 1 + len(logged)


def test_negative_step_is_int64_twos_complement():
    ev = _fields(tb_events.encode_scalar_event("x", 1.0, -1, 0.0))
    assert np.int64(np.uint64(ev[2][0])) == -1
