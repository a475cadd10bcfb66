#!/usr/bin/env python
"""Write train/val WebDataset shards from an embedded source or your own image folder.

Examples:
    python scripts/make_shards.py --source shapes --out data/shapes32 --num-train 20000 --num-val 512 --resolution 32
    python scripts/make_shards.py --source digits --out data/digits32 --resolution 32
    python scripts/make_shards.py --source photos --out data/photos64 --num-train 4000 --num-val 256 --resolution 64
    python scripts/make_shards.py --source folder --root ~/my_images --out data/mine --num-val 200 --resolution 256

Then train with ``data.train_shards=<printed train pattern> data.val_shards=<printed val pattern>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data.shards import IMAGE_FORMATS, ShardSummary, write_shards  # noqa: E402
from ldm.data.sources import SOURCES, SampleError, build_source  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=sorted(SOURCES), help="data source")
    parser.add_argument("--out", required=True, type=Path, help="output directory for the .tar shards")
    parser.add_argument("--num-train", type=int, help="training samples (shapes, photos; default 20000 / 4000)")
    parser.add_argument(
        "--num-val", type=int, help="validation samples (shapes, photos: default 512; folder: held-out images, 0)"
    )
    parser.add_argument(
        "--resolution", type=int, help="image side (shapes/digits; photos: crop size); folder: max shorter side"
    )
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, help="image folder (--source folder)")
    parser.add_argument("--image-format", choices=sorted(IMAGE_FORMATS), default="png")
    parser.add_argument(
        "--skip-unreadable", action="store_true", help="folder: skip and count unreadable files instead of stopping"
    )
    parser.add_argument("--force", action="store_true", help="replace existing shards with the same prefix in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.source == "folder" and args.root is None:
        parser.error("--source folder needs --root DIR")
    if args.source != "folder" and args.root is not None:
        parser.error("--root is only used with --source folder")
    if args.source == "digits" and (args.num_train is not None or args.num_val is not None):
        parser.error("digits has a fixed stratified split (1617 train / 180 val); omit --num-train/--num-val")
    if args.source == "folder" and args.num_train is not None:
        parser.error("folder uses every image not held out for validation; omit --num-train (--num-val holds out)")
    return args


DEFAULT_COUNTS = {"shapes": {"train": 20000, "val": 512}, "photos": {"train": 4000, "val": 512}}


def source_kwargs(args: argparse.Namespace, split: str) -> dict[str, Any] | None:
    """Constructor kwargs of ``args.source`` for ``split``; None when the split is empty."""
    if args.source == "folder":
        val_count = args.num_val or 0
        has_split_dirs = (args.root / "train").is_dir() and (args.root / "val").is_dir()
        if split == "val" and val_count == 0 and not has_split_dirs:
            return None
        return {
            "root": args.root, "split": split, "val_count": val_count, "seed": args.seed, "resolution": args.resolution
        }
    kwargs: dict[str, Any] = {"split": split, "seed": args.seed}
    if args.source in DEFAULT_COUNTS:
        requested = args.num_train if split == "train" else args.num_val
        kwargs["num_samples"] = DEFAULT_COUNTS[args.source][split] if requested is None else requested
        if kwargs["num_samples"] == 0:
            return None
    if args.resolution is not None:
        kwargs["crop" if args.source == "photos" else "resolution"] = args.resolution
    return kwargs


def main(argv: Sequence[str] | None = None) -> dict[str, ShardSummary]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    summaries = {}
    for split in ("train", "val"):
        kwargs = source_kwargs(args, split)
        if kwargs is None:
            print(f"{split}: no samples requested, skipped")
            continue
        summaries[split] = write_shards(
            build_source(args.source, **kwargs),
            args.out,
            prefix=split,
            samples_per_shard=args.samples_per_shard,
            image_format=args.image_format,
            force=args.force,
            progress=not args.no_progress,
            skip_errors=args.skip_unreadable,
        )
        print(summaries[split])
    print("\nuse with train.py:")
    for split, summary in summaries.items():
        print(f"  data.{split}_shards='{summary.pattern}'")
    return summaries


if __name__ == "__main__":
    try:
        main()
    except (FileExistsError, FileNotFoundError, SampleError, ValueError) as exn:
        sys.exit(f"error: {exn}")
