"""Send one captioned image grid to every logger attached to a Lightning trainer.

- W&B: ``WandbLogger.log_image`` (a ``wandb.Image``; the captions also go in its caption)
- TensorBoard: ``add_image`` (and ``add_text`` with the captions)
- any other logger with a directory (CSV, ...): a PNG under ``<log_dir>/images/``, captions in its text chunks

The grid is ``ldm.utils.grid.make_grid`` (each caption drawn under its image). Runs on global rank zero
only; a trainer without loggers makes it a no-op.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.utils.grid import make_grid


@rank_zero_only
def log_image_grid(
    trainer,
    key: str,
    images: torch.Tensor,
    step: int,
    captions: Sequence[str] | None = None,
    ncol: int | None = None,
) -> list[Path]:
    """Log ``images`` [N, 1 or 3, H, W] in [0, 1] as one grid to each of ``trainer.loggers``.

    ``captions`` has one entry per image. Returns the PNG files written (for directory-based loggers).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W] in [0, 1]; got shape {tuple(images.shape)}.")
    if captions is not None and len(captions) != images.shape[0]:
        raise ValueError(f"Got {len(captions)} captions for {images.shape[0]} images.")
    loggers = list(getattr(trainer, "loggers", None) or [])
    if not loggers:
        return []
    images = images.detach().float().cpu().expand(-1, 3, -1, -1)  # grey -> RGB
    grid = make_grid(images, captions, ncol=ncol)  # PIL RGB image
    caption = " | ".join(captions) if captions else ""
    written: list[Path] = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid], step=step, caption=[caption])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, np.asarray(grid), global_step=step, dataformats="HWC")
            if caption:
                logger.experiment.add_text(f"{key}/captions", caption, global_step=step)
        else:
            log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            if log_dir is None:
                rank_zero_warn(f"{type(logger).__name__} has no log_dir/save_dir; image grid '{key}' not saved.")
                continue
            written.append(_save_png(grid, Path(log_dir) / "images", key, step, caption))
    return written


def _save_png(grid: Image.Image, folder: Path, key: str, step: int, caption: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_")
    path = folder / f"{name}_step{step:08d}.png"
    info = PngInfo()
    info.add_text("key", key)
    info.add_text("step", str(step))
    if caption:
        info.add_text("captions", caption)
    grid.save(path, pnginfo=info)
    return path
