"""Init image and mask files for `scripts/sample.py` (img2img / inpainting): PNG/JPEG -> tensors, with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.8, 1.0  # defaults when `strength` is unset (diffusers' pipeline defaults)


def _open(path: str, key: str) -> Image.Image:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist (relative paths are resolved from {Path.cwd()}).")
    try:
        image = Image.open(file)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{key}={path} is not a readable image ({err}); give a PNG or JPEG file.") from None
    if min(image.size) < 1:
        raise ValueError(f"{key}={path} is empty ({image.size[0]}x{image.size[1]} px).")
    return image


def load_init_image(path: str, height: int, width: int) -> torch.Tensor:
    """An RGB image file resized (bicubic; aspect ratio not kept) to height x width -> [1, 3, H, W] in [-1, 1]."""
    image = _open(path, "init_image").convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # [H, W, 3] in [0, 1]
    return (array.permute(2, 0, 1)[None] * 2 - 1).contiguous()


def load_mask(path: str, height: int, width: int, image_path: Optional[str] = None) -> torch.Tensor:
    """A mask file (white = repaint, black = keep; gray thresholded at 50 %), resized (nearest) to height x width
    -> [1, 1, H, W] in {0, 1}. With ``image_path``, the mask must have the init image's size before resizing."""
    mask = _open(path, "mask").convert("L")
    if image_path is not None:
        size = _open(image_path, "init_image").size
        if mask.size != size:
            raise ValueError(f"mask={path} is {mask.size[0]}x{mask.size[1]} px but init_image={image_path} is "
                             f"{size[0]}x{size[1]} px; draw the mask on the init image so both have the same size.")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.NEAREST)
    array = torch.from_numpy(np.asarray(mask, dtype=np.uint8) >= 128)  # [H, W]
    return array.float()[None, None]


@dataclass
class ImageRequest:
    """What `scripts/sample.py` passes to ``image_to_image`` and records in the PNG metadata."""

    kwargs: dict
    metadata: dict = field(default_factory=dict)


def image_request(cfg: DictConfig, height: int, width: int, file_hash) -> Optional[ImageRequest]:
    """img2img / inpainting options of a sample config; None for plain text-to-image."""
    init_path, mask_path, strength = cfg.get("init_image"), cfg.get("mask"), cfg.get("strength")
    if init_path is None:
        for key, value in (("mask", mask_path), ("strength", strength)):
            if value is not None:
                raise ValueError(f"{key}={value} needs an init_image=PATH (the picture to edit).")
        return None
    if strength is None:
        strength = INPAINT_STRENGTH if mask_path else IMG2IMG_STRENGTH
    paste, dilation = bool(cfg.get("paste", True)), int(cfg.get("paste_dilation", 0))
    kwargs = {"init_images": load_init_image(init_path, height, width), "strength": float(strength)}
    metadata = {"init_image": Path(init_path).name, "init_image_sha256": file_hash(init_path),
                "strength": float(strength)}
    if mask_path:
        kwargs.update(mask=load_mask(mask_path, height, width, init_path), paste=paste, paste_dilation=dilation)
        metadata.update(mask=Path(mask_path).name, mask_sha256=file_hash(mask_path), paste=paste,
                        paste_dilation=dilation)
    return ImageRequest(kwargs, metadata)
