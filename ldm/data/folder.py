"""Bring your own images: a directory tree of images with same-stem ``.txt`` captions.

    root/cats/001.jpg  root/cats/001.txt  ("a tabby cat on a sofa")
    root/dogs/x.png    (no x.txt -> empty caption, counted and warned about once)

Splits: ``split=None`` uses every image under ``root``. ``split="train"``/``"val"`` uses
``root/train`` and ``root/val`` when both exist; otherwise a seeded random ``val_count`` images
form val and the rest form train.
Unreadable images or captions raise :class:`~ldm.data.sources.SampleError` naming the file;
:func:`ldm.data.shards.write_shards` either stops on it or, with ``skip_errors=True``, skips and
counts it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.sources import Sample, SampleError, check_index, check_split
from ldm.data.transforms import to_rgb

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, case-insensitive suffixes), in sorted order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class FolderSource:
    """Images under ``root`` with optional same-stem ``.txt`` captions.

    ``resolution``: when set, images whose shorter side exceeds it are downscaled (Lanczos, aspect
    kept) so shards stay small; images are never upscaled or cropped here (the DataModule crops).
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        val_count: int = 0,
        seed: int = 0,
        resolution: int | None = None,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        self.split = None if split is None else check_split(split)
        self.resolution = resolution
        if self.split is not None and (self.root / "train").is_dir() and (self.root / "val").is_dir():
            files = list_images(self.root / self.split)
        else:
            files = list_images(self.root)
            if self.split is not None and val_count > 0:
                if val_count >= len(files):
                    raise ValueError(
                        f"val_count={val_count} leaves no training images among {len(files)} in {self.root}"
                    )
                is_val = np.zeros(len(files), dtype=bool)
                is_val[np.random.default_rng(seed).permutation(len(files))[:val_count]] = True
                files = [f for f, v in zip(files, is_val) if v == (self.split == "val")]
            elif self.split == "val":
                raise ValueError(
                    f"{self.root} has no train/ and val/ subfolders; pass val_count > 0 to hold out validation images"
                )
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {self.root}")
        self.files = files
        self.num_missing_captions = sum(not f.with_suffix(".txt").is_file() for f in files)
        if self.num_missing_captions:
            log.warning(
                "%d of %d images under %s have no same-stem .txt caption; they get empty captions",
                self.num_missing_captions, len(files), self.root,
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        path = self.files[index]
        try:
            with Image.open(path) as raw:
                raw.load()
                image = to_rgb(raw).copy()
        except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            raise SampleError(
                f"cannot read image {path}: {exn}. Fix or remove the file, or skip it (--skip-unreadable)"
            ) from exn
        if self.resolution is not None and min(image.size) > self.resolution:
            scale = self.resolution / min(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        caption_path = path.with_suffix(".txt")
        caption = ""
        if caption_path.is_file():
            try:
                caption = caption_path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as exn:
                raise SampleError(f"caption {caption_path} is not valid UTF-8: {exn}") from exn
        meta = {"path": str(path.relative_to(self.root)), "width": image.width, "height": image.height}
        return {"key": f"folder_{self.split or 'all'}_{index:08d}", "image": image, "caption": caption, "meta": meta}
