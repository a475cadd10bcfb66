"""WebDataset pipeline stages that decode, skip-and-count bad data, and batch.

Hostile-data policy (each case is counted, never fatal):
- unreadable shard (missing, truncated, not a tar): the rest of that shard is skipped, 1 skip event;
- sample without an image, or whose image fails to decode: skipped, 1 skip each;
- caption that is not UTF-8: sample skipped, 1 skip;
- missing or empty caption: KEPT with caption "" and counted in ``n_empty_caption``;
- very long or non-ASCII captions: kept unchanged (the text encoder truncates).

The counts travel with the data: every batch carries ``n_skipped`` (skip events in this worker since
its previous batch) and ``n_empty_caption``. Stages are picklable classes so spawn-started workers work.
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import get_worker_info

from ldm.data.transforms import decode_image

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff")


class SkipCounter:
    """Per-worker tally of skipped data, with rate-limited log messages.

    Used as the WebDataset exception ``handler`` (shard-level errors) and by :class:`DecodeSamples`.
    Raises once ``max_consecutive`` skips happen without a single good sample in between, so a
    stream of nothing but broken data fails loudly instead of spinning forever.
    """

    def __init__(self, name: str, max_messages: int = 5, max_consecutive: int = 1000):
        self.name = name
        self.max_messages = max_messages
        self.max_consecutive = max_consecutive
        self.pending = 0  # skips not yet reported in a batch
        self.total = 0
        self.consecutive = 0

    def skip(self, reason: str) -> None:
        self.pending += 1
        self.total += 1
        self.consecutive += 1
        if self.total <= self.max_messages:
            last = self.total == self.max_messages
            suffix = " (further messages suppressed; see data/skipped_samples)" if last else ""
            log.warning("[%s] skipped: %s%s", self.name, reason, suffix)
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"[{self.name}] {self.consecutive} consecutive samples/shards failed (last: {reason}); "
                "the shards look broken — regenerate them with scripts/make_shards.py"
            )

    def handler(self, exn: BaseException) -> bool:
        """WebDataset handler: count the error and continue with the next shard/file."""
        self.skip(f"{type(exn).__name__}: {exn}")
        return True

    def good(self) -> None:
        self.consecutive = 0

    def take(self) -> int:
        """Skips since the previous call."""
        pending, self.pending = self.pending, 0
        return pending


class DecodeSamples:
    """Raw WebDataset samples -> ``{"key", "image": Tensor [3, H, W], "caption", "empty_caption"}``."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], counter: SkipCounter):
        self.transform = transform
        self.counter = counter

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for raw in samples:
            key = raw.get("__key__", "?")
            where = f"{key} in {raw.get('__url__', '?')}"
            image_key = next((k for k in IMAGE_KEYS if k in raw), None)
            if image_key is None:
                self.counter.skip(f"no image ({'/'.join(IMAGE_KEYS)}) for sample {where}")
                continue
            try:
                image = self.transform(decode_image(raw[image_key]))
            except Exception as exn:  # PIL raises many types on corrupt data
                self.counter.skip(f"undecodable image {where}: {type(exn).__name__}: {exn}")
                continue
            try:
                caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
            except UnicodeDecodeError:
                self.counter.skip(f"caption of {where} is not valid UTF-8")
                continue
            self.counter.good()
            yield {"key": key, "image": image, "caption": caption, "empty_caption": not caption}


class BatchSamples:
    """Decoded samples -> batches ``{"image": [B, 3, H, W], "caption", "key", "n_skipped", "n_empty_caption"}``.

    A full batch is emitted when the next sample arrives (or the stream ends), so skips that happen at
    the very end of a finite stream still land in the last batch. ``partial=False`` drops a final
    incomplete batch (training). Skips with no batch left to carry them are logged as a warning.
    """

    def __init__(self, batch_size: int, counter: SkipCounter, partial: bool):
        self.batch_size = batch_size
        self.counter = counter
        self.partial = partial

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "image": torch.stack([s["image"] for s in samples]),  # [B, 3, H, W]
            "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples],
            "n_skipped": torch.tensor(self.counter.take(), dtype=torch.long),
            "n_empty_caption": torch.tensor(sum(s["empty_caption"] for s in samples), dtype=torch.long),
        }

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) == self.batch_size:
                yield self.collate(buffer)
                buffer = []
            buffer.append(sample)
        if buffer and (self.partial or len(buffer) == self.batch_size):
            yield self.collate(buffer)
        elif self.counter.pending:  # no batch left to carry these counts: report them here
            log.warning(
                "[%s] end of stream: %d skip(s) after the last batch (not in n_skipped); "
                "dropped %d sample(s) of a partial batch",
                self.counter.name, self.counter.take(), len(buffer),
            )
        elif buffer:
            log.debug("[%s] end of stream: dropped a partial batch of %d sample(s)", self.counter.name, len(buffer))


class TakeWorkerShare:
    """Yield this DataLoader worker's share of ``total`` items, so all workers together yield exactly ``total``."""

    def __init__(self, total: int):
        self.total = total

    def __call__(self, items: Iterable[Any]) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        share = self.total // num_workers + (1 if worker < self.total % num_workers else 0)
        yield from islice(items, share)
