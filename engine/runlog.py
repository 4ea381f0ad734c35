"""What a run tells while it runs: progress bars on rank 0, and scalars written as a JSONL log and as
TensorBoard event files in the run's directory.

The event files are written here, without the tensorboard package: a TFRecord stream (length, masked CRC32C
of the length, payload, masked CRC32C of the payload) of ``Event`` protocol buffers holding scalar summaries.
``tensorboard --logdir OUT_DIR`` reads them; ``read_events`` reads them back for tests.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from pathlib import Path

QUIET = False  # set by ``speedyrec.train --quiet``: no progress bars (logs only)


# -- progress ----------------------------------------------------------------------------------------------
class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass

    def close(self):
        pass


def progress(total: float | None, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar on stderr (rank 0, not quiet), else a bar that shows nothing. ``total`` None: no ETA."""
    if QUIET or not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total or None, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, mininterval=1.0,
                file=sys.stderr, leave=True)


# -- TensorBoard event files --------------------------------------------------------------------------------
def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord frames use."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf encodes it
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str = "", scalars: dict[str, float] | None = None) -> bytes:
    # Event: wall_time (1, double), step (2, int64), file_version (3, string), summary (5, Summary)
    msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version:
        msg += _field(3, file_version.encode())
    if scalars:
        # Summary: repeated Value (1); Value: tag (1, string), simple_value (2, float)
        values = b"".join(_field(1, _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", v))
                          for tag, v in scalars.items())
        msg += _field(5, values)
    return msg


def _record(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", _masked(crc32c(length))) + payload + struct.pack("<I", _masked(crc32c(payload)))


def read_events(path: Path) -> list[dict]:
    """The scalar events of one event file, checking every frame's CRCs: [{"step", "wall_time", "scalars"}]."""
    data, out, i = Path(path).read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack_from("<Q", data, i)
        if struct.unpack_from("<I", data, i + 8)[0] != _masked(crc32c(data[i:i + 8])):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        payload = data[i + 12:i + 12 + n]
        if struct.unpack_from("<I", data, i + 12 + n)[0] != _masked(crc32c(payload)):
            raise ValueError(f"{path}: bad payload CRC at byte {i}")
        out.append(_parse_event(payload))
        i += 16 + n
    return out


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        x = b[i]
        n |= (x & 0x7F) << shift
        i += 1
        shift += 7
        if not x & 0x80:
            return n, i


def _fields(b: bytes):
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(b, i)
            v, i = b[i:i + n], i + n
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield num, v


def _parse_event(b: bytes) -> dict:
    ev = {"scalars": {}}
    for num, v in _fields(b):
        if num == 1:
            ev["wall_time"] = struct.unpack("<d", v)[0]
        elif num == 2:
            ev["step"] = v
        elif num == 3:
            ev["file_version"] = v.decode()
        elif num == 5:
            for _, value in _fields(v):
                f = dict(_fields(value))
                ev["scalars"][f[1].decode()] = struct.unpack("<f", f[2])[0]
    return ev


# -- the run log -----------------------------------------------------------------------------------------------
class RunLog:
    """Scalars of a run (rank 0): one JSON line each in ``DIR/log.jsonl`` and a TensorBoard event file in DIR.
    Both files exist from the start, so every run has them even if it logs nothing else. Each write opens, appends
    and closes (writes are rare: logging steps and evaluations), so no file stays open after a stage."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = directory / "log.jsonl"
        self.events = directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.speedyrec"
        with open(self.events, "ab") as f:
            f.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
        self.write("start", 0, {})

    def write(self, kind: str, step: int, scalars: dict[str, float | None]) -> None:
        """Record ``scalars`` at ``step`` under ``kind`` (train, dev, ...); None and NaN values are left out."""
        clean = {k: float(v) for k, v in scalars.items() if v is not None and not math.isnan(float(v))}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"time": time.time(), "kind": kind, "step": int(step), **clean}) + "\n")
        if clean:
            with open(self.events, "ab") as f:
                f.write(_record(_event(time.time(), int(step), scalars={f"{kind}/{k}": v for k, v in clean.items()})))
