"""Image decoding to RGB and the train/val image transform (PIL -> float tensor [3, H, W] in [-1, 1]).

Decoding policy (``to_rgb``):
- EXIF orientation is applied (phone photos are stored rotated).
- Transparency (RGBA, LA, PA, P with a transparent index) is composited on WHITE
  (``ALPHA_BACKGROUND``), the usual convention for product shots and logos.
- CMYK uses Pillow's conversion (no ICC colour management).
- 16-bit ("I;16*") and 32-bit integer ("I") grayscale are rescaled from 0..65535 to 0..255 (an "I"
  image whose values all fit in 0..255 is taken as 8-bit); float ("F") is taken as 0..1 when its
  maximum is <= 1, else as 0..255; out-of-range values are clipped.
- Everything else (L, 1, P, YCbCr, LAB, HSV, ...) goes through Pillow's ``convert("RGB")``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision.transforms.v2 import functional as TF

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Grayscale "I;16*" / "I" / "F" image -> 8-bit "L"."""
    values = np.asarray(image).astype(np.float64)  # [H, W]
    if image.mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    elif image.mode == "I" and values.size and values.max() <= 255:
        scale = 1.0
    else:
        scale = 255.0 / 65535.0
    gray = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray)


def to_rgb(image: Image.Image, alpha_background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """Any PIL image -> mode "RGB" following the module's decoding policy."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_l(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (*alpha_background, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> fully loaded RGB PIL image; raises on truncated or unknown data."""
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so truncated data fails here rather than later
    return to_rgb(image)


class ImageTransform:
    """PIL image (converted with ``to_rgb`` if not RGB) -> float32 tensor [3, size, size] in [-1, 1].

    The shorter side is resized to ``image_size`` (bicubic, antialiased; smaller images are upscaled),
    then a center crop, or a random crop when ``random_crop``. ``random_flip`` mirrors horizontally
    with p=0.5; keep it OFF for captions that say "left"/"right" (the shapes data does).
    Randomness comes from ``torch``'s generator, which DataLoader seeds differently per worker.
    """

    def __init__(self, image_size: int, random_crop: bool = False, random_flip: bool = False):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.random_crop = bool(random_crop)
        self.random_flip = bool(random_flip)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.image_size
        if image.mode != "RGB":
            image = to_rgb(image)
        if min(image.size) != size:
            image = TF.resize(image, [size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        width, height = image.size
        if self.random_crop:
            left = int(torch.randint(0, width - size + 1, ()).item())
            top = int(torch.randint(0, height - size + 1, ()).item())
        else:
            left, top = (width - size) // 2, (height - size) // 2
        if (width, height) != (size, size):
            image = image.crop((left, top, left + size, top + size))
        pixels = TF.pil_to_tensor(image)  # [3, H, W] uint8
        if self.random_flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return pixels.to(torch.float32).div_(127.5).sub_(1.0)  # [3, H, W] in [-1, 1]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, "
            f"random_crop={self.random_crop}, random_flip={self.random_flip})"
        )
