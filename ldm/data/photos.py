"""Natural-image crops without a download: photographs bundled with scikit-image.

Each sample picks one photo, rescales it so its shorter side is ``crop * U(zoom_range)`` (never above
the original size; Lanczos, i.e. antialiased) and takes a random ``crop x crop`` window. One photo
(``val_photo``) is held out: the val split crops only it, the train split never sees it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from ldm.data.sources import Sample, check_index, check_split, index_rng

# name -> (scikit-image loader, caption). All ship inside the scikit-image wheel (no pooch download).
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("astronaut", "a photo of an astronaut"),
    "coffee": ("coffee", "a photo of a cup of coffee"),
    "chelsea": ("chelsea", "a photo of a cat"),
    "rocket": ("rocket", "a photo of a rocket on a launch pad"),
    "motorcycle": ("stereo_motorcycle", "a photo of a motorcycle"),
    "hubble_deep_field": ("hubble_deep_field", "a photo of galaxies in deep space"),
    "immunohistochemistry": ("immunohistochemistry", "a microscope photo of stained tissue"),
    "camera": ("camera", "a black and white photo of a man with a camera"),
}
DEFAULT_VAL_PHOTO = "coffee"


@lru_cache(maxsize=None)
def load_photo(name: str) -> Image.Image:
    """The bundled photograph ``name`` as an RGB PIL image (cached per process)."""
    import skimage.data

    array = getattr(skimage.data, PHOTOS[name][0])()
    if isinstance(array, tuple):  # stereo_motorcycle -> (left, right, disparity)
        array = array[0]
    image = Image.fromarray(np.ascontiguousarray(array))
    return image.convert("RGB")


class PhotosSource:
    """``num_samples`` random ``crop``-px crops of the bundled photos of one split."""

    def __init__(
        self,
        num_samples: int,
        crop: int = 64,
        split: str = "train",
        seed: int = 0,
        photos: Sequence[str] | None = None,
        val_photo: str = DEFAULT_VAL_PHOTO,
        zoom_range: tuple[float, float] = (1.0, 4.0),
    ):
        pool = tuple(photos) if photos is not None else tuple(PHOTOS)
        unknown = [p for p in pool if p not in PHOTOS]
        if unknown:
            raise ValueError(f"unknown photos {unknown}; available: {sorted(PHOTOS)}")
        if val_photo not in pool:
            raise ValueError(f"val_photo {val_photo!r} must be one of the photos {list(pool)}")
        if len(pool) < 2:
            raise ValueError("need at least two photos: one is held out for validation")
        low, high = zoom_range
        if not 1.0 <= low <= high:
            raise ValueError(f"zoom_range must satisfy 1 <= low <= high, got {zoom_range}")
        if num_samples < 0 or crop < 8:
            raise ValueError(f"need num_samples >= 0 and crop >= 8, got {num_samples} and {crop}")
        self.num_samples = int(num_samples)
        self.crop = int(crop)
        self.split = check_split(split)
        self.seed = int(seed)
        self.zoom_range = (float(low), float(high))
        self.val_photo = val_photo
        self.photos = (val_photo,) if self.split == "val" else tuple(p for p in pool if p != val_photo)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        rng = index_rng(self.seed, self.split, index)
        name = self.photos[rng.integers(len(self.photos))]
        photo = load_photo(name)
        width, height = photo.size
        short = min(width, height)
        target_short = min(short, self.crop * rng.uniform(*self.zoom_range))
        scale = max(target_short, self.crop) / short  # <= 1 unless the photo is smaller than the crop
        # The crop window in original-photo pixels; only that region is resampled.
        side = self.crop / scale
        x0 = rng.uniform(0, width - side) if width > side else 0.0
        y0 = rng.uniform(0, height - side) if height > side else 0.0
        box = (x0, y0, x0 + side, y0 + side)
        image = photo.resize((self.crop, self.crop), Image.Resampling.LANCZOS, box=box)
        meta = {"photo": name, "box": [round(v, 2) for v in box], "scale": round(scale, 4)}
        return {"key": f"photos_{self.split}_{index:08d}", "image": image, "caption": PHOTOS[name][1], "meta": meta}
