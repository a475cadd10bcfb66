"""Reference images for FID/KID and autoencoder metrics, read from WebDataset shards (the training format)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from ldm.data.webdataset import WebDataModule

log = logging.getLogger(__name__)


def shard_images(
    shards: str | Sequence[str], image_size: int, batch_size: int = 64, max_images: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield batches ``[B, 3, image_size, image_size]`` in ``[0, 1]`` from ``shards``, in shard order.

    Reads each shard once with the validation transform (resize + centre crop, no augmentation), stops
    after ``max_images`` and logs how many corrupt samples the loader skipped.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 (or null for all), got {max_images}.")
    data = WebDataModule(train_shards=None, val_shards=shards, image_size=image_size, batch_size=batch_size,
                         num_workers=0, pin_memory=False)
    data.setup("validate")
    seen, skipped = 0, 0
    for batch in data.val_dataloader():
        images = batch["image"]  # [B, 3, H, W] in [-1, 1]
        skipped += int(batch["n_skipped"])
        if max_images is not None:
            images = images[: max_images - seen]
        seen += len(images)
        yield ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        if max_images is not None and seen >= max_images:
            break
    if skipped:
        log.warning("%d corrupt sample(s) skipped while reading %s", skipped, shards)
    if seen == 0:
        raise ValueError(f"No readable images in {shards}.")
