"""TrainingStats: throughput, gradient norm and memory reach the logger at the logging interval only,
the norm is the true one under gradient accumulation, and manual optimisation gets no second norm."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from ldm.callbacks.training_stats import TrainingStats
from train import train

DIM, BATCH, ACCUMULATE, EVERY, STEPS = 3, 2, 2, 2, 4


class Ramp(Dataset):
    """Sample i is the vector (i + 1) * [1, 2, ..., DIM] under the batch key "image"."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {"image": (i + 1.0) * torch.arange(1.0, DIM + 1)}  # [DIM]


class LinearSum(L.LightningModule):
    """loss = sum over the batch of w . x + b: its gradient is known in closed form (sum of x, batch size)."""

    def __init__(self, manual: bool = False):
        super().__init__()
        self.layer = torch.nn.Linear(DIM, 1)
        self.automatic_optimization = not manual

    def training_step(self, batch: dict, batch_idx: int):
        loss = self.layer(batch["image"]).sum()  # [] (linear in the weights: the gradient does not depend on them)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(Ramp(), batch_size=BATCH, shuffle=False)


def expected_grad_norm(step: int) -> float:
    """Norm of the gradient applied at optimizer step ``step`` (1-based): Lightning divides each batch's
    loss by the accumulation count, so the gradient is the mean over the accumulated batches."""
    samples = range((step - 1) * ACCUMULATE * BATCH, step * ACCUMULATE * BATCH)
    weight_grad = sum((i + 1.0) * torch.arange(1.0, DIM + 1) for i in samples) / ACCUMULATE  # [DIM]
    bias_grad = BATCH  # d/db of (w . x + b) summed over a batch, averaged over the accumulated batches
    return math.sqrt(float(weight_grad.square().sum()) + bias_grad**2)


def fit(tmp_path: Path, manual: bool = False, stats: TrainingStats | None = None, max_steps: int = STEPS) -> list[dict]:
    logger = CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=[stats or TrainingStats()],
        log_every_n_steps=EVERY, accumulate_grad_batches=1 if manual else ACCUMULATE,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(LinearSum(manual=manual))
    return read_metrics(Path(logger.log_dir))


def read_metrics(log_dir: Path) -> list[dict]:
    with open(log_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def test_stats_reach_the_logger_at_the_interval_with_the_true_grad_norm(tmp_path):
    rows = fit(tmp_path, manual=False)
    step_times = column(rows, "perf/step_time")
    assert [s for s, _ in step_times] == [EVERY - 1, 2 * EVERY - 1]  # CSV step = optimizer steps before this one
    assert all(t > 0 for _, t in step_times)
    rates = dict(column(rows, "perf/samples_per_sec"))
    for step, seconds in step_times:  # every interval saw EVERY optimizer steps of BATCH x ACCUMULATE samples
        assert rates[step] == pytest.approx(BATCH * ACCUMULATE / seconds, rel=1e-6)
    assert column(rows, "perf/global_batch") == [(EVERY - 1, BATCH * ACCUMULATE)]
    assert all(rss > 0 for _, rss in column(rows, "perf/cpu_rss_gb"))
    assert len(column(rows, "perf/cpu_rss_gb")) == STEPS // EVERY
    norms = column(rows, "train/grad_norm")
    assert [s for s, _ in norms] == [EVERY - 1, 2 * EVERY - 1]
    for step, norm in norms:
        assert norm == pytest.approx(expected_grad_norm(step + 1), abs=1e-5)
    assert "perf/cuda_max_allocated_gb" not in rows[0]  # a CPU run


def test_manual_optimisation_gets_no_grad_norm_from_the_callback(tmp_path):
    rows = fit(tmp_path, manual=True)
    assert "train/grad_norm" not in rows[0]  # the model owns its norm (the autoencoder logs it itself)
    assert [s for s, _ in column(rows, "perf/step_time")] == [EVERY - 1, 2 * EVERY - 1]


def test_own_interval_is_independent_of_the_trainers(tmp_path):
    rows = fit(tmp_path, stats=TrainingStats(log_every_n_steps=3), max_steps=6)  # the trainer logs every 2
    assert [s for s, _ in column(rows, "perf/step_time")] == [2, 5]
    assert [s for s, _ in column(rows, "train/grad_norm")] == [2, 5]
    assert [s for s, _ in column(rows, "perf/global_batch")] == [2]


def test_default_callbacks_log_stats_for_the_autoencoder(compose_train):
    cfg = compose_train(["experiment=quickstart_autoencoder", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                         "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "logger=csv"])
    _, objects = train(cfg)
    assert any(isinstance(c, TrainingStats) for c in objects["trainer"].callbacks)
    rows = read_metrics(Path(objects["trainer"].logger.log_dir))
    assert [s for s, _ in column(rows, "perf/step_time")] == [0, 1]
    assert all(v > 0 for _, v in column(rows, "perf/samples_per_sec"))
    assert column(rows, "perf/global_batch") == [(0, cfg.data.batch_size)]
    # one norm per generator step, all from the model itself (the callback's would be a second row per step)
    assert [s for s, _ in column(rows, "train/grad_norm")] == [0, 1]


def test_rejects_a_bad_interval():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        TrainingStats(log_every_n_steps=0)
