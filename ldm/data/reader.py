"""Analytic reader for shapes images: which palette color, shape, size, position and background does an image show?

Used to score generated images without a learned classifier. Works on the anti-aliased renders of
:mod:`ldm.data.synthetic` (and tolerates mild noise): the background is the median border color, each
pixel's foreground coverage ``alpha`` is its projection onto the background->foreground color line,
and the shape follows from the fill ratio ``area / (width * height)`` of the covered region
(square ~1, circle ~pi/4, upright triangle ~1/2). The size is the nearest of the renderer's box sides to the
larger covered extent, and the grid cell (row, column) the nearest of the three centres the renderer can give a
shape of that size, per axis, to the middle of the covered extent.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ldm.data.palette import BACKGROUND_COLORS, FOREGROUND_COLORS, nearest_color
from ldm.data.synthetic import COLUMNS, MARGIN, ROWS, SIZE_FRACTIONS

# Decision thresholds between the fill ratios of the three shapes. Ideal values are 1, pi/4, 1/2;
# measured on 32 px renders: squares 1.00, circles 0.78-0.79, triangles 0.52-0.61 (their apex is
# thinner than a pixel, so the measured extent shrinks), hence a triangle threshold above (pi/4 + 1/2) / 2.
_SQUARE_VS_CIRCLE = (1.0 + math.pi / 4) / 2
_CIRCLE_VS_TRIANGLE = 0.69
_MIN_CONTRAST = 40.0  # RGB distance below which a pixel counts as background


def _as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """[H, W, 3] float64 on the 0..255 scale from a PIL image, uint8 HWC array or float HWC in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape [H, W, 3], got array of shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
            raise ValueError("float images must be in [0, 1]; map [-1, 1] model outputs with (x + 1) / 2")
        return arr.astype(np.float64) * 255.0
    return arr.astype(np.float64)


def _grid_cell(center: float, side: float) -> int:
    """Index 0/1/2 of the renderer's cell whose centre (fractions of the image) is nearest ``center``."""
    low, high = MARGIN + side / 2, 1.0 - MARGIN - side / 2
    return int(np.argmin([abs(center - c) for c in (low, 0.5, high)]))


def read_shape_image(image: np.ndarray | Image.Image) -> dict[str, str | float | None]:
    """Read ``{"color", "shape", "fill_ratio", "size", "row", "column", "background"}``; all but the background
    are None when no foreground is found (and the shape attributes when nothing is clearly covered)."""
    arr = _as_rgb_array(image)  # [H, W, 3]
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # [4*side, 3]
    background = np.median(border, axis=0)  # [3]
    read: dict[str, str | float | None] = {"color": None, "shape": None, "fill_ratio": None, "size": None,
                                           "row": None, "column": None,
                                           "background": nearest_color(background, BACKGROUND_COLORS)}
    offset = arr - background  # [H, W, 3]
    distance = np.linalg.norm(offset, axis=-1)  # [H, W]
    if distance.max() < _MIN_CONTRAST:
        return read
    strong = distance > max(_MIN_CONTRAST, 0.5 * distance.max())  # [H, W] clearly foreground
    foreground = np.median(arr[strong], axis=0)  # [3]
    read["color"] = nearest_color(foreground, FOREGROUND_COLORS)
    direction = foreground - background  # [3]
    alpha = np.clip(offset @ direction / (direction @ direction), 0.0, 1.0)  # [H, W] coverage
    # Restrict to the bounding box of the clearly covered pixels, grown by one pixel for the soft edge.
    rows, cols = np.nonzero(alpha > 0.5)
    if rows.size == 0:
        return read
    r0, r1 = max(rows.min() - 1, 0), rows.max() + 2
    c0, c1 = max(cols.min() - 1, 0), cols.max() + 2
    alpha = alpha[r0:r1, c0:c1]
    width = alpha.max(axis=0).sum()  # horizontal extent: per-column peak coverage, summed
    height = alpha.max(axis=1).sum()  # vertical extent
    fill_ratio = float(alpha.sum() / (width * height))
    if fill_ratio >= _SQUARE_VS_CIRCLE:
        read["shape"] = "square"
    elif fill_ratio >= _CIRCLE_VS_TRIANGLE:
        read["shape"] = "circle"
    else:
        read["shape"] = "triangle"
    # Size and cell: the renderer draws each shape in a square box, so the larger extent is the box side
    # (a triangle's apex is thinner than a pixel); the box centre is the middle of the covered extents.
    h, w = arr.shape[:2]
    side = max(width / w, height / h)
    read["size"] = min(SIZE_FRACTIONS, key=lambda name: abs(SIZE_FRACTIONS[name] - side))
    col_peak, row_peak = alpha.max(axis=0), alpha.max(axis=1)  # [w'], [h'] per-column / per-row coverage
    center_x = (c0 + (np.arange(alpha.shape[1]) + 0.5) @ col_peak / col_peak.sum()) / w
    center_y = (r0 + (np.arange(alpha.shape[0]) + 0.5) @ row_peak / row_peak.sum()) / h
    read["column"] = COLUMNS[_grid_cell(float(center_x), side)]
    read["row"] = ROWS[_grid_cell(float(center_y), side)]
    read["fill_ratio"] = fill_ratio
    return read
