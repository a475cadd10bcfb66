"""Encode image-caption shards into latent shards (posterior mean + log-variance) for fast stage-2 training.

    python scripts/encode_latents.py ckpt=<autoencoder run>/checkpoints/last.ckpt data=shapes32
    python scripts/encode_latents.py ckpt=<ldm run>/checkpoints/last.ckpt data=folder \
        data.train_shards='data/mine/train-{000000..000009}.tar' data.val_shards=data/mine/val-000000.tar \
        data.image_size=256 out=data/mine_latents device=cuda precision=bf16 batch_size=128

then train with ``data=<name>_latents`` (or ``data=latents data.train_shards=... data.val_shards=...``) and
the same autoencoder as ``model.first_stage_config.ckpt_path``. ``text_encoder=`` also caches the frozen text
encoder's output per caption (``context`` and ``pooled``, and the empty prompt's once per split), so stage 2 runs
neither encoder; training then needs the same text encoder (its identity is checked, ``ldm.models.text_cache``):

    python scripts/encode_latents.py ckpt=<autoencoder ckpt> data=shapes32 text_encoder=<clip run>/checkpoints/last.ckpt
    python scripts/encode_latents.py ckpt=<ldm ckpt> data=shapes32 text_encoder=<the same ldm ckpt>
    python scripts/encode_latents.py ckpt=... text_encoder='{arch: ViT-H-14, pretrained: vit_h.bin, layer: penultimate}'

Each image shard becomes one latent shard
(``{split}-NNNNNN.tar`` in input order; format in :mod:`ldm.data.latents`) written to a hidden temporary
folder and moved into ``out`` when all are complete. Images get the data config's validation transform
(resize + centre crop, no flip); the encoder runs in eval mode and the order is the shards' order, so the
same inputs give byte-identical shards. Corrupt images are skipped and counted (ldm.data.stages).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import hydra
import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

import ldm.utils.resolvers  # noqa: E402,F401
from ldm.checkpoints import UnsafeCheckpointError, load_checkpoint  # noqa: E402
from ldm.data.latents import latent_record, save_text_uncond, text_uncond_name  # noqa: E402
from ldm.data.shards import brace_pattern, existing_shards, shard_name  # noqa: E402
from ldm.data.stages import DecodeSamples, SkipCounter  # noqa: E402
from ldm.data.transforms import ImageTransform  # noqa: E402
from ldm.data.webdataset import missing_local_shards  # noqa: E402
from ldm.evaluation.kind import checkpoint_kind  # noqa: E402
from ldm.models.first_stage import FirstStage  # noqa: E402
from ldm.models.latent_source import autoencoder_identity  # noqa: E402
from ldm.models.text_cache import text_encoder_identity  # noqa: E402
from ldm.modules.conditioning import OpenCLIPTextEncoder  # noqa: E402
from ldm.utils.run import ConfigError, check_missing_values  # noqa: E402
from ldm.utils.sampling_io import resolve_device  # noqa: E402

log = logging.getLogger("encode_latents")
_TAR_MTIME = 0  # fixed timestamps: reproducible archives (as ldm.data.shards)
_FIRST_STAGE_PREFIX = "first_stage_model."


def load_first_stage(path: str) -> FirstStage:
    """The frozen autoencoder of a stage-1 checkpoint, or the first stage of a latent-diffusion checkpoint."""
    if checkpoint_kind(path) == "autoencoder":
        return FirstStage.from_config({"ckpt_path": path})
    ckpt = load_checkpoint(path)  # safe: weights_only
    config = ckpt["hyper_parameters"]["first_stage_config"]
    module = FirstStage(config["ddconfig"], config["embed_dim"])
    prefix = _FIRST_STAGE_PREFIX
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    module.load_autoencoder_state(state, source=path)
    return module


TextEncoder = tuple[OpenCLIPTextEncoder, dict]  # the encoder and its identity (ldm.models.text_cache)


def load_text_encoder(spec: Any) -> TextEncoder:
    """The frozen text encoder to cache and its identity. ``spec``: a latent-diffusion checkpoint (its text encoder),
    a stage-0 CLIP checkpoint (layer "last", 77 tokens), or ``OpenCLIPTextEncoder`` arguments (a model's
    ``cond_stage_config``: arch, pretrained, layer, context_length, ...)."""
    if isinstance(spec, (DictConfig, dict)):
        config = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
        checkpoint, kind = config.get("pretrained"), "cond_stage_config"
    else:
        checkpoint = str(spec)
        try:
            ckpt = load_checkpoint(checkpoint, mmap=True)  # safe; tensors are not read
        except UnsafeCheckpointError:
            raise
        except RuntimeError:  # a legacy (pre-zip) file cannot be memory-mapped
            ckpt = load_checkpoint(checkpoint)
        hparams = dict(ckpt.get("hyper_parameters") or {})
        if "unet_config" in hparams:
            config, kind = dict(hparams.get("cond_stage_config") or {}), "diffusion"
        elif "arch" in hparams:
            config, kind = {"arch": hparams["arch"]}, "clip"
        else:
            raise ConfigError(f"text_encoder={checkpoint} is neither a latent-diffusion nor a stage-0 CLIP checkpoint: "
                              f"pass the text encoder's settings instead, text_encoder='{{arch: ..., pretrained: "
                              f"{checkpoint}, layer: ..., context_length: ...}}' (as model.cond_stage_config).")
        config["pretrained"] = checkpoint
    if not config.get("freeze", True):
        raise ConfigError(f"text_encoder={checkpoint}: that text encoder trains (cond_stage_config.freeze=false), so "
                          f"its output changes during training and cannot be cached. Encode without text_encoder=; "
                          f"the model then encodes the captions itself.")
    encoder = OpenCLIPTextEncoder(**{**config, "freeze": True})
    return encoder, text_encoder_identity(encoder, checkpoint, kind)


class DecodeWithMeta(DecodeSamples):
    """:class:`DecodeSamples` that also keeps each sample's ``.json`` meta (``{}`` when missing or unreadable)."""

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for raw in samples:
            for sample in super().__call__([raw]):
                try:
                    meta = json.loads(raw["json"]) if "json" in raw else {}
                except (UnicodeDecodeError, json.JSONDecodeError):
                    meta = {}
                yield {**sample, "meta": meta if isinstance(meta, dict) else {}}


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _expected_samples(urls: list[str]) -> int | None:
    """Sample count from the ``{split}-info.json`` that scripts/make_shards.py writes beside local shards."""
    first = Path(urls[0])
    info = first.parent / f"{first.name.rsplit('-', 1)[0]}-info.json"
    try:
        data = json.loads(info.read_text())
        same = sorted(Path(p).resolve() for p in data["shards"]) == sorted(Path(u).resolve() for u in urls)
        return int(data["num_samples"]) if same else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def encode_captions(text: TextEncoder, captions: list[str], autocast: Any) -> dict[str, torch.Tensor]:
    """captions -> {"text_context": [B, L, D], "text_pooled": [B, P]} (float32, CPU)."""
    with torch.no_grad(), autocast:
        out = text[0].encode(captions)
    return {"text_context": out["context"].float().cpu(), "text_pooled": out["pooled"].float().cpu()}


class CaptionFeatures:
    """Text features per distinct caption, each encoded once (captions repeat: shapes32's 20,000 training captions
    hold 7,550 distinct ones). Rows are kept up to ``max_mb`` MiB; beyond that, new captions are encoded every time.
    The text encoder is frozen and in eval mode, and every caption is padded to the same context length, so a
    caption's features do not depend on the batch it came in (up to float rounding)."""

    def __init__(self, text: TextEncoder, autocast: Any, max_mb: float):
        self.text, self.autocast = text, autocast
        self.max_bytes, self.bytes = max_mb * 2**20, 0
        self.rows: dict[str, dict[str, torch.Tensor]] = {}  # caption -> {"text_context": [L, D], "text_pooled": [P]}
        self.encoded = self.requested = 0

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """captions -> {"text_context": [B, L, D], "text_pooled": [B, P]} (float32, CPU), as ``encode_captions``."""
        new = list(dict.fromkeys(c for c in captions if c not in self.rows))  # distinct, in first-seen order
        fresh: dict[str, dict[str, torch.Tensor]] = {}
        if new:
            out = encode_captions(self.text, new, self.autocast)
            fresh = {c: {k: v[i].clone() for k, v in out.items()} for i, c in enumerate(new)}
            for caption, row in fresh.items():
                size = sum(t.numel() * t.element_size() for t in row.values())
                if self.bytes + size <= self.max_bytes:
                    self.rows[caption], self.bytes = row, self.bytes + size
        self.encoded += len(new)
        self.requested += len(captions)
        rows = [self.rows.get(c) or fresh[c] for c in captions]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _fits_half(*tensors: torch.Tensor) -> torch.Tensor:
    """[B] True where every tensor's row is finite in float16."""
    return torch.stack([torch.isfinite(t.half()).flatten(1).all(1) for t in tensors]).all(0)


def encode_shard(url: str, sink: wds.TarWriter, first_stage: FirstStage, cfg: DictConfig, identity: dict,
                 autocast: Any, device: torch.device, bar: tqdm,
                 captions: Optional[CaptionFeatures] = None) -> dict[str, Any]:
    """Encode one image shard (and, with ``captions``, its captions' text features) into ``sink``; returns counts and
    the latent shape."""
    counter = SkipCounter(f"encode {Path(url).name}")
    image_size = int(cfg.data.image_size)
    pipeline = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=counter.handler),
                                DecodeWithMeta(ImageTransform(image_size), counter))
    written, overflow, shape = 0, 0, None
    for chunk in _batches(pipeline, int(cfg.batch_size)):
        images = torch.stack([s["image"] for s in chunk]).to(device)  # [B, 3, H, W] in [-1, 1]
        with torch.no_grad(), autocast:
            posterior = first_stage.encode(images)
        mean, logvar = posterior.mean.float().cpu(), posterior.logvar.float().cpu()  # [B, C, h, w] each
        embeddings = captions([s["caption"] for s in chunk]) if captions else {}
        finite = _fits_half(mean, logvar, *embeddings.values())
        for i, (sample, m, lv, ok) in enumerate(zip(chunk, mean, logvar, finite.tolist())):
            if not ok:
                overflow += 1
                log.warning("skipped %s in %s: its latents or text embeddings do not fit float16", sample["key"], url)
                continue
            row = {name: e[i] for name, e in embeddings.items()} if captions else None  # [L, D], [P]
            sink.write(latent_record(sample["key"], m, lv, sample["caption"], sample["meta"], identity, image_size,
                                     text=row, text_source=captions.text[1] if captions else None))
            written += 1
        shape = list(mean.shape[1:])
        bar.update(len(chunk))
    return {"written": written, "skipped": counter.total + overflow, "shape": shape}


def encode_split(split: str, urls: list[str], first_stage: FirstStage, cfg: DictConfig, identity: dict,
                 device: torch.device, text: Optional[TextEncoder] = None) -> dict[str, Any]:
    """Encode the shards of one split into ``cfg.out/{split}-NNNNNN.tar`` (+ ``{split}-text_uncond.safetensors``
    with ``text``); returns the summary written as info."""
    out_dir = Path(cfg.out)
    targets = [out_dir / shard_name(split, i) for i in range(len(urls))]
    uncond = out_dir / text_uncond_name(split)
    inputs = {Path(u).resolve() for u in urls if "://" not in u}
    if any(t.resolve() in inputs for t in targets):
        raise ConfigError(f"out={out_dir} would overwrite the image shards being read: choose another out folder.")
    old = [p for p in {*existing_shards(out_dir, split), *targets, uncond} if p.exists()]
    if old and not cfg.force:
        raise FileExistsError(f"{len(old)} {split} file(s) already exist in {out_dir}; refusing to overwrite. "
                              f"Pass force=true to replace them, or choose another out=.")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    totals = {"num_samples": 0, "num_skipped": 0}
    shape = None
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=_expected_samples(urls), desc=f"encoding {split}", unit="img", disable=not cfg.progress)
    captions = CaptionFeatures(text, autocast, float(cfg.caption_memory_mb)) if text else None
    with tempfile.TemporaryDirectory(prefix=f".{split}-", dir=out_dir) as tmp, bar:
        for url, target in zip(urls, targets):
            with wds.TarWriter(str(Path(tmp) / target.name), encoder=False, mtime=_TAR_MTIME) as sink:
                counts = encode_shard(url, sink, first_stage, cfg, identity, autocast, device, bar, captions)
            totals["num_samples"] += counts["written"]
            totals["num_skipped"] += counts["skipped"]
            shape = shape or counts["shape"]
        if captions:
            log.info("%s: text encoder ran on %d distinct of %d captions", split, captions.encoded, captions.requested)
        if totals["num_samples"] == 0:
            raise ValueError(f"no readable image in the {split} shards {urls[:3]}...: nothing to encode.")
        if text:  # the empty prompt, for caption dropout: [L, D], [P]
            null = encode_captions(text, [""], autocast)
            save_text_uncond(Path(tmp) / uncond.name, null["text_context"][0], null["text_pooled"][0], text[1])
        for path in old:
            path.unlink()
        for target in targets + ([uncond] if text else []):
            shutil.move(str(Path(tmp) / target.name), target)
    summary = {"split": split, **totals, "latent_shape": shape, "image_size": int(cfg.data.image_size),
               "pattern": brace_pattern(out_dir, split, len(targets)), "shards": [str(t) for t in targets],
               "source_shards": urls, "latent_source": identity,
               "text_source": text[1] if text else None, "text_uncond": str(uncond) if text else None}
    (out_dir / f"{split}-info.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def encode(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Encode every split of ``cfg.splits`` (configs/encode_latents.yaml); returns the per-split summaries."""
    check_missing_values(cfg)
    if cfg.data.get("image_size") is None:
        raise ConfigError("data= must name an image data config (with image_size), e.g. data=shapes32; "
                          "a *_latents config is what this script writes.")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision={cfg.precision!r}; choose fp32 or bf16.")
    device = resolve_device(cfg.device)
    if device.type == "cuda":  # same inputs, same bytes
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    hydra.utils.instantiate(cfg.data, _convert_="all").prepare_data()  # builds embedded shards on first use
    if cfg.data.get("random_crop") or cfg.data.get("random_flip"):
        log.warning("data.random_crop / random_flip are not applied: the cache holds one centre crop per image")
    first_stage = load_first_stage(str(cfg.ckpt)).to(device).eval()
    identity = autoencoder_identity(first_stage, cfg.ckpt)
    identity["checkpoint_kind"] = checkpoint_kind(str(cfg.ckpt))
    text = None
    if cfg.get("text_encoder") is not None:
        encoder, text_identity = load_text_encoder(cfg.text_encoder)
        text = (encoder.to(device).eval(), text_identity)
    summaries = {}
    for split in cfg.splits:
        pattern = cfg.data.get(f"{split}_shards")
        if pattern is None:
            log.info("data.%s_shards is null: %s skipped", split, split)
            continue
        urls, missing = missing_local_shards(pattern)
        if not urls or missing:
            raise FileNotFoundError(f"data.{split}_shards={pattern!r} names missing shard(s): "
                                    f"{(missing or [pattern])[:3]}. Write them with scripts/make_shards.py.")
        summaries[split] = encode_split(split, urls, first_stage, cfg, identity, device, text)
        s = summaries[split]
        print(f"{split}: {s['num_samples']} samples ({s['num_skipped']} skipped), latents {s['latent_shape']} "
              f"float16 -> {s['pattern']}")
    print(f"\nautoencoder: encoder sha256 {identity['encoder_sha256'][:16]}... ({cfg.ckpt})\nuse with train.py:")
    print("  data=latents " + " ".join(f"data.{k}_shards='{s['pattern']}'" for k, s in summaries.items()))
    if identity["checkpoint_kind"] == "autoencoder":
        print(f"  model.first_stage_config.ckpt_path={cfg.ckpt}")
    else:
        print(f"  and a model whose first stage is the one of {cfg.ckpt} (e.g. that run, resumed or fine-tuned)")
    if text:
        _print_text_usage(text[1])
    return summaries


def _print_text_usage(identity: dict) -> None:
    context, pooled = identity["context_shape"], identity["pooled_shape"]
    print(f"text: context {context} + pooled {pooled} float16 per caption, {identity['arch']} "
          f"layer={identity['layer']}, "
          f"weights sha256 {identity['weights_sha256'][:16]}...; the model's text encoder must be the same:")
    if identity["checkpoint_kind"] == "diffusion":
        print(f"  the text encoder of {identity['checkpoint']} (e.g. that run, resumed or fine-tuned)")
    else:
        print(f"  model.cond_stage_config: arch={identity['arch']} pretrained={identity['checkpoint']} "
              f"layer={identity['layer']} context_length={identity['context_length']} freeze=true")


@hydra.main(version_base="1.3", config_path="../configs", config_name="encode_latents")
def main(cfg: DictConfig) -> None:
    encode(cfg)


if __name__ == "__main__":
    main()
