"""TensorBoard scalar event files without TensorFlow, tensorboardX or protobuf.

A TensorBoard event file is a TFRecord stream of `Event` protocol buffers. Each record is
  uint64 length (little endian) | uint32 masked CRC-32C of those 8 bytes | payload | uint32 masked CRC-32C of payload
and a scalar is Event{wall_time (1, double), step (2, int64), summary (5) = Summary{value (1) = Value{tag (1, string),
simple_value (2, float)}}}; the first record carries file_version (3) = "brain.Event:2". These few fields are
encoded by hand here, so `train.py` writes TensorBoard logs with the project's own dependencies only
(`tensorboard --logdir <run dir>/tb` reads them).
"""
from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def encode_scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """The Event protobuf bytes of one scalar."""
    val = _field_bytes(1, tag.encode("utf-8")) + bytes([(2 << 3) | 5]) + struct.pack("<f", float(value))
    summary = _field_bytes(1, val)
    return (bytes([(1 << 3) | 1]) + struct.pack("<d", float(wall_time)) + _varint((2 << 3) | 0) + _varint(int(step))
            + _field_bytes(5, summary))


def encode_version_event(wall_time: float) -> bytes:
    return bytes([(1 << 3) | 1]) + struct.pack("<d", float(wall_time)) + _field_bytes(3, b"brain.Event:2")


def frame_record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))


class EventWriter:
    """Appends scalar events to `<logdir>/events.out.tfevents.<time>.<host>` (flushed on every write, so a
    killed run keeps what it logged)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}")
        self._f = open(self.path, "ab")
        self._f.write(frame_record(encode_version_event(now)))
        self._f.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._f.write(frame_record(encode_scalar_event(tag, value, step, time.time())))
        self._f.flush()

    def close(self) -> None:
        self._f.close()
