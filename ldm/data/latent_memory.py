"""A latent cache held in memory: read once, then served by index instead of re-parsed every batch.

A streamed cache parses three tar members and a safetensors payload per sample, every epoch: about 13 ms of CPU
per batch of 64 on the quickstart, which a CPU run pays inside its step (its cores all train, so loader workers
would only preempt them). A cache that fits in memory (the quickstart's: ~0.2 GB) is decoded once at ``setup`` into
stacked tensors, and each batch is one ``index_select`` per tensor.

Order: each epoch continues one endless chain of permutations of the whole cache (without replacement, unlike a
resampled stream), seeded by :class:`ldm.data.seeding.DataEpochs` (the same on every rank); rank ``r`` of ``W``
takes the chain's positions ``r, r + W, ...``, so ranks never share a sample within a pass (an unseeded run, no
``seed`` at all, draws one chain per rank and loses that guarantee). Bad samples are skipped
and counted while loading, as in the stream, and reported once (rank 0's first batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.latents import TEXT_TENSORS, DecodeLatents, distinct
from ldm.data.seeding import DataEpochs
from ldm.data.stages import SkipCounter

@dataclass
class LatentTable:
    """A whole split of the cache as stacked tensors (float16, as stored) and per-sample lists."""

    latent_mean: torch.Tensor  # [N, C, h, w]
    latent_logvar: torch.Tensor  # [N, C, h, w]
    caption: list[str]
    key: list[str]
    empty_caption: torch.Tensor  # [N] bool
    source_index: torch.Tensor  # [N] long: index into ``sources``
    sources: list[dict[str, Any]]  # the distinct autoencoder identities
    n_skipped: int
    text_context: Optional[torch.Tensor] = None  # [N, L, D]
    text_pooled: Optional[torch.Tensor] = None  # [N, P]
    text_source_index: Optional[torch.Tensor] = None  # [N] long
    text_sources: Optional[list[dict[str, Any]]] = None
    skips_reported: bool = False  # n_skipped went out in a batch (once per table, across a curriculum's rebuilds)

    def __len__(self) -> int:
        return len(self.key)

    def nbytes(self) -> int:
        tensors = (self.latent_mean, self.latent_logvar, self.text_context, self.text_pooled)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _index_of(value: dict[str, Any], table: list[dict[str, Any]]) -> int:
    if value not in table:
        table.append(value)
    return table.index(value)


def load_latent_table(urls: list[str]) -> LatentTable:
    """Decode every sample of ``urls`` (each shard once, in order) with the stream's checks and skip rules."""
    counter = SkipCounter("train")
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=counter.handler),
                                DecodeLatents(counter))
    columns: dict[str, list[Any]] = {name: [] for name in ("latent_mean", "latent_logvar", "caption", "key",
                                                           "empty_caption", "source_index", *TEXT_TENSORS,
                                                           "text_source_index")}
    sources: list[dict[str, Any]] = []
    text_sources: list[dict[str, Any]] = []
    for sample in pipeline:
        for name in ("latent_mean", "latent_logvar", "caption", "key", "empty_caption"):
            columns[name].append(sample[name])
        columns["source_index"].append(_index_of(sample["latent_source"], sources))
        if "text_context" in sample:  # DecodeLatents keeps a stream all-text or no-text
            for name in TEXT_TENSORS:
                columns[name].append(sample[name])
            columns["text_source_index"].append(_index_of(sample["text_source"], text_sources))
    if not columns["key"]:
        raise ValueError(f"no usable sample in {len(urls)} latent shard(s) ({urls[0]} ...): {counter.take()} skipped")
    has_text = bool(columns["text_context"])
    return LatentTable(
        latent_mean=torch.stack(columns["latent_mean"]),
        latent_logvar=torch.stack(columns["latent_logvar"]),
        caption=columns["caption"],
        key=columns["key"],
        empty_caption=torch.tensor(columns["empty_caption"], dtype=torch.bool),
        source_index=torch.tensor(columns["source_index"], dtype=torch.long),
        sources=sources,
        n_skipped=counter.take(),
        text_context=torch.stack(columns["text_context"]) if has_text else None,
        text_pooled=torch.stack(columns["text_pooled"]) if has_text else None,
        text_source_index=torch.tensor(columns["text_source_index"], dtype=torch.long) if has_text else None,
        text_sources=text_sources if has_text else None,
    )


class InMemoryLatents(IterableDataset):
    """Training batches (:class:`ldm.data.latents.BatchLatents`' keys) from a :class:`LatentTable`.

    ``batches_per_epoch`` per rank (None: one pass over the table split over the ranks).
    """

    def __init__(self, table: LatentTable, batch_size: int, batches_per_epoch: Optional[int], epochs: DataEpochs,
                 world_size: int = 1):
        super().__init__()
        per_pass = len(table) // (batch_size * world_size)
        if batches_per_epoch is None and per_pass == 0:
            raise ValueError(f"{len(table)} cached samples cannot fill one batch of {batch_size} on each of "
                             f"{world_size} rank(s); lower batch_size or set batches_per_epoch")
        self.table = table
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch if batches_per_epoch is not None else per_pass
        self.epochs = epochs
        self.unseeded = torch.randint(0, 2**62, ()).item()  # the chain's seed when ``epochs`` has none

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _permutation(self, cycle: int) -> torch.Tensor:
        base = self.epochs.seed if self.epochs.seed is not None else self.unseeded
        generator = torch.Generator().manual_seed((base * 1_000_003 + cycle) % 2**63)
        return torch.randperm(len(self.table), generator=generator)

    def _indices(self, rank: int, world: int) -> torch.Tensor:
        """This rank's positions of the epoch in the chain of permutations -> table indices [n_batches * B]."""
        size = len(self.table)
        per_rank = self.batches_per_epoch * self.batch_size
        start = self.epochs.epoch * per_rank * world
        positions = start + rank + world * torch.arange(per_rank)  # [per_rank]
        cycles = positions // size
        indices = torch.empty_like(positions)
        for cycle in cycles.unique().tolist():
            where = cycles == cycle
            indices[where] = self._permutation(cycle)[positions[where] % size]
        return indices

    def _batch(self, index: torch.Tensor, n_skipped: int) -> dict[str, Any]:
        t = self.table
        batch: dict[str, Any] = {
            "latent_mean": t.latent_mean[index],  # [B, C, h, w] float16
            "latent_logvar": t.latent_logvar[index],  # [B, C, h, w] float16
            "caption": [t.caption[i] for i in index.tolist()],
            "key": [t.key[i] for i in index.tolist()],
            "latent_source": distinct([t.sources[i] for i in t.source_index[index].tolist()]),
            "n_skipped": torch.tensor(n_skipped, dtype=torch.long),
            "n_empty_caption": t.empty_caption[index].sum(),
        }
        if t.text_context is not None:
            batch.update(text_context=t.text_context[index],  # [B, L, D] float16
                         text_pooled=t.text_pooled[index],  # [B, P] float16
                         text_source=distinct([t.text_sources[i] for i in t.text_source_index[index].tolist()]))
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epochs.begin()
        if get_worker_info() is not None:  # the loader runs it in the training process; a worker copies the table
            raise RuntimeError("InMemoryLatents runs without loader workers (num_workers=0)")
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        indices = self._indices(rank, world)
        for start in range(0, len(indices), self.batch_size):
            skipped = 0
            if not self.table.skips_reported and rank == 0:
                skipped, self.table.skips_reported = self.table.n_skipped, True
            yield self._batch(indices[start:start + self.batch_size], skipped)
