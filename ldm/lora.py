"""LoRA adapters on the U-Net's attention projections, through the peft library.

LoRA (Hu et al. 2021, eq. 3) keeps a pretrained weight W [out, in] frozen and learns a low-rank update:

    h = W x + (alpha / r) * B A x,     A [r, in] (random), B [out, r] (zeros: the adapter starts as a no-op)

Only A and B train. Merging folds the update into the weight, ``W <- W + scale * (alpha / r) * B A``, after which
the U-Net is a plain U-Net again (no extra cost at sampling). The spec (``model.lora`` in the configs)::

    {rank: 8, alpha: 8, dropout: 0.0, target_modules: [to_q, to_k, to_v, to_out.0]}

names the ``CrossAttention`` Linear layers (``ldm/modules/attention.py``) of every transformer block, self- and
cross-attention alike. An adapter file is a safetensors file of peft's ``get_peft_model_state_dict`` (keys such as
``input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_A.weight``) with a JSON sidecar of the spec and the base
checkpoint it was trained on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ldm.checkpoints import load_state_dict, save_safetensors

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SPEC_KEYS = ("rank", "alpha", "dropout", "target_modules")
ADAPTER_NAME = "default"
PathLike = Union[str, Path]


def lora_spec(spec: Mapping[str, Any]) -> dict:
    """Validate a ``model.lora`` mapping and fill its defaults (alpha = rank, dropout 0, attention projections)."""
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ValueError(f"Unknown model.lora keys {sorted(unknown)}; allowed: {list(SPEC_KEYS)}.")
    rank = spec.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"model.lora.rank must be a positive integer, got {rank!r}.")
    alpha = float(spec.get("alpha") if spec.get("alpha") is not None else rank)
    dropout = float(spec.get("dropout") or 0.0)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.lora.dropout must lie in [0, 1), got {dropout}.")
    targets = list(spec.get("target_modules") or DEFAULT_TARGETS)
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": targets}


def _peft_config(spec: Mapping[str, Any]):
    from peft import LoraConfig

    spec = lora_spec(spec)
    return LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                      target_modules=spec["target_modules"], bias="none")


def lora_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every peft adapter layer inside ``module``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft absent: no module can hold its layers
        return
    for name, sub in module.named_modules():
        if isinstance(sub, BaseTunerLayer):
            yield name, sub


def has_lora(module: nn.Module) -> bool:
    return next(lora_layers(module), None) is not None


def inject_lora(unet: nn.Module, spec: Mapping[str, Any]) -> int:
    """Freeze ``unet`` and add fresh LoRA adapters (B = 0: outputs unchanged) to the targeted Linear layers in
    place; returns the number of adapted layers. Afterwards only the adapters require gradients."""
    try:
        from peft import inject_adapter_in_model
    except ImportError as err:
        raise ImportError("LoRA needs the peft library: pip install 'peft>=0.10' (or pip install -e '.[lora]').") from err
    if has_lora(unet):
        raise ValueError("The U-Net already holds LoRA adapters; merge them first (ldm.lora.merge_lora).")
    config = _peft_config(spec)
    unet.requires_grad_(False)
    try:
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        raise ValueError(f"model.lora.target_modules={sorted(config.target_modules)} matched no layer of the U-Net "
                         f"({err}). Use Linear layer names of ldm/modules/attention.py, e.g. {list(DEFAULT_TARGETS)}.") from err
    count = sum(1 for _ in lora_layers(unet))
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    log.info(f"LoRA rank {config.r}, alpha {config.lora_alpha}: {count} adapted layers, {trainable:,} trainable parameters.")
    return count


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (peft's names, without the adapter name)."""
    from peft import get_peft_model_state_dict

    if not has_lora(unet):
        raise ValueError("The U-Net holds no LoRA adapters: nothing to save (was model.lora set?).")
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}


def load_lora_state_dict(unet: nn.Module, state: Mapping[str, torch.Tensor], source: str = "adapter") -> None:
    """Load adapter tensors into a U-Net with injected adapters; every adapter tensor must be present and used."""
    from peft import set_peft_model_state_dict

    shapes = {k: tuple(v.shape) for k, v in lora_state_dict(unet).items()}
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    mismatched = [k for k in sorted(set(shapes) & set(state)) if tuple(state[k].shape) != shapes[k]]
    if missing or unexpected or mismatched:
        raise ValueError(f"{source} does not fit this U-Net's adapters: missing {missing[:6]}, unexpected "
                         f"{unexpected[:6]}, wrong shapes {mismatched[:6]}. Use the base checkpoint (and the rank / "
                         f"target_modules) the adapter was trained with.")
    set_peft_model_state_dict(unet, dict(state), adapter_name=ADAPTER_NAME)


@torch.no_grad()
def merge_lora(unet: nn.Module, scale: float = 1.0) -> nn.Module:
    """Fold every adapter into its weight, ``W <- W + scale * (alpha / r) * B A``, and put the plain layer back:
    the U-Net's keys are the original ones again (``to_q.weight``). Returns ``unet`` (changed in place)."""
    layers = list(lora_layers(unet))
    if not layers:
        raise ValueError("The U-Net holds no LoRA adapters to merge.")
    for name, layer in layers:
        layer.set_scale(ADAPTER_NAME, float(scale))
        layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, layer.get_base_layer())
    if hasattr(unet, "peft_config"):
        del unet.peft_config
    return unet


# ---------------------------------------------------------------------------------------------- files
def sidecar_path(adapter_path: PathLike) -> Path:
    """``lora_adapter.safetensors`` -> ``lora_adapter.json``."""
    return Path(adapter_path).with_suffix(".json")


def save_adapter(unet: nn.Module, path: PathLike, spec: Mapping[str, Any], base: Optional[Mapping[str, Any]] = None,
                 extra: Optional[Mapping[str, Any]] = None) -> tuple[Path, Path]:
    """Write the adapter tensors (safetensors) and a JSON sidecar {spec, base checkpoint, ...}; returns both paths."""
    path = Path(path)
    info = {"format": "ldm-lora", **lora_spec(spec), "base": dict(base or {}), **dict(extra or {})}
    save_safetensors(lora_state_dict(unet), path, metadata={"format": "pt", "ldm_lora": json.dumps(info)})
    meta_path = sidecar_path(path)
    meta_path.write_text(json.dumps(info, indent=2))
    return path, meta_path


def read_adapter(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of an adapter file; the info comes from the JSON sidecar, else the file's metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors adapter file (written by training with model.lora set, as "
                         f"checkpoints/lora_adapter.safetensors).")
    state = load_state_dict(path)
    meta_path = sidecar_path(path)
    if meta_path.exists():
        info = json.loads(meta_path.read_text())
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("ldm_lora")
        if raw is None:
            raise ValueError(f"{path} carries no LoRA description (no {meta_path.name}, no 'ldm_lora' metadata).")
        info = json.loads(raw)
    return state, info


def apply_adapter(model, path: PathLike, scale: float = 1.0, use_ema: bool = True) -> dict:
    """Inject the adapter at ``path`` into the U-Net that samples (``model.sampling_unet(use_ema)``), load it and
    merge it with ``scale``; returns the adapter's info. The model samples as the fine-tuned one afterwards."""
    state, info = read_adapter(path)
    unet = model.sampling_unet(use_ema)
    uses_ema = unet is not model.unet
    trained_on = (info.get("base") or {}).get("weights")
    if trained_on is not None and trained_on != ("ema" if uses_ema else "raw"):
        log.warning(f"The adapter was trained on the base's {trained_on} U-Net but is merged into its "
                    f"{'EMA' if uses_ema else 'raw'} weights (use_ema={use_ema}).")
    inject_lora(unet, {k: info[k] for k in SPEC_KEYS if k in info})
    load_lora_state_dict(unet, state, source=str(path))
    merge_lora(unet, scale)
    return info
