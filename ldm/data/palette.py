"""Named colors of the procedural shapes data: the words captions use and the RGB values rendered.

Foreground and background sets are disjoint by construction: every foreground color is far (> 150 in
RGB Euclidean distance) from every background, so a reader can always separate shape from background.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

RGB = tuple[int, int, int]

FOREGROUND_COLORS: dict[str, RGB] = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 220, 220),
}

BACKGROUND_COLORS: dict[str, RGB] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}


def nearest_color(rgb: np.ndarray | tuple[float, float, float], palette: Mapping[str, RGB] = FOREGROUND_COLORS) -> str:
    """Name of the palette entry closest to ``rgb`` (Euclidean distance in RGB, 0..255 scale)."""
    names = list(palette)
    table = np.asarray([palette[n] for n in names], dtype=np.float64)  # [K, 3]
    dist = np.linalg.norm(table - np.asarray(rgb, dtype=np.float64)[None, :], axis=1)  # [K]
    return names[int(dist.argmin())]


def min_foreground_background_distance() -> float:
    """Smallest RGB distance between any foreground and any background color (a design invariant)."""
    fg = np.asarray(list(FOREGROUND_COLORS.values()), dtype=np.float64)  # [F, 3]
    bg = np.asarray(list(BACKGROUND_COLORS.values()), dtype=np.float64)  # [B, 3]
    return float(np.linalg.norm(fg[:, None, :] - bg[None, :, :], axis=-1).min())
