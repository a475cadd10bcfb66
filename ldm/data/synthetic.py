"""Procedural shapes: one colored circle / square / triangle per image, with a varied caption.

Every attribute the caption can mention (color, shape, size, position, background) is visible in the
image, and the exact values are in ``meta`` so evaluation can check generated images analytically
(see :func:`ldm.data.reader.read_shape_image`). Shapes are axis-aligned (unrotated square, upright
triangle) and rendered anti-aliased (4x supersampling, then box downsampling = exact area coverage).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ldm.data.palette import BACKGROUND_COLORS, FOREGROUND_COLORS, RGB
from ldm.data.sources import Sample, check_index, check_split, index_rng

SHAPES = ("circle", "square", "triangle")
# Side of the shape's (square) bounding box as a fraction of the image side; the smallest stays
# recognisable at 32 px (about 10 px).
SIZE_FRACTIONS = {"small": 0.30, "medium": 0.41, "large": 0.52}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
POSITION_PHRASES = {
    ("top", "left"): "in the top left",
    ("top", "center"): "at the top",
    ("top", "right"): "in the top right",
    ("middle", "left"): "on the left",
    ("middle", "center"): "in the center",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left",
    ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
BACKGROUND_PHRASES = ("on a {} background", "on {}", "against a {} background")
CAPTION_PREFIXES = ("", "", "", "", "a picture of ", "an image of ")
CAPTION_DETAILS = ("varied", "full", "short")
# How often a `varied` caption names each optional attribute (colour and shape are always named). The quickstart
# model put the shape in the named cell 0.26-0.37 of the time with the cell named in 1/2 of the captions and every
# time with 4/5 or 9/10; named in all of them, it drew "a red circle" (no cell named) in the centre almost always
# (BENCHMARKS.md, "How often the captions name the cell").
MENTION_PROBABILITY = {"size": 0.5, "position": 0.8, "background": 0.5}
MARGIN = 0.06  # free border (fraction of the side) so the border shows only background
JITTER = 0.03  # random offset of the shape centre / relative size jitter


def canonical_prompts(colors: Sequence[str] = tuple(FOREGROUND_COLORS), shapes: Sequence[str] = SHAPES) -> list[str]:
    """The short evaluation prompts ``"a {color} {shape}"`` for every color x shape."""
    return [f"a {color} {shape}" for color in colors for shape in shapes]


def detailed_prompts(colors: Sequence[str] = tuple(FOREGROUND_COLORS), shapes: Sequence[str] = SHAPES) -> list[str]:
    """Three prompts per color x shape in the full caption grammar, ``"a {size} {color} {shape} {position} on a
    {background} background"``: each size and background equally often, every grid cell (for 18 color x shape)
    six times."""
    sizes, cells, backgrounds = list(SIZE_FRACTIONS), list(POSITION_PHRASES), list(BACKGROUND_COLORS)
    prompts = []
    for i, (color, shape) in enumerate((c, s) for c in colors for s in shapes):
        for j, size in enumerate(sizes):
            position = POSITION_PHRASES[cells[(i + 3 * j) % len(cells)]]
            background = backgrounds[(i + j) % len(backgrounds)]
            prompts.append(f"a {size} {color} {shape} {position} on a {background} background")
    return prompts


def _axis_center(cell: int, side: float, rng: np.random.Generator) -> float:
    """Centre coordinate (fraction of the image) of a shape of ``side`` in grid cell 0/1/2."""
    low, high = MARGIN + side / 2, 1.0 - MARGIN - side / 2
    center = (low, 0.5, high)[cell] + rng.uniform(-JITTER, JITTER)
    return float(np.clip(center, low, high))


def render_shape(
    shape: str, color: RGB, background: RGB, box: Sequence[float], resolution: int, supersample: int = 4
) -> Image.Image:
    """Draw ``shape`` filling ``box`` = (x0, y0, x1, y1) in pixels of the final ``resolution``."""
    size = resolution * supersample
    x0, y0, x1, y1 = (round(v * supersample) for v in box)
    canvas = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=color)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=color)
    elif shape == "triangle":
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def shape_caption(
    attrs: dict, rng: np.random.Generator, detail: str = "varied", mention: Mapping[str, float] | None = None
) -> str:
    """Caption for the attributes (``detail``: one of :data:`CAPTION_DETAILS`).

    ``varied`` names size, position and background each with its probability in ``mention`` (default
    :data:`MENTION_PROBABILITY`), in a random order, after a random prefix; ``full`` names all five attributes in one
    fixed grammar; ``short`` is ``"a {color} {shape}"``. The three mention draws do not depend on ``mention``, so
    raising a probability names that attribute in a superset of the captions (the wording draws after them shift).
    """
    color, shape, size, background = attrs["color"], attrs["shape"], attrs["size"], attrs["background"]
    position = POSITION_PHRASES[(attrs["row"], attrs["column"])]
    if detail == "short":
        return f"a {color} {shape}"
    if detail == "full":
        return f"a {size} {color} {shape} {position} on a {background} background"
    if detail != "varied":
        raise ValueError(f"caption_detail must be one of {CAPTION_DETAILS}, got {detail!r}")
    mention = {**MENTION_PROBABILITY, **(mention or {})}
    with_size, with_position, with_background = rng.random(3) < [mention[k] for k in ("size", "position", "background")]
    noun = f"{size} {color} {shape}" if with_size else f"{color} {shape}"
    extras = []
    if with_position:
        extras.append(position)
    if with_background:
        extras.append(BACKGROUND_PHRASES[rng.integers(len(BACKGROUND_PHRASES))].format(background))
    extras = [extras[i] for i in rng.permutation(len(extras))]
    prefix = CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))]
    return " ".join([f"{prefix}a {noun}", *extras])


class ShapesSource:
    """``num_samples`` procedurally rendered shapes at ``resolution`` px (square images)."""

    def __init__(
        self,
        num_samples: int,
        resolution: int = 32,
        seed: int = 0,
        split: str = "train",
        shapes: Sequence[str] = SHAPES,
        colors: Sequence[str] | None = None,
        backgrounds: Sequence[str] | None = None,
        caption_detail: str = "varied",
        mention_probability: Mapping[str, float] | None = None,
        shape_words: Mapping[str, str] | None = None,
        replay_fraction: float = 0.0,
    ):
        """``caption_detail`` picks the caption grammar and ``mention_probability`` how often a ``varied`` caption
        names size, position and background (:func:`shape_caption`; unnamed keys keep :data:`MENTION_PROBABILITY`).
        ``shape_words`` renames shapes in the captions (e.g. ``{"triangle": "wedge"}`` teaches a new word);
        ``meta["shape"]`` keeps the drawn shape. ``replay_fraction`` of the samples ignore ``shapes`` and
        ``shape_words`` (every shape, original words): rehearsal of what a fine-tune should not forget."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if resolution < 16:
            raise ValueError(f"resolution must be >= 16 px for recognisable shapes, got {resolution}")
        self.colors = tuple(colors) if colors is not None else tuple(FOREGROUND_COLORS)
        self.backgrounds = tuple(backgrounds) if backgrounds is not None else tuple(BACKGROUND_COLORS)
        for name, chosen, allowed in (
            ("shapes", shapes, SHAPES),
            ("colors", self.colors, FOREGROUND_COLORS),
            ("backgrounds", self.backgrounds, BACKGROUND_COLORS),
        ):
            unknown = [c for c in chosen if c not in allowed]
            if unknown or not chosen:
                raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}, got {list(chosen)}")
        if caption_detail not in CAPTION_DETAILS:
            raise ValueError(f"caption_detail must be one of {CAPTION_DETAILS}, got {caption_detail!r}")
        mention = dict(mention_probability or {})
        bad = {k: v for k, v in mention.items() if k not in MENTION_PROBABILITY or not 0.0 <= float(v) <= 1.0}
        if bad:
            raise ValueError(
                f"mention_probability maps {list(MENTION_PROBABILITY)} to probabilities in [0, 1], got {bad}"
            )
        self.mention_probability = {**MENTION_PROBABILITY, **{k: float(v) for k, v in mention.items()}}
        self.shape_words = {shape: shape for shape in SHAPES}
        for shape, word in dict(shape_words or {}).items():
            if shape not in SHAPES or not str(word).isalpha():
                raise ValueError(f"shape_words maps shapes {list(SHAPES)} to single words, got {shape!r}: {word!r}")
            self.shape_words[shape] = str(word).lower()
        if not 0.0 <= replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction must lie in [0, 1], got {replay_fraction}")
        self.replay_fraction = float(replay_fraction)
        self.num_samples = int(num_samples)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.split = check_split(split)
        self.shapes = tuple(shapes)
        self.caption_detail = caption_detail

    def __len__(self) -> int:
        return self.num_samples

    def prompts(self) -> list[str]:
        """Canonical short prompts ``"a {color} {shape}"`` over this source's colors and shapes."""
        return canonical_prompts(self.colors, [self.shape_words[s] for s in self.shapes])

    def attributes(self, index: int) -> dict:
        """Structured attributes of sample ``index`` (what the image shows)."""
        index = check_index(index, len(self))
        rng = index_rng(self.seed, self.split, index, stream=0)
        size = ("small", "medium", "large")[rng.integers(3)]
        replay = self.replay_fraction > 0 and bool(index_rng(self.seed, self.split, index, stream=2).random()
                                                   < self.replay_fraction)
        shapes = SHAPES if replay else self.shapes
        attrs = {
            "shape": shapes[rng.integers(len(shapes))],
            "color": self.colors[rng.integers(len(self.colors))],
            "background": self.backgrounds[rng.integers(len(self.backgrounds))],
            "size": size,
            "row": ROWS[rng.integers(3)],
            "column": COLUMNS[rng.integers(3)],
        }
        side = SIZE_FRACTIONS[size] * rng.uniform(1.0 - JITTER, 1.0 + JITTER)
        cx = _axis_center(COLUMNS.index(attrs["column"]), side, rng)
        cy = _axis_center(ROWS.index(attrs["row"]), side, rng)
        # Snap to the supersampling grid so meta["bbox"] is exactly what is drawn.
        box = [round((c + d * side / 2) * self.resolution * 4) / 4 for c, d in ((cx, -1), (cy, -1), (cx, 1), (cy, 1))]
        attrs["position"] = POSITION_PHRASES[(attrs["row"], attrs["column"])]
        attrs["bbox"] = [box[0], box[1], box[2], box[3]]  # (x0, y0, x1, y1) in pixels
        if self.replay_fraction > 0:
            attrs["replay"] = replay
        return attrs

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        attrs = self.attributes(index)
        color, background = FOREGROUND_COLORS[attrs["color"]], BACKGROUND_COLORS[attrs["background"]]
        image = render_shape(attrs["shape"], color, background, attrs["bbox"], self.resolution)
        named = {**attrs, "shape": attrs["shape"] if attrs.get("replay") else self.shape_words[attrs["shape"]]}
        caption = shape_caption(named, index_rng(self.seed, self.split, index, stream=1), self.caption_detail,
                                self.mention_probability)
        return {"key": f"shapes_{self.split}_{index:08d}", "image": image, "caption": caption, "meta": attrs}
