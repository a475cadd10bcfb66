"""Sum the data loader's skip counters and log them: bad data never passes silently.

Batches from :class:`ldm.data.webdataset.WebDataModule` carry ``n_skipped`` (corrupt samples or
unreadable shards skipped since the worker's previous batch) and ``n_empty_caption``. This callback
keeps running totals, summed over DDP ranks, and logs

- ``data/skipped_samples`` and ``data/empty_captions`` (training, cumulative over the run),
- ``data/val_skipped_samples`` and ``data/val_empty_captions`` (per validation epoch),

and warns (rank 0, at most once per ``warn_interval_s``) when new training samples were skipped.
Counters accumulate on the batch's device; they are synchronised only every ``sync_every_n_steps``
training batches and at epoch ends, so the callback adds no per-step host-device sync.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ldm.utils.step_logging import OnChangeLog

_COUNTERS = {"n_skipped": "skipped_samples", "n_empty_caption": "empty_captions"}


class SkippedSamplesCallback(L.Callback):
    """Running totals of the loader's ``n_skipped`` / ``n_empty_caption`` batch counters, logged under ``data/``."""

    def __init__(self, sync_every_n_steps: int = 50, warn_interval_s: float = 300.0):
        if sync_every_n_steps < 1:
            raise ValueError(f"sync_every_n_steps must be >= 1, got {sync_every_n_steps}")
        self.sync_every_n_steps = int(sync_every_n_steps)
        self.warn_interval_s = float(warn_interval_s)
        self.totals = {"train": dict.fromkeys(_COUNTERS, 0), "val": dict.fromkeys(_COUNTERS, 0)}
        self._pending: dict[str, torch.Tensor | None] = {"train": None, "val": None}
        self._last_warning = -float("inf")
        self._warned_total = 0
        self._log = OnChangeLog()

    # ------------------------------------------------------------------ accumulation
    def _accumulate(self, stage: str, batch: Any) -> None:
        if not isinstance(batch, dict) or not all(k in batch for k in _COUNTERS):
            return
        counts = torch.stack([torch.as_tensor(batch[k]).reshape(()) for k in _COUNTERS]).to(torch.long)  # [2]
        pending = self._pending[stage]
        self._pending[stage] = counts if pending is None else pending + counts.to(pending.device)

    def _sync(self, stage: str, trainer: L.Trainer) -> None:
        """Add the pending counts, summed over ranks, to the totals."""
        pending = self._pending[stage]
        if pending is None:
            pending = torch.zeros(len(_COUNTERS), dtype=torch.long, device=trainer.strategy.root_device)
        self._pending[stage] = None
        if trainer.world_size > 1:  # every rank reaches the same sync points (equal batches per rank)
            pending = trainer.strategy.reduce(pending.to(trainer.strategy.root_device), reduce_op="sum")
        for name, value in zip(_COUNTERS, pending.tolist()):
            self.totals[stage][name] += int(value)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log.reset()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._accumulate("train", batch)
        if (batch_idx + 1) % self.sync_every_n_steps == 0:
            self._sync("train", trainer)
            self._maybe_warn()
        for key, name in _COUNTERS.items():  # latest synced totals; a float, so logging costs no sync
            self._log.log(pl_module, f"data/{name}", float(self.totals["train"][key]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync("train", trainer)
        self._maybe_warn()
        for key, name in _COUNTERS.items():
            pl_module.log(f"data/{name}", float(self.totals["train"][key]), on_step=False, on_epoch=True, batch_size=1)

    def _maybe_warn(self) -> None:
        skipped = self.totals["train"]["n_skipped"]
        now = time.monotonic()
        if skipped > self._warned_total and now - self._last_warning >= self.warn_interval_s:
            rank_zero_warn(
                f"the data loader skipped {skipped - self._warned_total} corrupt sample(s)/shard(s) "
                f"(total {skipped}); worker logs name them, the running total is logged as data/skipped_samples"
            )
            self._warned_total, self._last_warning = skipped, now

    # ------------------------------------------------------------------ validation
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._accumulate("val", batch)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.totals["val"] = dict.fromkeys(_COUNTERS, 0)
        self._pending["val"] = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._sync("val", trainer)
        for key, name in _COUNTERS.items():
            value = float(self.totals["val"][key])
            pl_module.log(f"data/val_{name}", value, on_step=False, on_epoch=True, batch_size=1)
        if self.totals["val"]["n_skipped"]:
            rank_zero_warn(f"validation skipped {self.totals['val']['n_skipped']} corrupt sample(s)/shard(s)")

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"train_totals": dict(self.totals["train"])}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals["train"] = {k: int(state_dict["train_totals"].get(k, 0)) for k in _COUNTERS}
        self._warned_total = self.totals["train"]["n_skipped"]
