"""Read history rows back from a W&B offline run file with wandb's own protobuf record definitions.

The ``.wandb`` file is a LevelDB-style log (7-byte file header, 32 KiB blocks, chunks with a 7-byte header:
CRC32, length, type) of ``wandb.proto.wandb_internal_pb2.Record`` messages; wandb 0.31 no longer ships a
Python reader for it, so only the framing is decoded here and every record is parsed by wandb's protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        out.append(record)
        pending = b""
    return out


def history(path: str | Path) -> list[dict]:
    """The rows logged with ``wandb.log`` (what Lightning's WandbLogger sends), as dicts."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows
