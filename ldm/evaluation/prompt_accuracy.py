"""Does a generated image show what its prompt asked for?

- shapes: the analytic reader (``ldm.data.reader``) reads color and shape; both must match the prompt
  (``prompt_accuracy``). A prompt that also names a size, a position or a background in the words of the training
  captions ("a small red circle in the top left on a black background") is scored on those too; where it leaves one
  unnamed, ``{detail}_spread`` says how varied the generated images are in it.
- digits: a classifier trained on the real scikit-learn digits reads the digit.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.digits import DIGIT_WORDS
from ldm.data.palette import BACKGROUND_COLORS, FOREGROUND_COLORS
from ldm.data.reader import read_shape_image
from ldm.data.synthetic import POSITION_PHRASES, SHAPES, SIZE_FRACTIONS

DETAILS = ("size", "position", "background")  # scored where a prompt names them
DETAIL_VALUES = {  # what the reader can read for each detail (the training images hold each equally often)
    "size": tuple(SIZE_FRACTIONS),
    "position": tuple(f"{row} {column}" for row, column in POSITION_PHRASES),
    "background": tuple(BACKGROUND_COLORS),
}
# the captions' position phrases, longest first: "in the top left" is matched before any phrase inside it
_POSITIONS = sorted(((phrase, f"{row} {column}") for (row, column), phrase in POSITION_PHRASES.items()),
                    key=lambda item: -len(item[0]))


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", prompt.lower())


def expected_shape_attributes(prompt: str, shape_aliases: Optional[Mapping[str, str]] = None) -> Optional[dict[str, str]]:
    """{"color", "shape"} named by a prompt such as "a small red circle on black"; None if it names neither.
    ``shape_aliases`` reads extra words as shapes, e.g. {"wedge": "triangle"} after fine-tuning a new word."""
    aliases = {w.lower(): s for w, s in (shape_aliases or {}).items()}
    unknown = sorted(s for s in aliases.values() if s not in SHAPES)
    if unknown:
        raise ValueError(f"shape_aliases must map words to shapes {list(SHAPES)}, got {unknown}.")
    words = _words(prompt)
    colors = [w for w in words if w in FOREGROUND_COLORS]
    shapes = [aliases.get(w, w) for w in words if w in SHAPES or w in aliases]
    if not colors or not shapes:
        return None
    return {"color": colors[0], "shape": shapes[0]}


def expected_details(prompt: str) -> dict[str, str]:
    """The size ("small"), position ("top left", "middle center") and background ("black") a prompt names in the
    words of the shapes captions (``ldm.data.synthetic``); only the ones it names."""
    words = _words(prompt)
    details = {}
    sizes = [w for w in words if w in SIZE_FRACTIONS]
    backgrounds = [w for w in words if w in BACKGROUND_COLORS]
    if sizes:
        details["size"] = sizes[0]
    if backgrounds:
        details["background"] = backgrounds[0]
    text = f" {' '.join(words)} "
    position = next((cell for phrase, cell in _POSITIONS if f" {phrase} " in text), None)
    if position is not None:
        details["position"] = position
    return details


def expected_digit(prompt: str) -> Optional[int]:
    """The digit a prompt names ("a handwritten digit seven", "the digit 7"); None otherwise."""
    for word in _words(prompt):
        if word in DIGIT_WORDS:
            return DIGIT_WORDS.index(word)
        if word.isdigit() and len(word) == 1:
            return int(word)
    return None


def normalised_entropy(values: Sequence[str], support: Sequence[str]) -> float:
    """Shannon entropy of the empirical distribution of ``values`` divided by log(len(support)): 1 when every value
    of ``support`` occurs equally often, 0 when one value always does."""
    counts = np.array([sum(v == s for v in values) for s in support], dtype=float)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(support)))


def shapes_accuracy(images: torch.Tensor, prompts: Sequence[str],
                    shape_aliases: Optional[Mapping[str, str]] = None) -> dict:
    """images: [N, 3, H, W] in [0, 1]. Returns accuracies (color, shape, both) overall and per prompt.

    Where prompts name sizes, positions or backgrounds: ``{detail}_accuracy`` over the images whose prompt names
    that detail (``{detail}_images`` of them), and ``caption_accuracy``, the images with every named attribute
    right (color and shape included). Where prompts leave a detail unnamed: ``{detail}_spread``, the normalised
    entropy of the read values over those images (:func:`normalised_entropy`; the training images are uniform in
    each, so a model that samples their distribution scores near 1, one that always draws the same cell 0)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
    per_prompt: dict[str, list[bool]] = defaultdict(list)
    color_ok, shape_ok, both_ok, readings = [], [], [], []
    detail_ok: dict[str, list[bool]] = {d: [] for d in DETAILS}
    caption_ok = []
    unnamed: dict[str, list[str]] = {d: [] for d in DETAILS}  # read values where the prompt names no such detail
    for image, prompt in zip(images, prompts):
        expected = expected_shape_attributes(prompt, shape_aliases)
        if expected is None:
            raise ValueError(f"Prompt {prompt!r} names no palette color and shape; prompt accuracy needs both.")
        read = read_shape_image(image.permute(1, 2, 0).cpu().numpy())
        read_details = {"size": read["size"], "position": f"{read['row']} {read['column']}" if read["row"] else None,
                        "background": read["background"]}
        c, s = read["color"] == expected["color"], read["shape"] == expected["shape"]
        color_ok.append(c)
        shape_ok.append(s)
        both_ok.append(c and s)
        per_prompt[prompt].append(c and s)
        named = expected_details(prompt)
        for detail, value in named.items():
            detail_ok[detail].append(read_details[detail] == value)
        for detail in DETAILS:
            if detail not in named and read_details[detail] is not None:
                unnamed[detail].append(read_details[detail])
        caption_ok.append(c and s and all(read_details[d] == v for d, v in named.items()))
        readings.append({"prompt": prompt, "read_color": read["color"], "read_shape": read["shape"],
                         **{f"read_{d}": read_details[d] for d in DETAILS}})
    metrics = {
        "prompt_accuracy": float(np.mean(both_ok)),
        "color_accuracy": float(np.mean(color_ok)),
        "shape_accuracy": float(np.mean(shape_ok)),
        "num_images": len(both_ok),
    }
    for detail, ok in detail_ok.items():
        if ok:
            metrics[f"{detail}_accuracy"] = float(np.mean(ok))
            metrics[f"{detail}_images"] = len(ok)
    if any(detail_ok.values()):
        metrics["caption_accuracy"] = float(np.mean(caption_ok))
    for detail, values in unnamed.items():
        if values:
            metrics[f"{detail}_spread"] = normalised_entropy(values, DETAIL_VALUES[detail])
            metrics[f"{detail}_spread_images"] = len(values)
    metrics["per_prompt"] = {p: float(np.mean(v)) for p, v in per_prompt.items()}
    metrics["readings"] = readings
    return metrics


@lru_cache(maxsize=1)
def digits_classifier():
    """An RBF SVM trained on the real digits' train split (cached in memory; trains in well under a second).

    Returns (classifier, accuracy on the real val split).
    """
    from sklearn.svm import SVC

    from ldm.data.digits import _split_arrays

    train_x, train_y = _split_arrays("train", 0.1, 0)
    val_x, val_y = _split_arrays("val", 0.1, 0)
    clf = SVC(C=10.0, gamma=0.001).fit(train_x.reshape(len(train_x), -1), train_y)
    accuracy = float((clf.predict(val_x.reshape(len(val_x), -1)) == val_y).mean())
    return clf, accuracy


def images_to_digit_features(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> [N, 64] on the 0..16 ink scale of the 8x8 originals (area downsampling)."""
    gray = images.float().mean(dim=1, keepdim=True)  # [N, 1, H, W]
    small = F.adaptive_avg_pool2d(gray, (8, 8))  # [N, 1, 8, 8]
    return (small.clamp(0, 1) * 16.0).reshape(len(images), -1).cpu().numpy()


def digits_accuracy(images: torch.Tensor, prompts: Sequence[str]) -> dict:
    """Fraction of generated digits that the real-digit classifier reads as the prompted digit."""
    expected = [expected_digit(p) for p in prompts]
    if any(e is None for e in expected):
        bad = [p for p, e in zip(prompts, expected) if e is None][0]
        raise ValueError(f"Prompt {bad!r} names no digit; class accuracy needs one.")
    clf, real_accuracy = digits_classifier()
    predicted = clf.predict(images_to_digit_features(images))
    correct = predicted == np.asarray(expected)
    per_class = {DIGIT_WORDS[d]: float(correct[np.asarray(expected) == d].mean())
                 for d in sorted(set(expected))}
    return {
        "class_accuracy": float(correct.mean()),
        "classifier_real_val_accuracy": real_accuracy,
        "num_images": int(len(correct)),
        "per_class": per_class,
    }
