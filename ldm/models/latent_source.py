"""Which autoencoder produced a latent cache, and a clear error when it is not the diffusion model's.

A cache of posterior moments (``scripts/encode_latents.py``) is only valid for the encoder that made it.
Its identity is the SHA-256 of the encoder weights (``encoder.*`` and ``quant_conv.*``: exactly what
decides q(z|x)), so it survives what does not change the latents: a re-saved checkpoint, a stage-2
checkpoint carrying the same first stage, or a fine-tuned decoder (as SD's ``vae-ft-mse``). The checkpoint
file's path and SHA-256 are stored beside it, for people.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

ENCODER_PREFIXES = ("encoder.", "quant_conv.")


class LatentSourceMismatch(ValueError):
    """The cached latents were encoded by a different autoencoder than the model's first stage."""


def encoder_fingerprint(first_stage: nn.Module) -> str:
    """SHA-256 (hex) of the encoder and quant-conv weights: names, shapes and float32 values."""
    digest = hashlib.sha256()
    state = first_stage.state_dict()
    for name in sorted(k for k in state if k.startswith(ENCODER_PREFIXES)):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def autoencoder_identity(first_stage: nn.Module, checkpoint: Optional[str | Path] = None,
                         hash_checkpoint: bool = True) -> dict[str, Any]:
    """What a latent cache records about the autoencoder that encoded it (JSON-ready).

    ``checkpoint`` is the file the weights came from (named in errors; hashed when ``hash_checkpoint``).
    """
    return {
        "encoder_sha256": encoder_fingerprint(first_stage),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint is not None and hash_checkpoint else None,
        "z_channels": int(getattr(first_stage, "z_channels")),
        "downsample_factor": int(getattr(first_stage, "downsample_factor")),
    }


def describe(identity: Mapping[str, Any]) -> str:
    """One line naming an autoencoder identity for error messages."""
    checkpoint = identity.get("checkpoint") or "an unnamed checkpoint"
    return f"encoder sha256 {str(identity.get('encoder_sha256'))[:16]}... ({checkpoint})"


def check_latent_sources(sources: Iterable[Mapping[str, Any]], model_identity: Mapping[str, Any]) -> None:
    """Raise :class:`LatentSourceMismatch` unless every cached sample was encoded by the model's encoder."""
    expected = model_identity["encoder_sha256"]
    for source in sources:
        if source.get("encoder_sha256") != expected:
            model_ckpt = model_identity.get("checkpoint") or "<the model's autoencoder checkpoint>"
            cached_ckpt = source.get("checkpoint") or "<the autoencoder the cache was made with>"
            other = (f"train from the latent-diffusion checkpoint {cached_ckpt} that holds it (ckpt_path=...)"
                     if source.get("checkpoint_kind") == "diffusion"
                     else f"train with that autoencoder: model.first_stage_config.ckpt_path={cached_ckpt}")
            raise LatentSourceMismatch(
                f"The cached latents were encoded by a different autoencoder than this model's first stage: "
                f"cache: {describe(source)}; model: {describe(model_identity)}. Either re-encode the shards with "
                f"the model's autoencoder (`python scripts/encode_latents.py ckpt={model_ckpt} data=<image data> "
                f"force=true`), or {other}."
            )
