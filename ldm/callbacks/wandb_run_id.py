"""Keep the W&B run id in every checkpoint, so a resumed training continues the same W&B run.

:class:`WandbRunId` writes the id of the run's :class:`~lightning.pytorch.loggers.WandbLogger` into the
checkpoint as ``checkpoint["wandb_run_id"]`` (a plain ``str``: the checkpoint still loads with
``weights_only=True``). :func:`read_wandb_run_id` reads it back before the loggers of a resumed run are
built; ``train.py`` then passes it to ``WandbLogger(id=...)`` (see :func:`ldm.utils.run.continue_wandb_run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ldm.checkpoints import load_checkpoint

CHECKPOINT_KEY = "wandb_run_id"


class WandbRunId(L.Callback):
    """Store the W&B run id in each checkpoint under ``"wandb_run_id"``; does nothing without a WandbLogger."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # `version` is the live run's id, or the id the logger was given; it never starts a run itself
        ids = {str(lg.version) for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg.version}
        if len(ids) > 1:
            rank_zero_warn(f"Several W&B runs are logged to ({sorted(ids)}); the checkpoint keeps none of their ids, "
                           f"so a resume from it starts a new W&B run.")
        elif ids:
            checkpoint[CHECKPOINT_KEY] = ids.pop()


def read_wandb_run_id(ckpt_path: str | Path) -> str | None:
    """The W&B run id stored in a Lightning checkpoint by :class:`WandbRunId`, or None if it holds none.

    The file is memory-mapped, so reading one string does not load the weights.
    """
    return wandb_run_id_in(load_checkpoint(ckpt_path, mmap=True))


def wandb_run_id_in(checkpoint: Any) -> str | None:
    """The W&B run id in an already loaded checkpoint dict, or None."""
    run_id = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    return str(run_id) if run_id else None
