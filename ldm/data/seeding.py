"""A reproducible training data order: every random draw of a training stream from (seed, rank, worker, epoch).

webdataset's ``ResampledShards`` and ``shuffle`` seed themselves from the clock and the process id, so two runs
with ``seed=42`` read their data in different orders (and differ by more than the seed says: the quickstart's
prompt accuracy varied by 0.05 between runs). Here the training pipeline's shard draws and shuffle buffers
take their generators from :class:`DataEpochs`: one seed (``data.seed``, by default the run's ``seed`` that
``lightning.seed_everything`` exported as ``PL_GLOBAL_SEED``), the DDP rank, the loader worker and the epoch.
Ranks and workers therefore draw different streams, every epoch draws a new one, and a rerun draws the same.

The epoch reaches loader workers by :class:`EpochLoader`, which stamps it on the dataset before each epoch's
iterator starts (spawned workers copy the dataset then); persistent workers keep their copy and count their
own epochs from that stamp.
"""

from __future__ import annotations

import os
import random
from typing import Any, Iterable, Iterator, Optional

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

SEED_ENV = "PL_GLOBAL_SEED"  # what lightning.seed_everything exports


def resolve_seed(configured: Optional[int]) -> Optional[int]:
    """``configured``, else the run's seed from ``lightning.seed_everything``, else None (unseeded: a fresh order)."""
    if configured is not None:
        return int(configured)
    from_env = os.environ.get(SEED_ENV)
    return int(from_env) if from_env not in (None, "") else None


class DataEpochs:
    """The epoch a pipeline is in and the random generators of its stages (shared by them, pickled with them).

    ``set_epoch(e)`` stamps the next epoch (the main process, :class:`EpochLoader`); ``begin()`` starts one
    (the pipeline's ``__iter__``, in whichever process iterates it): epoch = last stamp + epochs begun since.
    """

    def __init__(self, seed: Optional[int]):
        self.seed = seed
        self.stamp = 0
        self.begun = 0
        self.epoch = 0
        self.draws: dict[str, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.stamp, self.begun = int(epoch), 0

    def begin(self) -> None:
        self.epoch = self.stamp + self.begun
        self.begun += 1
        self.draws = {}

    def rng(self, stage: str) -> random.Random:
        """A generator for one use of ``stage`` in this epoch on this rank and worker (a time-seeded one
        when there is no seed). A stage used again in the same epoch (a repeated shard list) gets the next one."""
        if self.seed is None:
            return random.Random()
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        use = self.draws.get(stage, 0)
        self.draws[stage] = use + 1
        # str seeds hash with SHA-512: the same in every process and Python run (unlike hash())
        return random.Random(f"{stage}/{self.seed}/{rank}/{worker}/{self.epoch}/{use}")


class SeededShards(IterableDataset):
    """Shard URLs drawn with replacement, forever (``wds.ResampledShards`` with :class:`DataEpochs`' generator)."""

    def __init__(self, urls: list[str], epochs: DataEpochs):
        super().__init__()
        if not urls:
            raise ValueError("no shards to draw from")
        self.urls = list(urls)
        self.epochs = epochs

    def __iter__(self) -> Iterator[dict[str, str]]:
        rng = self.epochs.rng("shards")
        while True:
            yield {"url": self.urls[rng.randrange(len(self.urls))]}


class SeededShuffle:
    """webdataset's buffer shuffle (``bufsize`` items, yielding from ``initial``) with a :class:`DataEpochs`
    generator."""

    def __init__(self, bufsize: int, initial: int, epochs: DataEpochs, stage: str):
        self.bufsize, self.initial = bufsize, initial
        self.epochs, self.stage = epochs, stage

    def __call__(self, items: Iterable[Any]) -> Iterator[Any]:
        rng = self.epochs.rng(self.stage)  # drawn when iteration starts, inside the epoch
        return wds.shuffle(self.bufsize, self.initial, rng=rng)(iter(items))


class SeededPipeline(wds.DataPipeline):
    """A ``wds.DataPipeline`` that begins a :class:`DataEpochs` epoch each time it is iterated."""

    def __init__(self, *stages: Any, epochs: DataEpochs):
        super().__init__(*stages)
        self.epochs = epochs

    def __iter__(self):
        self.epochs.begin()
        return super().__iter__()


class EpochLoader(DataLoader):
    """A DataLoader that stamps the epoch on its dataset (``dataset.epochs``) before each epoch's iterator.

    Starts at ``first_epoch`` (the trainer's epoch when the loader is built, so a resumed run goes on with the
    epoch it stopped in rather than repeating epoch 0's order).
    """

    def __init__(self, dataset: Any, *args: Any, first_epoch: int = 0, **kwargs: Any):
        super().__init__(dataset, *args, **kwargs)
        self.next_epoch = first_epoch

    def __iter__(self):
        epochs = getattr(self.dataset, "epochs", None)
        if isinstance(epochs, DataEpochs):
            epochs.set_epoch(self.next_epoch)
        self.next_epoch += 1
        return super().__iter__()
