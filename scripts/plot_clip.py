"""Figure of a stage-0 CLIP: zero-shot reading of held-out shapes, and how its text tower arranges the prompts.

    python scripts/plot_clip.py --ckpt <clip run>/checkpoints/last.ckpt --out docs/images/clip_zero_shot.png

Renders ``--num-images`` shapes of the validation split (``ldm.data.synthetic.ShapesSource``, never trained on),
labels each with its canonical prompt ``"a {color} {shape}"``, and classifies it zero-shot: the prompt whose text
embedding has the largest cosine with the image embedding (Radford et al. 2021, sec. 3.1.4). Left: the confusion
matrix (rows: drawn, columns: read; each row sums to 1). Right: the cosine between the prompts' text embeddings,
the pooled features stage 2 conditions on. Prints the accuracies (both attributes, colour, shape).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.data.synthetic import ShapesSource  # noqa: E402
from ldm.evaluation.features import load_clip_module  # noqa: E402


@torch.no_grad()
def zero_shot(clip, source: ShapesSource, batch_size: int = 128) -> dict:
    """Zero-shot classification of every image of ``source`` over its canonical prompts.

    -> {"prompts": [K], "labels": [N], "predictions": [N], "text_similarity": [K, K]} (index tensors, cosines)."""
    prompts = source.prompts()
    text = clip.text_features(prompts).float()  # [K, E], unit norm
    labels, predictions = [], []
    for start in range(0, len(source), batch_size):
        samples = [source[i] for i in range(start, min(start + batch_size, len(source)))]
        pixels = np.stack([np.asarray(s["image"], dtype=np.float32) / 127.5 - 1.0 for s in samples])  # [b, H, W, 3]
        image = clip.image_features(torch.from_numpy(pixels).permute(0, 3, 1, 2)).float()  # [b, E], unit norm
        predictions.append((image @ text.T).argmax(dim=1))
        labels += [prompts.index(f"a {s['meta']['color']} {s['meta']['shape']}") for s in samples]
    return {"prompts": prompts, "labels": torch.tensor(labels), "predictions": torch.cat(predictions),
            "text_similarity": text @ text.T}


def accuracies(prompts: Sequence[str], labels: torch.Tensor, predictions: torch.Tensor) -> dict[str, float]:
    """Fraction of images whose prompt (both words), colour word and shape word were read right."""
    words = [p.split()[1:] for p in prompts]  # "a {color} {shape}" -> [color, shape]
    color = [words[int(t)][0] == words[int(p)][0] for t, p in zip(labels, predictions)]
    shape = [words[int(t)][1] == words[int(p)][1] for t, p in zip(labels, predictions)]
    return {"prompt": float((labels == predictions).float().mean()), "color": float(np.mean(color)),
            "shape": float(np.mean(shape))}


def confusion(labels: torch.Tensor, predictions: torch.Tensor, classes: int) -> np.ndarray:
    """[K, K] row-normalised counts: row = drawn class, column = read class (rows without images stay 0)."""
    counts = np.zeros((classes, classes))
    np.add.at(counts, (labels.numpy(), predictions.numpy()), 1)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="stage-0 CLIP checkpoint (train.py experiment=*_clip)")
    parser.add_argument("--num-images", type=int, default=540)
    parser.add_argument("--resolution", type=int, default=32, help="rendered size (the CLIP resizes to its own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="clip_zero_shot.png")
    args = parser.parse_args(argv)
    clip = load_clip_module(args.ckpt)
    source = ShapesSource(args.num_images, resolution=args.resolution, seed=args.seed, split="val")
    result = zero_shot(clip, source)
    prompts = [p.removeprefix("a ") for p in result["prompts"]]
    acc = accuracies(result["prompts"], result["labels"], result["predictions"])
    print(f"{args.num_images} validation images: prompt {acc['prompt']:.3f}, colour {acc['color']:.3f}, "
          f"shape {acc['shape']:.3f}")

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.6))
    panels = ((left, confusion(result["labels"], result["predictions"], len(prompts)), "Blues", (0, 1),
               f"zero-shot on {args.num_images} held-out images: {acc['prompt']:.1%} right\n"
               f"(colour {acc['color']:.1%}, shape {acc['shape']:.1%}); rows drawn, columns read"),
              (right, result["text_similarity"].numpy(), "viridis", (None, None),
               "cosine between the prompts' text embeddings"))
    for ax, matrix, cmap, (vmin, vmax), title in panels:
        shown = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(prompts)), prompts, rotation=90, fontsize=7)
        ax.set_yticks(range(len(prompts)), prompts, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return acc


if __name__ == "__main__":
    main()
