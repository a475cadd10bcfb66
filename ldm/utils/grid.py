"""Labelled image grids as PIL images (for sample sheets, reconstructions and the docs)."""

from __future__ import annotations

import math
import textwrap
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def make_grid(
    images: torch.Tensor,
    captions: Optional[Sequence[str]] = None,
    ncol: Optional[int] = None,
    cell: Optional[int] = None,
    pad: int = 2,
) -> Image.Image:
    """Tile [N, 3, H, W] images in [0, 1] into one picture, each with its caption underneath.

    Small images are enlarged (nearest) to ``cell`` pixels (default: at least 96) so captions fit.
    """
    n = images.shape[0]
    if n == 0:
        raise ValueError("make_grid needs at least one image.")
    ncol = ncol or min(n, 8)
    nrow = math.ceil(n / ncol)
    h, w = images.shape[-2:]
    cell = cell or max(96, w)
    scale = cell / w
    cell_h, cell_w = int(round(h * scale)), cell
    font = ImageFont.load_default()
    chars_per_line = max(8, cell_w // 6)
    lines = [textwrap.wrap(c, chars_per_line)[:3] if c else [] for c in (captions or [""] * n)]
    text_h = 12 * max((len(ls) for ls in lines), default=0)
    sheet = Image.new("RGB", (ncol * (cell_w + pad) + pad, nrow * (cell_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, c = divmod(i, ncol)
        x0, y0 = pad + c * (cell_w + pad), pad + r * (cell_h + text_h + pad)
        tile = to_pil(images[i]).resize((cell_w, cell_h), Image.NEAREST if scale >= 2 else Image.BICUBIC)
        sheet.paste(tile, (x0, y0))
        for j, line in enumerate(lines[i]):
            draw.text((x0 + 1, y0 + cell_h + 12 * j), line, fill=(0, 0, 0), font=font)
    return sheet


def grid_array(images: torch.Tensor, captions: Optional[Sequence[str]] = None, ncol: Optional[int] = None) -> np.ndarray:
    """Same as ``make_grid`` but as an [H, W, 3] uint8 array (for loggers)."""
    return np.asarray(make_grid(images, captions, ncol))
