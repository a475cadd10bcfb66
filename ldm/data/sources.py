"""Map-style image-caption sources and the registry that builds them by name.

A source is any object with ``__len__`` and ``__getitem__(i) -> Sample``. Embedded sources (shapes,
digits, photos) need no download and are reproducible: sample ``i`` depends only on
``(seed, split, i)``, so any index can be regenerated on its own.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, TypedDict

import numpy as np
from PIL import Image

SPLITS = ("train", "val")
# Distinct entropy words per split, so train and val draw from disjoint random streams.
_SPLIT_CODES = {"train": 0x7472, "val": 0x7661}

# name -> "module:Class"; imported lazily so that e.g. scikit-image loads only when photos are used.
SOURCES: dict[str, str] = {
    "shapes": "ldm.data.synthetic:ShapesSource",
    "digits": "ldm.data.digits:DigitsSource",
    "photos": "ldm.data.photos:PhotosSource",
    "folder": "ldm.data.folder:FolderSource",
}


class Sample(TypedDict):
    """One image-caption pair as produced by a source."""

    key: str  # unique within the split; no dots (WebDataset splits file names at the first dot)
    image: Image.Image  # mode "RGB"
    caption: str
    meta: dict[str, Any]  # JSON-serialisable structured attributes


class Source(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


class SampleError(RuntimeError):
    """A single sample could not be produced (e.g. an unreadable image file); the message names it."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def check_index(index: int, length: int) -> int:
    """Normalise a (possibly negative) index, raising IndexError outside ``[-length, length)``."""
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for a source of {length} samples")
    return index % length


def index_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """Independent generator for one sample: depends only on (seed, split, index, stream)."""
    return np.random.default_rng([int(seed), _SPLIT_CODES[check_split(split)], int(index), int(stream)])


def build_source(name: str, **kwargs: Any) -> Source:
    """Construct a registered source, e.g. ``build_source("shapes", num_samples=100, resolution=32)``."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; registered sources: {sorted(SOURCES)}")
    module_name, class_name = SOURCES[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**kwargs)
