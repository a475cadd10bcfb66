"""LightningDataModule over WebDataset shards of image-caption pairs.

Batches are dicts ``{"image": FloatTensor [B, 3, H, W] in [-1, 1], "caption": list[str],
"key": list[str], "n_skipped": LongTensor [], "n_empty_caption": LongTensor []}``; bad data is
skipped and counted (policy in :mod:`ldm.data.stages`), summed by
:class:`ldm.callbacks.skipped_samples.SkippedSamplesCallback`.

Training streams are ``resampled`` by default: every rank and worker draws shards at random with
replacement, and the epoch is cut to exactly ``batches_per_epoch`` batches per rank (split evenly
over workers), so DDP ranks never run out of data at different times. Validation reads each shard
once (split over ranks and workers), keeps the last partial batch, and applies no random transform.
"""

from __future__ import annotations

import glob
import inspect
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from ldm.data.seeding import DataEpochs, EpochLoader, SeededPipeline, SeededShards, SeededShuffle, resolve_seed
from ldm.data.shards import build_embedded_shards, stale_build_reason
from ldm.data.stages import BatchSamples, DecodeSamples, SkipCounter, TakeWorkerShare
from ldm.data.transforms import ImageTransform
from ldm.data.workers import AUTO, auto_num_workers, check_num_workers, trainer_runs_on_cpu
from ldm.utils.cpu_threads import usable_cores

log = logging.getLogger(__name__)

Shards = str | Sequence[str]


def _plain(value: Any) -> Any:
    """Config containers (e.g. OmegaConf) -> plain dicts/lists, so hyperparameters stay checkpoint-safe."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _is_local(url: str) -> bool:
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def expand_shards(shards: Shards) -> list[str]:
    """Brace patterns (``a-{000..009}.tar``), ``::``-joined patterns, local globs and lists -> URL list."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(str(pattern)):
            if _is_local(url) and glob.has_magic(url.removeprefix("file:")):
                urls.extend(sorted(glob.glob(os.path.expanduser(url.removeprefix("file:")))))
            else:
                urls.append(os.path.expanduser(url) if _is_local(url) else url)
    return urls


def missing_local_shards(shards: Shards) -> tuple[list[str], list[str]]:
    """(expanded URLs, the local ones among them that do not exist)."""
    urls = expand_shards(shards)
    return urls, [u for u in urls if _is_local(u) and not Path(u.removeprefix("file:")).is_file()]


def _probe(url: str) -> str | None:
    """Why the first bytes of ``url`` cannot be read (None: readable)."""
    try:
        stream = open(url.removeprefix("file:"), "rb") if _is_local(url) else wds.gopen(url)
    except Exception as exn:  # gopen raises various types (ValueError for unknown schemes, OSError, ...)
        return f"{type(exn).__name__}: {exn}"
    head, error = b"", None
    try:
        head = stream.read(512)
    except Exception as exn:
        error = f"{type(exn).__name__}: {exn}"
    finally:
        try:
            stream.close()
        except Exception as exn:  # a failed pipe/curl reports its exit status on close; one cut short
            if not head:  # by this early close (SIGPIPE) after sending data is fine
                error = error or f"{type(exn).__name__}: {exn}"
    if error is not None:
        return error
    if not head and not _is_local(url):  # an empty local file is merely a bad shard (skipped and counted)
        return "no data (empty response)"
    return None


def unreadable_shard(urls: Sequence[str]) -> tuple[str, str] | None:
    """(url, reason) for the first shard that cannot be opened and read, else None.

    Every local file is probed (cheap); of remote/``pipe:`` URLs only the first, so a wrong host,
    missing credentials or a broken command fail at start instead of as a stream of skipped shards.
    Content errors (a truncated or corrupt tar) are not checked here: they are skipped and counted.
    """
    remote_probed = False
    for url in urls:
        if not _is_local(url):
            if remote_probed:
                continue
            remote_probed = True
        reason = _probe(url)
        if reason is not None:
            return url, reason
    return None


def _own_arguments(frame: Any) -> dict[str, Any]:
    """The current values of the arguments of the function running in ``frame`` (without ``self``)."""
    info = inspect.getargvalues(frame)
    return {name: info.locals[name] for name in info.args[1:]}


class EpochPipeline(SeededPipeline):
    """A pipeline with ``__len__`` = batches per epoch, so Lightning knows the epoch length.

    (``DataPipeline.with_length`` builds a class at runtime, which spawn-started workers cannot unpickle.)
    """

    def __init__(self, *stages: Any, length: int, epochs: DataEpochs):
        super().__init__(*stages, epochs=epochs)
        self.length = length

    def __len__(self) -> int:
        return self.length


def batch_as_built(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's ``collate_fn``: the pipeline's batches are final (tensors, lists of strings and dicts).

    PyTorch's default for ``batch_size=None``, ``default_convert``, walks every list and dict of a batch looking
    for NumPy arrays: ~5 ms per batch of 64 cached-latent samples (their per-sample source dicts), a third of
    the loader's time, for nothing."""
    return batch


class WebDataModule(L.LightningDataModule):
    """Image-caption batches from WebDataset shards (local paths, brace patterns, globs or URLs).

    Args:
        train_shards / val_shards: shard pattern(s); either may be None when that stage is unused.
        image_size: output side in pixels (shorter side resized, then cropped square).
        batch_size / val_batch_size: per-rank batch sizes (val defaults to ``batch_size``).
        num_workers: loader worker processes, or ``"auto"``: on a CPU only cores torch's threads leave idle
            (0 on a machine whose cores all train), on a GPU one per spare core, at most 8
            (:mod:`ldm.data.workers`; resolved at ``setup``, the count is :attr:`num_workers`).
        pin_memory, persistent_workers, prefetch_factor: DataLoader options
            (``pin_memory``/``persistent_workers`` default to "CUDA available" / "there are workers").
        shuffle_buffer: sample shuffle buffer per worker (0 disables).
        shardshuffle: shard-order shuffle buffer when not resampled (0/False disables).
        resampled: draw training shards with replacement (infinite stream cut into epochs).
        batches_per_epoch: training batches per rank per epoch. ``samples_per_epoch`` (global,
            all ranks) is the alternative; one of them is required when resampled.
        random_crop / random_flip: training augmentation. Keep ``random_flip`` False for captions
            that mention "left"/"right" (shapes).
        build: embedded-source spec for :func:`ldm.data.shards.build_embedded_shards`; when given,
            ``prepare_data`` writes the shards if the patterns match no file.
        build_dir: where ``build`` writes (default: the folder of ``train_shards``).
        seed: the training stream's data-order seed (:mod:`ldm.data.seeding`); None takes the run's ``seed``
            (``lightning.seed_everything``), and without one the order is fresh each run.

    Subclasses that read another payload (e.g. cached latents, :mod:`ldm.data.latents`) override
    :meth:`_sample_stages` and ``shard_hint`` and keep the shard discovery, resampling and epoch logic.
    """

    shard_hint = (
        "Create shards with `python scripts/make_shards.py --source shapes|digits|photos|folder --out DIR ...` "
        "and point data.{split}_shards at them, or use a data config with a `build:` spec (e.g. data=shapes32)."
    )

    def __init__(
        self,
        train_shards: Shards | None,
        val_shards: Shards | None,
        image_size: int,
        batch_size: int,
        val_batch_size: int | None = None,
        num_workers: int | str = 0,
        shuffle_buffer: int = 1000,
        shardshuffle: int | bool = 100,
        resampled: bool = True,
        batches_per_epoch: int | None = None,
        samples_per_epoch: int | None = None,
        random_crop: bool = False,
        random_flip: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
        build: Mapping[str, Any] | None = None,
        build_dir: str | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        train_shards, val_shards, build = _plain(train_shards), _plain(val_shards), _plain(build)
        if train_shards is None and val_shards is None:
            raise ValueError("give train_shards and/or val_shards")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {val_batch_size}")
        if batches_per_epoch is not None and samples_per_epoch is not None:
            raise ValueError("set batches_per_epoch or samples_per_epoch, not both")
        if resampled and train_shards is not None and batches_per_epoch is None and samples_per_epoch is None:
            raise ValueError(
                "resampled=True makes the training stream infinite: set batches_per_epoch (per rank) "
                "or samples_per_epoch (all ranks) to define an epoch"
            )
        if build is not None and build_dir is None and train_shards is None:
            raise ValueError("build needs build_dir when train_shards is None")
        val_batch_size = val_batch_size or batch_size
        shardshuffle = 100 if shardshuffle is True else int(shardshuffle)
        num_workers = check_num_workers(num_workers)
        pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # Saves the (normalised) arguments above, read from this frame alone so that a subclass's raw arguments
        # (ldm.data.latents) cannot override them. The explicit frame skips Lightning's self-referencing
        # frame lookup, a reference cycle that keeps the caller's locals (e.g. DataLoaders with live
        # workers) alive until a GC pass.
        self.save_hyperparameters(_own_arguments(inspect.currentframe()), frame=inspect.currentframe())
        self.train_dataset: wds.DataPipeline | None = None
        self.val_dataset: wds.DataPipeline | None = None
        self.train_overrides: dict[str, int] = {}  # set by reconfigure_train (a curriculum)
        self._num_workers: int | None = None  # num_workers resolved (``auto``) by the first setup

    # ----------------------------------------------------------------------------- shard discovery
    def _patterns(self) -> dict[str, Shards]:
        return {k: self.hparams[f"{k}_shards"] for k in ("train", "val") if self.hparams[f"{k}_shards"] is not None}

    def prepare_data(self) -> None:
        """Write embedded shards when ``build`` is set and the patterns match no file yet (rank 0 per node);
        refuse shards already there that ``build`` would not write (e.g. captions of an older recipe)."""
        build = self.hparams.build
        if build is None:
            return
        todo = []
        for split, pattern in self._patterns().items():
            urls, missing = missing_local_shards(pattern)
            if split in build["splits"] and urls and len(missing) == len(urls):
                todo.append(split)
            elif split in build["splits"] and urls and not missing:
                folder = Path(urls[0]).parent
                reason = stale_build_reason(build, folder, split)
                if reason is not None:
                    raise ValueError(
                        f"the {split} shards in {folder} are not what this data config's `build` writes ({reason}); "
                        f"they come from another build spec or an older version. Delete them (rm {folder}/{split}-*) "
                        "to have them rebuilt on the next run, or set paths.data_dir to another folder."
                    )
        if todo:
            out_dir = self.hparams.build_dir or str(Path(expand_shards(self.hparams.train_shards)[0]).parent)
            log.info("building %s shards for %s in %s (first run only)", build["source"], todo, out_dir)
            build_embedded_shards({**build, "splits": {s: build["splits"][s] for s in todo}}, out_dir)

    def _check_shards(self, split: str) -> list[str]:
        pattern = self._patterns()[split]
        urls, missing = missing_local_shards(pattern)
        if not urls or missing:
            what = "matches no shard" if not urls or len(missing) == len(urls) else (
                f"names {len(missing)} missing shard(s) of {len(urls)}, e.g. {missing[0]}"
            )
            raise FileNotFoundError(f"{split}_shards {pattern!r} {what}. {self.shard_hint.format(split=split)}")
        unreadable = unreadable_shard(urls)
        if unreadable is not None:
            url, reason = unreadable
            raise OSError(
                f"{split}_shards: cannot read {url} ({reason}). Check the file's permissions, or for a remote or "
                f"`pipe:` URL the host, credentials and command (try `curl -fsSL URL | head -c 512`)."
            )
        return urls

    # ----------------------------------------------------------------------------- pipelines
    @property
    def num_workers(self) -> int:
        """Loader workers per training process: ``num_workers`` as configured, ``auto`` resolved for the trainer
        this module is attached to (:func:`ldm.data.workers.auto_num_workers`) once, then kept."""
        if self._num_workers is None:
            configured = self.hparams.num_workers
            if configured != AUTO:
                return configured
            trainer = getattr(self, "trainer", None)
            processes = trainer.num_devices if trainer is not None else 1
            self._num_workers = auto_num_workers(trainer_runs_on_cpu(trainer), processes)
            log.info("data.num_workers=auto: %d loader worker(s) per process (%d usable cores, %d torch threads)",
                     self._num_workers, usable_cores(), torch.get_num_threads())
        return self._num_workers

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def train_batches_per_epoch(self) -> int | None:
        """Training batches per rank per epoch (None: one pass over the shards), cut by a curriculum's cap."""
        hp = self.hparams
        n_batches = None
        if hp.batches_per_epoch is not None:
            n_batches = int(hp.batches_per_epoch)
        elif hp.samples_per_epoch is not None:
            n_batches = max(1, math.ceil(hp.samples_per_epoch / (self.train_option("batch_size") * self._world_size())))
        cap = self.train_overrides.get("max_batches_per_epoch")
        if cap is None:
            return n_batches
        return cap if n_batches is None else min(n_batches, cap)

    # ----------------------------------------------------------------------------- curriculum
    def train_option(self, name: str) -> Any:
        """The training stream's ``image_size`` or ``batch_size``: set by :meth:`reconfigure_train`, else configured."""
        return self.train_overrides.get(name, self.hparams[name])

    def train_stream(self) -> dict[str, int | None]:
        """What the next ``train_dataloader()`` serves: image side, per-rank batch size, batches per epoch."""
        return {"image_size": self.train_option("image_size"), "batch_size": self.train_option("batch_size"),
                "batches_per_epoch": self.train_batches_per_epoch()}

    def reconfigure_train(self, image_size: int | None = None, batch_size: int | None = None,
                          max_batches_per_epoch: int | None = None) -> bool:
        """Change the training stream between epochs (:mod:`ldm.callbacks.curriculum`); returns whether it changed.

        None keeps the configured ``image_size`` / ``batch_size``; ``max_batches_per_epoch`` ends epochs early
        (None: the configured epoch). The next ``train_dataloader()`` call serves the new stream (Lightning
        calls it at an epoch start when ``trainer.reload_dataloaders_every_n_epochs`` says so); validation keeps
        the configured size.
        """
        requested = {"image_size": image_size, "batch_size": batch_size, "max_batches_per_epoch": max_batches_per_epoch}
        for name, value in requested.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"reconfigure_train: {name} must be a positive integer or None, got {value!r}")
        if image_size is not None and self.hparams.get("image_size") is None:
            raise ValueError(
                f"{type(self).__name__} has no image transform (cached latents have the resolution they were "
                "encoded at): a curriculum cannot change its image_size. Train from image shards (e.g. data=shapes64)."
            )
        before = self.train_stream()
        self.train_overrides = {name: value for name, value in requested.items() if value is not None}
        if self.train_stream() == before:
            return False
        if self.train_dataset is not None:
            self.train_dataset = self._make_train(self._check_shards("train"))
        return True

    def _data_epochs(self) -> DataEpochs:
        """The training stream's seed and epoch (:mod:`ldm.data.seeding`), the seed resolved now (after
        ``seed_everything``) and logged."""
        seed = resolve_seed(self.hparams.get("seed"))
        if seed is None:
            log.info("training data order: unseeded (set seed or data.seed to make it reproducible)")
        else:
            log.info("training data order: seed %d", seed)
        return DataEpochs(seed)

    def _make_train(self, urls: list[str]) -> wds.DataPipeline:
        hp = self.hparams
        counter = SkipCounter("train")
        epochs = self._data_epochs()
        n_batches = self.train_batches_per_epoch()
        readers = self._world_size() * max(1, self.num_workers)
        if hp.resampled:
            stages: list[Any] = [SeededShards(urls, epochs)]
        else:
            if len(urls) < readers:
                raise ValueError(
                    f"{len(urls)} training shard(s) cannot feed {readers} readers (ranks x workers) without "
                    "resampling; write more shards (--samples-per-shard) or set resampled=true"
                )
            if n_batches is None and self._world_size() > 1:
                log.warning("non-resampled training without batches_per_epoch: DDP ranks may get unequal batches")
            stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
            if hp.shardshuffle:
                stages.append(SeededShuffle(hp.shardshuffle, hp.shardshuffle, epochs, "shard order"))
        stages.append(wds.tarfile_to_samples(handler=counter.handler))
        if hp.shuffle_buffer:
            stages.append(SeededShuffle(hp.shuffle_buffer, min(hp.shuffle_buffer, 100), epochs, "samples"))
        stages += self._sample_stages(counter, train=True)
        if n_batches is None:
            return SeededPipeline(*stages, epochs=epochs)
        pipeline = wds.DataPipeline(*stages)
        if not hp.resampled:
            pipeline = pipeline.repeat()  # finite shard list: restart it until the epoch is full
        return EpochPipeline(pipeline, TakeWorkerShare(n_batches), length=n_batches, epochs=epochs)

    def _make_val(self, urls: list[str]) -> wds.DataPipeline:
        hp = self.hparams
        if len(urls) < self._world_size():
            log.warning(
                "%d val shard(s) for %d ranks: some ranks get no validation data", len(urls), self._world_size()
            )
        counter = SkipCounter("val")
        return wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=counter.handler),
            *self._sample_stages(counter, train=False),
        )

    def _sample_stages(self, counter: SkipCounter, train: bool) -> list[Any]:
        """Raw samples -> batches: decode + transform (augmented when ``train``) + collate."""
        hp = self.hparams
        if train:
            transform = ImageTransform(self.train_option("image_size"), random_crop=hp.random_crop,
                                       random_flip=hp.random_flip)
            batches = BatchSamples(self.train_option("batch_size"), counter, partial=False)
            return [DecodeSamples(transform, counter), batches]
        transform = ImageTransform(hp.image_size)
        return [DecodeSamples(transform, counter), BatchSamples(hp.val_batch_size, counter, partial=True)]

    def setup(self, stage: str | None = None) -> None:
        patterns = self._patterns()
        if stage in (None, "fit") and "train" in patterns:
            self.train_dataset = self._make_train(self._check_shards("train"))
        if stage in (None, "fit", "validate", "test") and "val" in patterns:
            self.val_dataset = self._make_val(self._check_shards("val"))

    def _loader(self, dataset: Any, num_workers: int | None = None) -> DataLoader:
        """The DataLoader over a pipeline; ``num_workers`` None: :attr:`num_workers`."""
        hp = self.hparams
        num_workers = self.num_workers if num_workers is None else num_workers
        workers = num_workers > 0
        trainer = getattr(self, "trainer", None)
        return EpochLoader(
            dataset,
            first_epoch=trainer.current_epoch if trainer is not None else 0,
            batch_size=None,  # batching happens inside the pipeline
            collate_fn=batch_as_built,
            num_workers=num_workers,
            pin_memory=hp.pin_memory,
            persistent_workers=workers and hp.persistent_workers is not False,
            prefetch_factor=hp.prefetch_factor if workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("no training data: set train_shards and call setup('fit') first")
        return self._loader(self.train_dataset)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            raise RuntimeError("no validation data: set val_shards and call setup('fit' or 'validate') first")
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        """The validation shards (the embedded sources have no separate test split)."""
        return self.val_dataloader()
