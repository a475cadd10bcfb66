"""OnChangeLog: logging a running total only when it changes (and once per epoch) gives the loggers and
``trainer.callback_metrics`` exactly what logging it every batch gives; writes_step_metrics falls back to logging
every batch. (The autoencoder's use of writes_step_metrics is tested in test_autoencoder.py.)"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from ldm.utils.step_logging import OnChangeLog, writes_step_metrics

CHANGES_AT = {3: 1.0, 4: 2.0, 9: 5.0}  # global step -> new value of the running total


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RunningTotal(L.Callback):
    """Logs a total that changes at CHANGES_AT, every batch (the reference) or through OnChangeLog."""

    def __init__(self, on_change: bool):
        self.on_change, self.value, self.changes = on_change, 0.0, OnChangeLog()

    def on_train_epoch_start(self, trainer, pl_module):
        self.changes.reset()

    def _log(self, trainer, pl_module):
        self.value = CHANGES_AT.get(trainer.global_step, self.value)
        if self.on_change:
            self.changes.log(pl_module, "data/total", self.value)
        else:
            pl_module.log("data/total", self.value, on_step=True, on_epoch=False, batch_size=1)


class TotalAtBatchEnd(RunningTotal):  # as the data and NaN counters log
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._log(trainer, pl_module)


class TotalAtBatchStart(RunningTotal):  # as the curriculum's phase logs
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._log(trainer, pl_module)


def _logged(tmp_path: Path, on_change: bool, callback: type[RunningTotal]) -> tuple[list[tuple[str, str, str]], float]:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(20, 2)), batch_size=4)  # 5 batches per epoch
    trainer = L.Trainer(max_steps=13, log_every_n_steps=2, val_check_interval=3, limit_val_batches=1,
                        logger=CSVLogger(tmp_path / str(on_change)), callbacks=[callback(on_change)],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Tiny(), data, data)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [(r["epoch"], r["step"], r["data/total"]) for r in csv.DictReader(f) if r["train/loss"]]
    return rows, float(trainer.callback_metrics["data/total"])


@pytest.mark.parametrize("callback", [TotalAtBatchEnd, TotalAtBatchStart])
def test_logging_on_change_writes_what_logging_every_batch_writes(tmp_path, callback):
    every_batch, on_change = _logged(tmp_path, False, callback), _logged(tmp_path, True, callback)
    rows = every_batch[0]
    assert len({epoch for epoch, _, _ in rows}) == 3 and {v for _, _, v in rows} >= {"0.0", "2.0", "5.0"}
    assert on_change == every_batch


def test_reset_logs_an_unchanged_value_again():
    logged = []

    class Recorder:
        def log(self, name, value, **kwargs):
            logged.append((name, value))

    log = OnChangeLog()
    for value in (1.0, 1.0, 2.0, 2.0):
        log.log(Recorder(), "x", value)
    log.reset()
    log.log(Recorder(), "x", 2.0)
    assert logged == [("x", 1.0), ("x", 2.0), ("x", 2.0)]


def test_without_lightnings_check_every_batch_logs():
    connector = SimpleNamespace(should_update_logs=False)
    assert not writes_step_metrics(SimpleNamespace(fast_dev_run=0, _logger_connector=connector))
    assert writes_step_metrics(SimpleNamespace(fast_dev_run=1, _logger_connector=connector))  # fast_dev_run logs all
    assert writes_step_metrics(SimpleNamespace(fast_dev_run=0))  # no such check: log, as without the helper
