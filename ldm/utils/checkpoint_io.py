"""Crash-safe checkpoint writing: a kill at any moment leaves the previous file intact.

Lightning's default ``TorchCheckpointIO`` serialises into memory and lets fsspec write a temporary
file in the *system* temp directory, then ``shutil.move``s it over the target. When the checkpoint
directory is on another filesystem (node-local ``/tmp``, checkpoints on NFS/Lustre) that move is a
copy into the target, so a job killed mid-copy leaves a truncated ``last.ckpt``; nothing is fsynced
either. :class:`AtomicCheckpointIO` streams ``torch.save`` into a hidden temporary file next to the
target, fsyncs it, ``os.replace``s it over the target (atomic on POSIX and Windows within one
filesystem) and fsyncs the directory. Readers see the old file or the new one, never a mix.

Non-local URLs (``s3://``, ``gs://``, ...) go through Lightning's writer; object stores publish an
object only once its upload completes, which is already all-or-nothing.

Enabled for every run by ``trainer.plugins`` in ``configs/trainer/default.yaml``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


def temporary_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_torch_save` stages ``path``: a hidden file in the same directory."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def atomic_torch_save(
    obj: Any, path: str | os.PathLike, write: Callable[[Any, BinaryIO], None] = torch.save
) -> None:
    """``write(obj, file)`` (default ``torch.save``) into ``path`` without ever leaving it partially written.

    A failed save (exception) removes its temporary file; a killed one leaves ``.<name>.tmp``
    behind, which the next save of the same path overwrites.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temporary file + fsync + ``os.replace``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint got storage_options={storage_options!r}, which it does not "
                "support; remove them or write a CheckpointIO subclass that handles them."
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
            return
        log.debug("Saving checkpoint atomically: %s", path)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"), write=self.write)

    def write(self, checkpoint: dict[str, Any], f: BinaryIO) -> None:
        """Serialise ``checkpoint`` into the open temporary file."""
        torch.save(checkpoint, f)
