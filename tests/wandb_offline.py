"""Reading a W&B offline run back from its files (wandb 0.31 reads them in its Go core only)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path


def wandb_records(path: Path) -> Iterator[object]:
    """The records of a W&B transaction log (`run-*.wandb`): W&B's 7-byte header, then LevelDB's log
    format (32 KiB blocks of chunks, each `crc32 u32, length u16, type u8`: 1 full, 2 first, 3
    middle, 4 last), each record a `wandb_internal_pb2.Record`. wandb 0.31 reads these in its Go
    core only, so the test reads them itself."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        elif kind in (2, 3):
            pending += chunk
        elif kind == 0 and length == 0:
            pos += (block - pos % block) % block


def wandb_run(run_dir: Path) -> tuple[list[dict], dict, dict]:
    """(history rows, config, summary) of the one offline run in `run_dir`."""
    history, config, summary = [], {}, {}
    found = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    if len(found) != 1:  # not written yet, or being swapped for a newer one
        return history, config, summary
    log_file = found[0]
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in record.summary.update})
    return history, config, summary
