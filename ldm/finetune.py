"""Fine-tuning: a ``LatentDiffusion`` rebuilt from a checkpoint of this project, ready to train on.

The architecture (U-Net, autoencoder, text encoder, schedule, latent normalisation) and every weight come from
the checkpoint; the configuration gives what fine-tuning changes: optimizer, scheduler, EMA decay, caption
dropout, ... and optionally LoRA (``ldm/lora.py``). The target of ``model=ldm_finetune``::

    python train.py experiment=quickstart_finetune init_from=<ldm run>/checkpoints/last.ckpt
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from ldm.checkpoints import load_checkpoint
from ldm.lora import lora_spec
from ldm.models.diffusion import LatentDiffusion
from ldm.utils.sampling_io import file_hash

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
UNET_EMA = "model_ema.shadow.diffusion_model."
TEXT = "cond_stage_model."
TEXT_EMA = "cond_stage_ema.shadow."


def merge_overrides(hparams: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """The checkpoint's constructor arguments with ``overrides`` on top; mappings (``unet_config``, ``schedule``,
    ...) are updated key by key, so ``unet_config: {use_checkpoint: true}`` keeps the rest of the topology."""
    merged = dict(hparams)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def starting_weights(state: Mapping[str, torch.Tensor], use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The live weights to start from: with ``use_ema`` the checkpoint's EMA U-Net (and EMA text encoder, the pair
    it samples with) replace the raw ones. Returns (U-Net + text + first-stage + buffers, "ema" | "raw")."""
    has_ema = any(k.startswith(UNET_EMA) for k in state)
    take_ema = use_ema and has_ema
    out = {k: v for k, v in state.items() if not k.startswith(("model_ema.", "cond_stage_ema."))}
    if take_ema:
        out.update({UNET + k[len(UNET_EMA):]: v for k, v in state.items() if k.startswith(UNET_EMA)})
        out.update({TEXT + k[len(TEXT_EMA):]: v for k, v in state.items() if k.startswith(TEXT_EMA)})
    return out, "ema" if take_ema else "raw"


def fresh_ema_state(model: LatentDiffusion, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EMA entries the model expects, started from ``weights`` (the averages restart with the fine-tune)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith(UNET_EMA):
            out[key] = weights[UNET + key[len(UNET_EMA):]]
        elif key.startswith(TEXT_EMA):
            out[key] = weights[TEXT + key[len(TEXT_EMA):]]
        elif key in ("model_ema.num_updates", "cond_stage_ema.num_updates"):
            out[key] = torch.zeros_like(value)
    return out


def latent_diffusion_from_ldm_checkpoint(init_from: str, init_ema: bool = True, lora: Optional[dict] = None,
                                         **overrides: Any) -> LatentDiffusion:
    """``LatentDiffusion`` with the architecture and weights of the project checkpoint ``init_from`` (read with
    ``weights_only``) and the training settings in ``overrides``; strict: every tensor must fit.

    ``init_ema``: start from the checkpoint's EMA weights (U-Net and a trained text encoder) when it has them.
    ``lora``: freeze everything and train LoRA adapters on the U-Net (``LatentDiffusion.add_lora``); the text
    encoder is then frozen (``cond_stage_config.freeze=false`` is refused) and ``ema_decay`` must be null.
    """
    if not init_from:
        raise ValueError("Fine-tuning needs init_from=<checkpoints/last.ckpt of an *_ldm run>.")
    if lora:
        lora = lora_spec(lora)  # bad specs fail before anything is built
        if overrides.get("ema_decay") is not None:
            raise ValueError("LoRA trains only the U-Net adapters, without EMA: set model.ema_decay=null.")
        if (overrides.get("cond_stage_config") or {}).get("freeze") is False:
            raise ValueError("LoRA trains only the U-Net adapters and keeps the text encoder frozen: drop "
                             "model.cond_stage_config.freeze=false, or fine-tune all weights with "
                             "experiment=quickstart_finetune.")
    ckpt = load_checkpoint(init_from)
    hparams = ckpt.get("hyper_parameters") or {}
    if "unet_config" not in hparams:
        raise ValueError(f"{init_from} is not a latent-diffusion checkpoint of this project (no unet_config in its "
                         f"hyper-parameters). Stable Diffusion files fine-tune with experiment=sd15_finetune|sd21_finetune.")
    if hparams.get("lora"):
        raise ValueError(f"{init_from} was trained with LoRA adapters: merge them into a full checkpoint first "
                         f"(python scripts/merge_lora.py {init_from} merged.ckpt) and fine-tune that.")
    kwargs = merge_overrides(hparams, overrides)
    kwargs["lora"] = None  # added after the base weights are in place
    if lora:
        kwargs["cond_stage_config"] = {**kwargs["cond_stage_config"], "freeze": True}
    model = LatentDiffusion(**kwargs)
    weights, source = starting_weights(ckpt["state_dict"], init_ema)
    model.load_state_dict({**weights, **fresh_ema_state(model, weights)}, strict=True)
    model.first_stage_model.weights_loaded = True
    log.info(f"Fine-tuning from {init_from} ({source} weights).")
    if lora:
        model.add_lora(lora)
        model.lora_base = {"path": str(Path(init_from).resolve()), "sha256": file_hash(init_from, length=64),
                           "weights": source}
    return model
