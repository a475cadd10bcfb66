"""Image-caption data: embedded sources, WebDataset shard writing, and the Lightning DataModule.

    sources (shapes, digits, photos, folder) --write_shards--> .tar shards --WebDataModule--> batches

Names are imported lazily, so ``import ldm.data.synthetic`` does not pull in Lightning or WebDataset.
See docs/data.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShapesSource": "ldm.data.synthetic",
    "canonical_prompts": "ldm.data.synthetic",
    "DigitsSource": "ldm.data.digits",
    "PhotosSource": "ldm.data.photos",
    "FolderSource": "ldm.data.folder",
    "Sample": "ldm.data.sources",
    "SampleError": "ldm.data.sources",
    "build_source": "ldm.data.sources",
    "read_shape_image": "ldm.data.reader",
    "ImageTransform": "ldm.data.transforms",
    "to_rgb": "ldm.data.transforms",
    "ShardSummary": "ldm.data.shards",
    "write_shards": "ldm.data.shards",
    "build_embedded_shards": "ldm.data.shards",
    "WebDataModule": "ldm.data.webdataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ldm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
