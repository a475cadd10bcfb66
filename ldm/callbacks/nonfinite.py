"""Skip optimizer steps whose loss or gradients are not finite; stop after too many in a row.

A NaN/Inf loss or gradient, applied once, poisons the weights (and the EMA, and every checkpoint
after it). This callback drops the gradients of such a step, so the optimizer leaves the weights,
its moments and its step counter untouched, counts the skipped step (``train/nonfinite_steps``,
cumulative) and, after ``max_consecutive`` skipped training batches in a row, raises
:class:`NonFiniteTrainingError` naming the step and the newest checkpoint (finite: skipped steps never
change the weights).

Works for automatic optimisation and for manual optimisation (``manual_backward`` + ``opt.step()``
or ``strategy.optimizer_step``), because both run Lightning's ``on_before_backward`` and
``on_before_optimizer_step`` hooks. Under DDP the skip decision is reduced over ranks so every rank
skips the same steps (weights stay identical). With fp16 grad scaling (``16-mixed``) non-finite
*gradients* are the scaler's job (it skips the step and lowers the scale); only a non-finite *loss*
is counted then. Cost: one host-device sync per optimizer step (plus one tiny all-reduce under DDP).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ldm.utils.step_logging import OnChangeLog

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


class NonFiniteGuard(L.Callback):
    """Skip and count optimizer steps with a non-finite loss or gradient norm.

    Args:
        max_consecutive: training batches in a row with a skipped step that stop the run.
        check_grads: also test the global gradient norm (catches NaNs born in backward).
    """

    def __init__(self, max_consecutive: int = 10, check_grads: bool = True):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.check_grads = bool(check_grads)
        self.total = 0  # training batches with at least one skipped optimizer step, over the run
        self.consecutive = 0
        self._loss_finite: Optional[torch.Tensor] = None  # AND over backward passes since the last step
        self._skipped_reason: Optional[str] = None  # set when this batch skipped a step
        self._stepped = False  # this batch reached an optimizer step (False while accumulating)
        self._log = OnChangeLog()

    # ------------------------------------------------------------------ detection
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # [] bool, stays on device
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = params[0].grad.device if params else pl_module.device
        loss_ok = torch.ones((), dtype=torch.bool, device=device) if self._loss_finite is None else self._loss_finite
        self._loss_finite = None
        grads_ok = torch.ones((), dtype=torch.bool, device=device)
        if self.check_grads and params and getattr(trainer.precision_plugin, "scaler", None) is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], error_if_nonfinite=False)
            grads_ok = torch.isfinite(norm)
        loss_ok, grads_ok = torch.stack([loss_ok.to(device), grads_ok]).tolist()  # the one host sync
        ok = trainer.strategy.reduce_boolean_decision(bool(loss_ok and grads_ok), all=True)
        self._stepped = True
        if ok:
            return
        for p in params:  # optimizers skip parameters without a gradient: no update, no moment/step change
            p.grad = None
        if not loss_ok:
            self._skipped_reason = "loss"
        elif not grads_ok:
            self._skipped_reason = "gradient"
        else:
            self._skipped_reason = self._skipped_reason or "loss or gradient on another rank"

    # ------------------------------------------------------------------ counting and stopping
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log.reset()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        reason, stepped = self._skipped_reason, self._stepped
        self._skipped_reason, self._stepped = None, False
        if reason is not None:
            self.total += 1
            self.consecutive += 1
            rank_zero_warn(
                f"non-finite {reason} at global step {trainer.global_step} (batch {batch_idx}): optimizer step "
                f"skipped ({self.consecutive} in a row, {self.total} in total; see train/nonfinite_steps)"
            )
        elif stepped:
            self.consecutive = 0
        self._log.log(pl_module, "train/nonfinite_steps", float(self.total))
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"Stopping: {self.consecutive} consecutive training steps had a non-finite {reason}, the last at "
                f"global step {trainer.global_step} (batch {batch_idx}). Their updates were skipped, so the weights "
                f"are still finite. Last finite checkpoint: {last_checkpoint(trainer) or 'none saved yet'}. "
                "Resume from it (ckpt_path=...) with a lower learning rate, gradient clipping "
                "(trainer.gradient_clip_val or model.grad_clip) or bf16/fp32 precision, or raise "
                "callbacks.nonfinite.max_consecutive."
            )

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total = int(state_dict.get("total", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def last_checkpoint(trainer: L.Trainer) -> Optional[str]:
    """The most recently written checkpoint file of any ModelCheckpoint callback, if one exists."""
    paths = []
    for callback in trainer.checkpoint_callbacks:
        for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")):
            if path and os.path.isfile(path):
                paths.append(path)
    return max(paths, key=os.path.getmtime) if paths else None
