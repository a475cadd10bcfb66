"""Test-only instruments that train.py runs load through config overrides, e.g.

    +callbacks.probe._target_=tests.probes.StateProbe +callbacks.probe.out_dir=/tmp/x

They record what a subprocess run did (state fingerprints per rank, batch counts), inject faults
(NaN batches) or stall at a chosen moment so the test can SIGKILL the process there. ``DispatchedOps`` records
the aten ops an in-process computation dispatches.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Optional

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.utils.checkpoint_io import AtomicCheckpointIO


# ---------------------------------------------------------------------------------------------- fingerprints
def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=str):
            _feed(h, str(key))
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def fingerprint(obj: Any) -> str:
    """SHA-256 of a nested structure of tensors (exact bytes), containers and plain values."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def training_state(state_dict: dict, optimizer_states: Iterable[dict], scheduler_states: Iterable[dict],
                   global_step: int) -> dict[str, Any]:
    """Per-tensor model fingerprints plus optimizer / scheduler / step fingerprints (JSON-able)."""
    return {
        "model": {k: fingerprint(v) for k, v in state_dict.items()},
        "optimizers": fingerprint(list(optimizer_states)),
        "schedulers": fingerprint(list(scheduler_states)),
        "global_step": int(global_step),
    }


def checkpoint_state(ckpt: dict) -> dict[str, Any]:
    """:func:`training_state` of a loaded Lightning checkpoint."""
    return training_state(ckpt["state_dict"], ckpt["optimizer_states"], ckpt["lr_schedulers"], ckpt["global_step"])


def live_state(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """:func:`training_state` of a running trainer (what Lightning would write into a checkpoint)."""
    return training_state(
        pl_module.state_dict(),
        [opt.state_dict() for opt in trainer.optimizers],
        [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
        trainer.global_step,
    )


# ---------------------------------------------------------------------------------------------- callbacks
class StateProbe(L.Callback):
    """Writes ``{out_dir}/{start,end}-rank{R}.json``: training-state fingerprints, batch counts and the sample keys
    trained on."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.batches = 0
        self.keys: list[str] = []

    def _dump(self, name: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {**live_state(trainer, pl_module), "batches": self.batches, "world_size": trainer.world_size,
                  "resumed_from": trainer.ckpt_path, "keys": self.keys}
        (self.out_dir / f"{name}-rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump("start", trainer, pl_module)  # after Lightning restored a resumed run's state

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        self.keys.extend(batch.get("key", []))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump("end", trainer, pl_module)


class InjectNaN(L.Callback):
    """Fills the batch images with NaN for global steps in ``[from_step, until_step)``."""

    def __init__(self, from_step: int, until_step: Optional[int] = None, key: str = "image"):
        self.from_step, self.until_step, self.key = from_step, until_step, key

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step >= self.from_step and (self.until_step is None or step < self.until_step):
            batch[self.key].fill_(float("nan"))


class StallAtStep(L.Callback):
    """After the optimizer step that makes ``global_step == step``: write ``marker`` and wait to be killed."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            _stall(self.marker, f"step {trainer.global_step}")


class StallingCheckpointIO(AtomicCheckpointIO):
    """Atomic saving that, on its ``stall_on_save``-th save, writes half the file, then waits to be killed."""

    def __init__(self, stall_on_save: int, marker: str):
        super().__init__()
        self.stall_on_save, self.marker, self.saves = stall_on_save, Path(marker), 0

    def write(self, checkpoint: dict[str, Any], f: BinaryIO) -> None:
        self.saves += 1
        if self.saves != self.stall_on_save:
            return super().write(checkpoint, f)


        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        _stall(self.marker, f"half of {len(data)} bytes written to {f.name}")


def _stall(marker: Path, what: str) -> None:
    marker.write_text(what)
    while True:  # the test sends SIGKILL
        time.sleep(0.1)


class ParamTrace(L.Callback):
    """Records, per training batch, the global step it started at and whether it changed the trainable weights."""

    def __init__(self):
        self.steps: list[tuple[int, bool]] = []
        self._before: Optional[str] = None

    @staticmethod
    def _trainable(pl_module: L.LightningModule) -> str:
        return fingerprint([p for p in pl_module.parameters() if p.requires_grad])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = self._trainable(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((trainer.global_step - 1, self._trainable(pl_module) != self._before))


class BatchAudit(L.Callback):
    """Counts training samples and records the image range of every batch."""

    def __init__(self):
        self.samples = 0
        self.captions: list[str] = []
        self.bad_batches: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        image = batch["image"]  # [B, 3, H, W]
        self.samples += image.shape[0]
        self.captions += list(batch["caption"])
        if not (torch.isfinite(image).all() and image.min() >= -1 and image.max() <= 1 and image.shape[1] == 3):
            self.bad_batches.append(f"batch {batch_idx}: shape {tuple(image.shape)}, range "
                                    f"[{image.min().item()}, {image.max().item()}]")


# ---------------------------------------------------------------------------------------------- dispatched ops
class DispatchedOps(TorchDispatchMode):
    """Inside it, every aten op dispatched is recorded as (name, dtype of its first argument or None)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, Optional[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.ops.append((func.overloadpacket.__name__, None if first is None else first.dtype))
        return func(*args, **(kwargs or {}))

    def count(self, name: str) -> int:
        return sum(op == name for op, _ in self.ops)
