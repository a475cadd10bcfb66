"""Cached first-stage latents: the shard format and the DataModule that trains stage 2 from it.

``scripts/encode_latents.py`` writes one latent shard per image shard (``{split}-NNNNNN.tar``, input order):

    {key}.latents.safetensors   "mean":   float16 [C, h, w]  posterior mean of the autoencoder (not normalised)
                                "logvar": float16 [C, h, w]  posterior log-variance (clamped to [-30, 20])
    {key}.txt                   the caption, UTF-8
    {key}.json                  the image sample's meta + "latent_source": the autoencoder identity
                                (:func:`ldm.models.latent_source.autoencoder_identity`) and "image_size"

With ``text_encoder=`` the frozen text encoder's output is cached too (optional; all samples or none):

    {key}.latents.safetensors   + "text_context": float16 [L, D]  the U-Net's cross-attention context of the caption
                                + "text_pooled":  float16 [P]     its pooled embedding (``num_classes: sequential``)
    {key}.json                  + "text_source": the text identity (:func:`ldm.models.text_cache.text_encoder_identity`:
                                arch, layer, context_length, weights SHA-256, context_shape, pooled_shape, checkpoint)
    {split}-text_uncond.safetensors  once per split, beside the shards: "context" [L, D] and "pooled" [P] of the
                                empty prompt "" (what caption dropout trains on), float16, the identity in its metadata

The tensors are one safetensors payload: nothing is ever unpickled, and one small file per sample keeps tar
and header parsing cheap (decoding it takes ~20 us; two ``.npy`` files take ~180 us at 8x8x4). Batches are dicts
``{"latent_mean": HalfTensor [B, C, h, w], "latent_logvar": [B, C, h, w], "caption", "key",
"latent_source": list[dict], "n_skipped", "n_empty_caption"}`` (+ ``"text_context"`` [B, L, D], ``"text_pooled"``
[B, P] float16 and ``"text_source": list[dict]`` from a text cache; each source list holds the batch's distinct
identities, usually one); ``LatentDiffusion`` samples
z = mean + exp(logvar / 2) * eps from them (a fresh draw every step, as with online encoding) and
checks ``latent_source`` against its own first stage; it uses cached text instead of its text encoder after
checking ``text_source`` (:class:`ldm.models.text_cache.CachedTextConditioning`). Bad samples are skipped and
counted like images (:mod:`ldm.data.stages`): a missing or undecodable payload, non-float / mis-shaped /
non-finite tensors (latent or text), a ``.json`` without ``latent_source`` (or without ``text_source`` beside
text tensors, or with one but no text tensors), a caption that is not UTF-8.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ldm.data.stages import BatchSamples, SkipCounter
from ldm.data.webdataset import Shards, WebDataModule, _is_local

log = logging.getLogger(__name__)

LATENTS_KEY = "latents.safetensors"
SOURCE_FIELD = "latent_source"
TEXT_SOURCE_FIELD = "text_source"
TEXT_TENSORS = ("text_context", "text_pooled")


def text_uncond_name(split: str) -> str:
    """File beside a split's shards holding the empty prompt's embeddings."""
    return f"{split}-text_uncond.safetensors"


def _half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float16).contiguous()


def moments_bytes(mean: torch.Tensor, logvar: torch.Tensor, text: Optional[Mapping[str, torch.Tensor]] = None) -> bytes:
    """Posterior moments [C, h, w] (+ ``text``: "text_context" [L, D], "text_pooled" [P]) -> float16 safetensors."""
    tensors = {"mean": mean, "logvar": logvar, **(text or {})}
    return save_tensors({name: _half(t) for name, t in tensors.items()})


def latent_record(key: str, mean: torch.Tensor, logvar: torch.Tensor, caption: str, meta: Mapping[str, Any],
                  source: Mapping[str, Any], image_size: int, text: Optional[Mapping[str, torch.Tensor]] = None,
                  text_source: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """One cache sample as WebDataset bytes; ``mean``/``logvar`` [C, h, w] (and ``text``) are stored as float16."""
    record_meta = {**meta, SOURCE_FIELD: dict(source), "image_size": int(image_size)}
    if text is not None:
        record_meta[TEXT_SOURCE_FIELD] = dict(text_source or {})
    return {
        "__key__": key,
        LATENTS_KEY: moments_bytes(mean, logvar, text),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(record_meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def save_text_uncond(path: str | Path, context: torch.Tensor, pooled: torch.Tensor,
                     source: Mapping[str, Any]) -> None:
    """Write the empty prompt's ``context`` [L, D] and ``pooled`` [P] (float16) with the text identity as metadata."""
    tensors = {"context": _half(context), "pooled": _half(pooled)}
    metadata = {TEXT_SOURCE_FIELD: json.dumps(dict(source), sort_keys=True)}
    Path(path).write_bytes(save_tensors(tensors, metadata=metadata))


def load_text_uncond(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``save_text_uncond``'s file -> (context [L, D], pooled [P], text identity)."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("context"), f.get_tensor("pooled"), json.loads(f.metadata()[TEXT_SOURCE_FIELD])


def _all_finite(*tensors: torch.Tensor) -> bool:
    """True when no element is NaN or infinite. One float64 sum per tensor (NaN and infinities survive a sum;
    float64 cannot overflow on float16/32 inputs) costs a third of ``isfinite(t).all()`` on these small tensors."""
    return all(math.isfinite(t.sum(dtype=torch.float64)) for t in tensors)


def _moments_problem(tensors: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Why a decoded payload is not a usable (mean, logvar) pair (+ optional text pair), else None."""
    if set(tensors) not in ({"mean", "logvar"}, {"mean", "logvar", *TEXT_TENSORS}):
        return (f"the payload must hold tensors 'mean' and 'logvar' (and optionally {TEXT_TENSORS}), "
                f"got {sorted(tensors)}")
    mean, logvar = tensors["mean"], tensors["logvar"]
    if not (mean.is_floating_point() and logvar.is_floating_point()):
        return f"latent tensors must be floating point, got {mean.dtype} / {logvar.dtype}"
    if mean.ndim != 3 or mean.shape != logvar.shape:
        return f"latent tensors must both be [C, h, w], got {list(mean.shape)} / {list(logvar.shape)}"
    if not _all_finite(mean, logvar):
        return "latent tensors contain NaN or infinity"
    return None


def _text_problem(tensors: Mapping[str, torch.Tensor], source: Any) -> Optional[str]:
    """Why a payload's text pair does not fit its ``text_source`` (or one is missing), else None."""
    has_text = TEXT_TENSORS[0] in tensors
    if not has_text:
        if source is None:
            return None
        return f"the .json names a text encoder ({TEXT_SOURCE_FIELD}) but the payload holds no text tensors"
    if not isinstance(source, dict) or "weights_sha256" not in source:
        return f"text tensors but the .json names no text encoder ({TEXT_SOURCE_FIELD}.weights_sha256)"
    context, pooled = (tensors[name] for name in TEXT_TENSORS)
    if not (context.is_floating_point() and pooled.is_floating_point()):
        return f"text tensors must be floating point, got {context.dtype} / {pooled.dtype}"
    shapes = [list(context.shape), list(pooled.shape)]
    expected = [source.get("context_shape"), source.get("pooled_shape")]
    if context.ndim != 2 or pooled.ndim != 1 or shapes != expected:
        return f"text tensors must be [L, D] / [P] = {expected[0]} / {expected[1]}, got {shapes[0]} / {shapes[1]}"
    if not _all_finite(context, pooled):
        return "text tensors contain NaN or infinity"
    return None


class DecodeLatents:
    """Raw cache samples -> ``{"key", "latent_mean", "latent_logvar", "caption", "empty_caption", "latent_source"}``
    (+ ``"text_context", "text_pooled", "text_source"`` from a text cache).

    Unusable samples are skipped and counted; latents of a different shape than the stream's first sample
    mean the cache mixes resolutions (a configuration error), which raises.
    """

    def __init__(self, counter: SkipCounter):
        self.counter = counter
        self.shape: Optional[tuple[int, ...]] = None
        self.text: Optional[tuple[torch.Size, ...]] = None  # (context [L, D], pooled [P]) shapes, None: no text
        self.first_where = ""

    def _decode(self, raw: dict[str, Any], where: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        missing = [k for k in (LATENTS_KEY, "json") if k not in raw]
        if missing:
            return None, f"no {'/'.join(missing)} for sample {where} (not a latent-cache shard?)"
        try:
            tensors = load_tensors(raw[LATENTS_KEY])
        except Exception as exn:  # SafetensorError on a corrupt or foreign payload
            return None, f"undecodable latents {where}: {type(exn).__name__}: {exn}"
        problem = _moments_problem(tensors)
        if problem is not None:
            return None, f"{problem} ({where})"
        try:
            meta = json.loads(raw["json"])
            caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            return None, f"unreadable caption or .json of {where}: {type(exn).__name__}: {exn}"
        source = meta.get(SOURCE_FIELD) if isinstance(meta, dict) else None
        if not isinstance(source, dict) or "encoder_sha256" not in source:
            return None, f"the .json of {where} names no autoencoder ({SOURCE_FIELD}.encoder_sha256)"
        text_source = meta.get(TEXT_SOURCE_FIELD) if isinstance(meta, dict) else None
        problem = _text_problem(tensors, text_source)
        if problem is not None:
            return None, f"{problem} ({where})"
        sample = {"key": raw.get("__key__", "?"), "latent_mean": tensors["mean"], "latent_logvar": tensors["logvar"],
                  "caption": caption, "empty_caption": not caption, "latent_source": source}
        if text_source is not None:
            sample.update({name: tensors[name] for name in TEXT_TENSORS}, text_source=text_source)
        return sample, None

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for raw in samples:
            where = f"{raw.get('__key__', '?')} in {raw.get('__url__', '?')}"
            sample, problem = self._decode(raw, where)
            if sample is None:
                self.counter.skip(problem)
                continue
            shape = tuple(sample["latent_mean"].shape)
            text = tuple(sample[name].shape for name in TEXT_TENSORS) if "text_context" in sample else None
            if self.shape is None:
                self.shape, self.text, self.first_where = shape, text, where
            elif shape != self.shape:
                raise ValueError(
                    f"latent shapes differ within the cache: {list(self.shape)} ({self.first_where}) vs "
                    f"{list(shape)} ({where}). Encode every shard of one data set at one image_size."
                )
            elif text != self.text:
                raise ValueError(
                    f"the cache mixes samples with and without text embeddings, or of different text encoders: "
                    f"{self.text} ({self.first_where}) vs {text} ({where}). Encode every shard with one text_encoder=."
                )
            self.counter.good()
            yield sample


def distinct(sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The different dicts of ``sources``, in first-seen order: a batch carries each encoder identity once (one for
    a cache from one autoencoder), not 64 equal copies that every batch transfer and check would walk."""
    unique: list[dict[str, Any]] = []
    for source in sources:
        if source not in unique:
            unique.append(source)
    return unique


class BatchLatents(BatchSamples):
    """Decoded latent samples -> batches (same emission and skip-count rules as image batches)."""

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        text = {}
        if "text_context" in samples[0]:  # DecodeLatents keeps a stream all-text or no-text
            text = {"text_context": torch.stack([s["text_context"] for s in samples]),  # [B, L, D] float16
                    "text_pooled": torch.stack([s["text_pooled"] for s in samples]),  # [B, P] float16
                    "text_source": distinct([s["text_source"] for s in samples])}
        return {
            **text,
            "latent_mean": torch.stack([s["latent_mean"] for s in samples]),  # [B, C, h, w] float16
            "latent_logvar": torch.stack([s["latent_logvar"] for s in samples]),  # [B, C, h, w] float16
            "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples],
            "latent_source": distinct([s["latent_source"] for s in samples]),
            "n_skipped": torch.tensor(self.counter.take(), dtype=torch.long),
            "n_empty_caption": torch.tensor(sum(s["empty_caption"] for s in samples), dtype=torch.long),
        }


class LatentDataModule(WebDataModule):
    """Batches of cached posterior moments from latent shards (see the module docstring).

    Same shard handling as :class:`~ldm.data.webdataset.WebDataModule` (patterns, resampling, epochs,
    DDP/worker splitting, skip counting); there is no image transform, so no crop, flip or ``build``.

    ``in_memory``: hold the training cache in memory (:mod:`ldm.data.latent_memory`: decoded once, batches by
    index, no loader workers) instead of streaming it. ``"auto"`` does when every training shard is a local file
    and together they take at most ``memory_mb`` MiB; ``true`` always, ``false`` never. Validation streams.
    """

    shard_hint = (
        "Write latent shards from image shards with `python scripts/encode_latents.py ckpt=<autoencoder "
        "checkpoint> data=<image data config>` (it prints the patterns) and point data.{split}_shards at them."
    )

    def __init__(
        self,
        train_shards: Shards | None,
        val_shards: Shards | None,
        batch_size: int,
        val_batch_size: int | None = None,
        num_workers: int | str = 0,
        shuffle_buffer: int = 1000,
        shardshuffle: int | bool = 100,
        resampled: bool = True,
        batches_per_epoch: int | None = None,
        samples_per_epoch: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
        seed: int | None = None,
        in_memory: bool | str = "auto",
        memory_mb: int = 1024,
    ):
        if in_memory not in (True, False, "auto"):
            raise ValueError(f"in_memory must be true, false or 'auto', got {in_memory!r}")
        super().__init__(
            train_shards, val_shards, image_size=None, batch_size=batch_size, val_batch_size=val_batch_size,
            num_workers=num_workers, shuffle_buffer=shuffle_buffer, shardshuffle=shardshuffle, resampled=resampled,
            batches_per_epoch=batches_per_epoch, samples_per_epoch=samples_per_epoch, pin_memory=pin_memory,
            persistent_workers=persistent_workers, prefetch_factor=prefetch_factor, seed=seed,
        )
        self.in_memory, self.memory_mb = in_memory, int(memory_mb)
        self.hparams.update(in_memory=in_memory, memory_mb=self.memory_mb)
        self._table = None  # the training cache once loaded (a curriculum's rebuilds reuse it)

    def holds_in_memory(self, urls: list[str]) -> bool:
        """Whether the training cache is held in memory (``in_memory``, and for ``auto`` its size on disk)."""
        if self.in_memory != "auto":
            return bool(self.in_memory)
        if not all(_is_local(u) for u in urls):  # remote or piped shards: stream them
            return False
        return sum(Path(u.removeprefix("file:")).stat().st_size for u in urls) <= self.memory_mb * 2**20

    def _make_train(self, urls: list[str]) -> Any:
        if not self.holds_in_memory(urls):
            return super()._make_train(urls)
        from ldm.data.latent_memory import InMemoryLatents, load_latent_table  # it builds on this module

        if self._table is None:
            self._table = load_latent_table(urls)
            log.info("latent cache in memory: %d samples from %d shard(s), %.0f MiB (%d skipped); read without "
                     "loader workers", len(self._table), len(urls), self._table.nbytes() / 2**20, self._table.n_skipped)
        return InMemoryLatents(self._table, self.train_option("batch_size"), self.train_batches_per_epoch(),
                               self._data_epochs(), world_size=self._world_size())

    def train_dataloader(self) -> Any:
        from ldm.data.latent_memory import InMemoryLatents

        if isinstance(self.train_dataset, InMemoryLatents):
            return self._loader(self.train_dataset, num_workers=0)
        return super().train_dataloader()

    def _sample_stages(self, counter: SkipCounter, train: bool) -> list[Any]:
        batch_size = self.train_option("batch_size") if train else self.hparams.val_batch_size
        return [DecodeLatents(counter), BatchLatents(batch_size, counter, partial=not train)]
