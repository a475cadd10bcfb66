"""Cached text embeddings: which frozen text encoder made them, and how stage 2 uses them instead of encoding.

``scripts/encode_latents.py text_encoder=...`` stores each caption's ``context`` [L, D] and ``pooled`` [P] beside its
latents (format in :mod:`ldm.data.latents`). They are only valid for the encoder that computed them, so the cache
records a text identity: the settings that change the output (arch, layer, context_length, padding, activation)
and the SHA-256 of the text-tower weights (``logit_scale`` / ``logit_bias`` excluded: they never touch the
embeddings). ``LatentDiffusion`` compares it with its own text encoder (:class:`CachedTextConditioning`) and
refuses a mismatch, or any cached text when its text encoder trains (its output changes every step).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch

from ldm.modules.clip_configs import same_text_tower
from ldm.modules.conditioning import OpenCLIPTextEncoder

UNUSED_WEIGHTS = ("logit_scale", "logit_bias")  # contrastive-loss parameters, not part of the text embedding
# Besides these, the architectures must build the same text tower (compared by configuration, not name).
ENCODING_FIELDS = ("layer", "context_length", "pad_with_eot", "quick_gelu", "weights_sha256")


class TextSourceMismatch(ValueError):
    """The cached text embeddings were made by a different text encoder than the model's."""


class TrainableTextEncoderError(ValueError):
    """Cached text embeddings met a text encoder that trains (``cond_stage_config.freeze=false``)."""


def text_weights_fingerprint(encoder: OpenCLIPTextEncoder) -> str:
    """SHA-256 (hex) of the text tower's weights: names, shapes and float32 values."""
    digest = hashlib.sha256()
    state = encoder.model.state_dict()
    for name in sorted(k for k in state if k not in UNUSED_WEIGHTS):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def text_encoder_identity(encoder: OpenCLIPTextEncoder, checkpoint: Optional[str] = None,
                          checkpoint_kind: Optional[str] = None) -> dict[str, Any]:
    """What a text cache records about the encoder that made it (JSON-ready); ``checkpoint`` is for people."""
    return {
        "arch": encoder.arch,
        "layer": encoder.layer,
        "context_length": encoder.context_length,
        "pad_with_eot": encoder.tokenizer.pad == encoder.tokenizer.eot,
        "quick_gelu": encoder._uses_quick_gelu(),
        "weights_sha256": text_weights_fingerprint(encoder),
        "context_shape": [encoder.context_length, encoder.width],  # [L, D]
        "pooled_shape": [encoder.embed_dim],  # [P]
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_kind": checkpoint_kind,
    }


def describe_text(identity: Mapping[str, Any]) -> str:
    """One line naming a text identity for error messages."""
    checkpoint = identity.get("checkpoint") or "random or unnamed weights"
    return (f"{identity.get('arch')} layer={identity.get('layer')} context_length={identity.get('context_length')}, "
            f"weights sha256 {str(identity.get('weights_sha256'))[:16]}... ({checkpoint})")


def text_encoder_override(identity: Mapping[str, Any]) -> str:
    """The ``scripts/encode_latents.py`` argument that rebuilds the encoder of ``identity``."""
    fields = {"arch": identity.get("arch"), "pretrained": identity.get("checkpoint") or "<its weights file>",
              "layer": identity.get("layer"), "context_length": identity.get("context_length")}
    fields.update({k: True for k in ("pad_with_eot", "quick_gelu") if identity.get(k)})
    return "text_encoder='{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}'"


def check_text_sources(sources: Iterable[Mapping[str, Any]], model_identity: Mapping[str, Any]) -> None:
    """Raise :class:`TextSourceMismatch` unless every cached sample was encoded by the model's text encoder."""
    expected = tuple(model_identity.get(k) for k in ENCODING_FIELDS)
    arch = model_identity.get("arch")
    for source in sources:
        same_tower = source.get("arch") == arch or same_text_tower(source.get("arch"), arch)
        if not same_tower or tuple(source.get(k) for k in ENCODING_FIELDS) != expected:
            raise TextSourceMismatch(
                f"The cached text embeddings were made by a different text encoder than this model's: cache: "
                f"{describe_text(source)}; model: {describe_text(model_identity)}. Re-encode the shards with this "
                f"model's text encoder (`python scripts/encode_latents.py ckpt=<autoencoder> data=<image data> "
                f"{text_encoder_override(model_identity)} force=true`, or text_encoder=<a latent-diffusion checkpoint "
                f"of this model>), or train from a cache without text (encode without text_encoder=)."
            )


class CachedTextConditioning:
    """A batch's cached text embeddings -> the U-Net's text keyword arguments, for one ``LatentDiffusion``.

    Rows whose caption is ``""`` (dropped for classifier-free guidance, or empty in the data) get the model's own
    empty-prompt embedding, encoded once; the other rows get the cached ``text_context`` [B, L, D] and
    ``text_pooled`` [B, P]. The model's identity is computed once (:meth:`reset` after its weights change) and
    every batch's ``text_source`` is checked against it, as the latents' ``latent_source``.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._identity: Optional[dict[str, Any]] = None
        self._null: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # context [1, L, D], pooled [1, P]

    def identity(self, model: Any) -> dict[str, Any]:
        """The model's text identity (``pretrained`` named as its checkpoint)."""
        if self._identity is None:
            pretrained = (model.hparams.get("cond_stage_config") or {}).get("pretrained")
            self._identity = text_encoder_identity(model.cond_stage_model, pretrained)
        return self._identity

    def __call__(self, model: Any, batch: Mapping[str, Any], captions: list[str]) -> dict[str, torch.Tensor]:
        encoder: OpenCLIPTextEncoder = model.cond_stage_model
        if not encoder.frozen:
            raise TrainableTextEncoderError(
                "The batch carries cached text embeddings, but this model trains its text encoder "
                "(model.cond_stage_config.freeze=false), whose output changes every step: train from a cache "
                "without text (scripts/encode_latents.py without text_encoder=), or freeze the text encoder."
            )
        if "text_source" in batch:
            check_text_sources(batch["text_source"], self.identity(model))
        if self._null is None:
            null = encoder.encode([""])
            self._null = (null["context"].detach(), null["pooled"].detach())
        dtype = encoder.model.token_embedding.weight.dtype  # what online encoding returns
        null_context, null_pooled = (t.to(dtype) for t in self._null)
        context = batch["text_context"].to(null_context.device, dtype)  # [B, L, D]
        pooled = batch["text_pooled"].to(null_pooled.device, dtype)  # [B, P]
        if context.shape[1:] != null_context.shape[1:] or pooled.shape[1:] != null_pooled.shape[1:]:
            raise TextSourceMismatch(
                f"cached text embeddings {list(context.shape[1:])} / {list(pooled.shape[1:])} do not match this "
                f"model's text encoder ({list(null_context.shape[1:])} / {list(null_pooled.shape[1:])}): re-encode "
                f"the shards with its text encoder."
            )
        if any(c == "" for c in captions):  # host-side test: no device sync
            empty = torch.tensor([c == "" for c in captions]).to(context.device, non_blocking=True)  # [B]
            context = torch.where(empty.view(-1, 1, 1), null_context, context)
            pooled = torch.where(empty.view(-1, 1), null_pooled, pooled)
        cond = {"context": context}
        if model.uses_pooled_text:
            cond["y"] = pooled
        return cond
