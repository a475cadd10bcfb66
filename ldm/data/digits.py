"""Real handwriting without a download: scikit-learn's bundled 8x8 digits (UCI optdigits test set).

Each 8x8 image (ink intensity 0..16) is upscaled with bicubic interpolation to ``resolution`` and
rendered as white ink on black RGB. The train/val split is fixed, stratified by label and seeded by
``split_seed`` (independent of the caption ``seed``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from ldm.data.sources import Sample, check_index, check_split, index_rng

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "a handwritten {number}",
    "the digit {number}",
    "the number {word}",
    "a handwritten number {word}",
    "the digit {word}, handwritten",
)


@lru_cache(maxsize=4)
def _split_arrays(split: str, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 8, 8] float 0..16, labels [N]) of one split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, val_idx = train_test_split(
        np.arange(len(digits.target)), test_size=val_fraction, stratify=digits.target, random_state=split_seed
    )
    idx = np.sort(train_idx if split == "train" else val_idx)
    return digits.images[idx], digits.target[idx]


def digit_caption(label: int, rng: np.random.Generator) -> str:
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(word=DIGIT_WORDS[label], number=label)


class DigitsSource:
    """The 1797 scikit-learn digits, split ``1 - val_fraction`` / ``val_fraction``, at ``resolution`` px."""

    def __init__(
        self, resolution: int = 32, split: str = "train", seed: int = 0, val_fraction: float = 0.1, split_seed: int = 0
    ):
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8 (the native digit size), got {resolution}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.resolution = int(resolution)
        self.split = check_split(split)
        self.seed = int(seed)
        self.images, self.labels = _split_arrays(self.split, float(val_fraction), int(split_seed))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        ink = np.round(self.images[index] * (255.0 / 16.0)).astype(np.uint8)  # [8, 8]
        gray = Image.fromarray(ink).resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        label = int(self.labels[index])
        caption = digit_caption(label, index_rng(self.seed, self.split, index))
        key = f"digits_{self.split}_{index:08d}"
        return {"key": key, "image": gray.convert("RGB"), "caption": caption, "meta": {"label": label}}
