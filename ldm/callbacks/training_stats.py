"""Log throughput, gradient norm and memory every N optimizer steps, to every logger.

Keys (rank 0's values, written to every logger: W&B, TensorBoard, CSV):

- ``perf/step_time``: wall-clock seconds per optimizer step, averaged over the interval (validation
  excluded; data loading, checkpointing and sample grids included: they are part of training's cost);
- ``perf/samples_per_sec``: global training samples per second (local samples x world size / time);
- ``perf/global_batch``: samples per optimizer step over all ranks (batch x world size x accumulation),
  logged once per fit;
- ``train/grad_norm``: total L2 norm of the gradients the optimizer is about to apply (before clipping),
  automatic optimisation only: manually optimised models (the autoencoder) log their own;
- ``perf/cuda_max_allocated_gb``: peak CUDA memory allocated by tensors since the previous log, in GiB
  (the peak is reset after each log); CUDA runs only;
- ``perf/cpu_rss_gb``: resident memory of the process in GiB (psutil; without it, the peak RSS from
  ``resource.getrusage``).

Between logging steps the callback reads ``time.perf_counter()`` and a batch length, nothing else: no
host-device synchronisation (unlike Lightning's ``ThroughputMonitor``, which synchronises CUDA every batch).
Values go straight to ``trainer.loggers`` at Lightning's step, as ``LearningRateMonitor`` does:
``pl_module.log`` would re-write a stale step value at every later ``trainer.log_every_n_steps``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

try:
    from torch.distributed.fsdp import FullyShardedDataParallel
except ImportError:  # torch built without distributed support
    FullyShardedDataParallel = None

_GIB = float(2**30)


class TrainingStats(L.Callback):
    """Every ``log_every_n_steps`` optimizer steps, log step time, throughput, gradient norm and memory.

    Args:
        log_every_n_steps: logging interval in optimizer steps; ``None`` uses ``trainer.log_every_n_steps``
            (and logs nothing when that is 0).
    """

    def __init__(self, log_every_n_steps: int | None = None):
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1 or null (use the trainer's), got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.interval = 0  # resolved in setup; 0 logs nothing
        self._process = None  # psutil.Process, when psutil is importable
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_start: float | None = None  # perf_counter at the start of the current interval
        self._window_step = 0  # trainer.global_step at the start of the current interval
        self._window_samples = 0  # local samples seen in the current interval
        self._paused_at: float | None = None  # perf_counter when validation began
        self._last_step = 0  # trainer.global_step after the previous batch
        self._grad_norm: torch.Tensor | None = None  # [] measured before this interval's last step
        self._global_batch_logged = False
        self._warned_no_images = False

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.interval = self.log_every_n_steps if self.log_every_n_steps is not None else trainer.log_every_n_steps
        try:
            import psutil

            self._process = psutil.Process()
        except ImportError:
            self._process = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_window()
        self._last_step = self._window_step = trainer.global_step  # resumed runs start mid-way
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    # ------------------------------------------------------------------ timing
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused_at is not None:
            if self._window_start is not None:  # validation time is not training time
                self._window_start += time.perf_counter() - self._paused_at
            self._paused_at = None

    # ------------------------------------------------------------------ gradient norm
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.interval or not pl_module.automatic_optimization:
            return  # manually optimised models log their own norm (and may step several optimizers)
        if (trainer.global_step + 1) % self.interval == 0:  # global_step counts this step once it is taken
            self._grad_norm = total_grad_norm(trainer, optimizer)

    # ------------------------------------------------------------------ throughput, memory, writing
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.interval:
            return
        local_batch = self._batch_size(batch)
        self._window_samples += local_batch or 0
        step, previous = trainer.global_step, self._last_step
        self._last_step = step
        if step == previous or step // self.interval == previous // self.interval:
            return  # accumulating, or no interval boundary crossed by this batch
        now = time.perf_counter()
        seconds, steps, samples = now - self._window_start, step - self._window_step, self._window_samples
        grad_norm, self._grad_norm = self._grad_norm, None
        self._window_start, self._window_step, self._window_samples = now, step, 0
        if trainer.is_global_zero and trainer.loggers:
            metrics = {"perf/step_time": seconds / steps, "perf/cpu_rss_gb": self._cpu_rss_bytes() / _GIB}
            if samples:
                metrics["perf/samples_per_sec"] = samples * trainer.world_size / seconds
            if local_batch and not self._global_batch_logged:
                metrics["perf/global_batch"] = float(local_batch * trainer.world_size * trainer.accumulate_grad_batches)
                self._global_batch_logged = True
            if grad_norm is not None:
                metrics["train/grad_norm"] = grad_norm.item()  # the one host sync, on logging steps only
            if pl_module.device.type == "cuda":
                metrics["perf/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / _GIB
            # the step Lightning writes this batch's own metrics at (LearningRateMonitor uses it too)
            log_step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=log_step)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def _batch_size(self, batch: Any) -> int | None:
        # images, or cached latents (ldm.data.latents)
        images = batch.get("image", batch.get("latent_mean")) if isinstance(batch, Mapping) else None
        if torch.is_tensor(images) and images.ndim > 0:
            return len(images)
        if not self._warned_no_images:
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            rank_zero_warn(
                f"TrainingStats reads the batch size from batch['image'] or ['latent_mean'] but the batch has {found}: "
                "perf/samples_per_sec and perf/global_batch are not logged."
            )
            self._warned_no_images = True
        return None

    def _cpu_rss_bytes(self) -> float:
        if self._process is not None:
            return float(self._process.memory_info().rss)
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak RSS: KiB on Linux, bytes on macOS
        return float(peak if sys.platform == "darwin" else peak * 1024)


def total_grad_norm(trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Total L2 norm of the gradients of ``optimizer``'s parameters (over all shards under FSDP); None if none."""
    model = trainer.strategy.model
    if FullyShardedDataParallel is not None and isinstance(model, FullyShardedDataParallel):
        # each rank holds a shard of every gradient: FSDP reduces the norm over ranks
        return model.clip_grad_norm_(math.inf)  # an infinite max norm leaves the gradients unchanged
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None  # e.g. NonFiniteGuard dropped this step's gradients
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)  # [] on the gradients' device
