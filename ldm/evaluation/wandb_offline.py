"""Read back an offline W&B run (``<save_dir>/wandb/offline-run-*``) without syncing it.

An offline run keeps its logged media as files (``files/media/images/*.png``) and everything else in the
transaction log ``run-<id>.wandb``: W&B's variant of the LevelDB log format (a 7-byte header
``":W&B", 0xBEE1, version 0``, then 32 KiB blocks of CRC-checked chunks) holding one
``wandb.proto.wandb_internal_pb2.Record`` protobuf per entry. wandb >= 0.30 no longer ships a Python
reader for it (``wandb.sdk.internal.datastore`` was removed), so this module reads the framing and
decodes the records with wandb's own protobuf classes.

W&B writes the log asynchronously: read a run after it finished (its process exited, or
``wandb.finish()`` / ``WandbLogger.experiment.finish()`` was called), not while it is still open.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_IDENT, _MAGIC, _VERSION = b":W&B", 0xBEE1, 0
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class WandbLogError(ValueError):
    """The ``.wandb`` file is not a W&B transaction log or is corrupt."""


def read_records(path: str | Path) -> Iterator[bytes]:
    """Yield the serialized records of a ``.wandb`` transaction log, in order (CRC-checked).

    A truncated final chunk (a run killed mid-write) ends the iteration; any other damage raises.
    """
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size or _FILE_HEADER.unpack_from(data) != (_IDENT, _MAGIC, _VERSION):
        raise WandbLogError(f"{path} is not a W&B transaction log (bad header {data[:7]!r}).")
    pos, pending = _FILE_HEADER.size, bytearray()
    while pos + _CHUNK_HEADER.size <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK_HEADER.size:  # the block tail is zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if (crc, length, kind) == (0, 0, 0):  # zero-filled rest of a block (pre-allocated file)
            pos += _BLOCK - pos % _BLOCK
            continue
        start = pos + _CHUNK_HEADER.size
        chunk = data[start:start + length]
        if len(chunk) < length:
            return  # truncated last write
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise WandbLogError(f"{path}: checksum mismatch at byte {pos}.")
        pos = start + length
        if kind == _FULL:
            yield bytes(chunk)
        elif kind == _FIRST:
            pending = bytearray(chunk)
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield bytes(pending + chunk)
            pending = bytearray()
        else:
            raise WandbLogError(f"{path}: unknown chunk type {kind} at byte {pos}.")


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What an offline run recorded: ``history`` rows (one dict per logged step, JSON-decoded values),
    the run ``config``, the final ``summary``, and the ``media`` files written under ``files/``."""

    run_dir: Path
    run_id: str
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    media: list[Path] = field(default_factory=list)

    def metric(self, key: str) -> list[tuple[int, Any]]:
        """(``_step``, value) of every history row that has ``key``."""
        return [(row.get("_step", i), row[key]) for i, row in enumerate(self.history) if key in row]


def find_offline_runs(root: str | Path) -> list[Path]:
    """Offline run directories under ``root`` (e.g. a Hydra run dir), oldest first."""
    return sorted(Path(root).rglob("offline-run-*"), key=lambda p: p.name)


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse ``run_dir`` (an ``offline-run-<time>-<id>`` folder) into an :class:`OfflineRun`."""
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"{run_dir} holds no run-*.wandb file; pass an offline-run-* folder of W&B.")
    run = OfflineRun(run_dir=run_dir, run_id=logs[0].stem.removeprefix("run-"))
    for raw in read_records(logs[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind in ("run", "config"):  # the initial config rides on the run record, later updates alone
            for item in (record.run.config if kind == "run" else record.config).update:
                run.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_item_key(item)] = json.loads(item.value_json)
    run.media = sorted(p for p in (run_dir / "files" / "media").rglob("*") if p.is_file())
    return run
