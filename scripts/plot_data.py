#!/usr/bin/env python
"""Draw a few samples of every embedded source with their captions -> docs/img/data_samples.png.

    python scripts/plot_data.py [--out docs/img/data_samples.png] [--per-row 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.data.sources import build_source  # noqa: E402

ROWS = [
    ("shapes, 32 px", "shapes", {"num_samples": 64, "resolution": 32}),
    ("shapes, 64 px", "shapes", {"num_samples": 64, "resolution": 64}),
    ("digits, 32 px", "digits", {"resolution": 32}),
    ("photos, 64 px crops", "photos", {"num_samples": 64, "crop": 64}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "data_samples.png")
    parser.add_argument("--per-row", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    fig, axes = plt.subplots(len(ROWS), args.per_row, figsize=(2.1 * args.per_row, 2.75 * len(ROWS)), squeeze=False)
    for row, (title, name, kwargs) in enumerate(ROWS):
        source = build_source(name, split="train", seed=args.seed, **kwargs)
        for col in range(args.per_row):
            sample = source[col * 7 % len(source)]
            ax = axes[row, col]
            ax.imshow(sample["image"], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("\n".join(textwrap.wrap(f'"{sample["caption"]}"', 24)), fontsize=8)
        axes[row, 0].set_ylabel(title, fontsize=10, fontweight="bold")
    fig.suptitle("Embedded training data (image and caption as stored in the shards)", fontsize=12)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
