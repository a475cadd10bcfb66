"""Text-encoder weights: transformers ``CLIPTextModel`` (SD 1.x) <-> open_clip text tower (SD 2.x).

SD 1.x stores OpenAI's CLIP ViT-L/14 text model in the transformers layout under
``cond_stage_model.transformer.text_model.*``; SD 2.x stores OpenCLIP ViT-H/14 in the open_clip
layout under ``cond_stage_model.model.*``. The two towers compute the same function (pre-LN
transformer, causal mask, final LayerNorm, EOT pooling), so conversion is a renaming plus the
fusing / splitting of the q, k, v projections into open_clip's ``in_proj``. OpenAI's weights use
QuickGELU: build the open_clip side with ``quick_gelu=True`` (arch ``ViT-L-14-quickgelu``).

Layer semantics differ between the SD versions and are kept apart on purpose:
  - SD 1.x conditions on the last layer after the final LayerNorm (HF ``last_hidden_state``).
  - SD 2.x conditions on the penultimate layer *passed through* ``ln_final`` (HF would call it
    ``final_layer_norm(hidden_states[-2])``; HF's ``hidden_states[-2]`` alone has no final norm).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_HF_PER_LAYER = {  # HF suffix -> open_clip suffix (inside transformer.resblocks.N.)
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_GLOBAL = {  # keys below ``text_model.`` (transformers < 5 and checkpoint files) or at the top level (>= 5)
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_HF_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
_HF_IGNORED = ("embeddings.position_ids",)  # a buffer in old transformers checkpoints


def hf_text_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` keys -> open_clip text keys.

    Keys may sit under ``text_model.`` (checkpoint files, transformers < 5, ``WithProjection``) or not
    (``CLIPTextModel.state_dict()`` of transformers >= 5).
    Without ``text_projection.weight`` (plain CLIPTextModel, as in SD 1.x) the result has no
    ``text_projection``; see ``OpenCLIPTextEncoder`` for how a missing projection is filled.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for full_key, value in state_dict.items():
        key = full_key[len("text_model."):] if full_key.startswith("text_model.") else full_key
        if key in _HF_IGNORED:
            continue
        if key in _HF_GLOBAL:
            out[_HF_GLOBAL[key]] = value
        elif key == "text_projection.weight":  # Linear(width -> embed, no bias): weight [E, W]
            out["text_projection"] = value.t()
        elif match := _HF_LAYER.match(key):
            layer, rest = int(match.group(1)), match.group(2)
            module, param = rest.rsplit(".", 1)
            if module in _HF_QKV:
                qkv.setdefault(layer, {})[f"{_HF_QKV[module]}_{param}"] = value
            elif module in _HF_PER_LAYER:
                out[f"transformer.resblocks.{layer}.{_HF_PER_LAYER[module]}.{param}"] = value
            else:
                raise KeyError(f"Unexpected CLIPTextModel key {full_key!r}.")
        else:
            raise KeyError(f"Unexpected CLIPTextModel key {full_key!r}.")
    for layer, parts in qkv.items():
        for param in ("weight", "bias"):
            try:
                fused = torch.cat([parts[f"q_{param}"], parts[f"k_{param}"], parts[f"v_{param}"]], dim=0)
            except KeyError as err:
                raise KeyError(f"Layer {layer} lacks {err.args[0]} of its q/k/v projections.") from None
            out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = fused
    return out


def open_clip_text_to_hf(
    state_dict: Mapping[str, torch.Tensor], with_projection: bool = False, text_model_prefix: str = "text_model."
) -> dict[str, torch.Tensor]:
    """open_clip text keys -> transformers CLIP text keys.

    The default ``text_model.`` prefix is the layout of checkpoint files (SD 1.x's
    ``cond_stage_model.transformer.*``) and of ``CLIPTextModelWithProjection``; pass
    ``text_model_prefix=""`` for ``CLIPTextModel.load_state_dict`` of transformers >= 5.
    ``with_projection`` adds ``text_projection.weight``. Image-tower and logit keys are dropped.
    """
    inverse_global = {v: text_model_prefix + k for k, v in _HF_GLOBAL.items()}
    inverse_layer = {v: k for k, v in _HF_PER_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in inverse_global:
            out[inverse_global[key]] = value
        elif key == "text_projection":
            if with_projection:
                out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            layer, rest = key[len("transformer.resblocks."):].split(".", 1)
            module, param = rest.rsplit(".", 1)
            prefix = f"{text_model_prefix}encoder.layers.{layer}."
            if module == "attn" and param in ("in_proj_weight", "in_proj_bias"):
                kind = param[len("in_proj_"):]
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = chunk.contiguous()
            elif module in inverse_layer:
                out[f"{prefix}{inverse_layer[module]}.{param}"] = value
            else:
                raise KeyError(f"Unexpected open_clip text key {key!r}.")
        elif key.startswith("visual.") or key in ("logit_scale", "logit_bias"):
            continue
        else:
            raise KeyError(f"Unexpected open_clip text key {key!r}.")
    if with_projection and "text_projection.weight" not in out:
        raise KeyError("with_projection=True but the open_clip state dict has no text_projection.")
    return out


# Where text-tower weights live in the checkpoints we accept, tried in order: (prefix, layout).
_KNOWN_PREFIXES = (
    ("cond_stage_model.model.", "open_clip"),  # SD 2.x single file, ldm LatentDiffusion checkpoints
    ("cond_stage_model.transformer.text_model.", "hf"),  # SD 1.x single file
    ("model.", "open_clip"),  # ldm stage-0 CLIPModule checkpoints (Lightning)
    ("", "open_clip"),  # open_clip checkpoints (open_clip_pytorch_model.bin / .safetensors)
    ("text_model.", "hf"),  # transformers files, CLIPTextModelWithProjection, CLIPModel
    ("", "hf"),  # CLIPTextModel.state_dict() of transformers >= 5
)
_MARKERS = {"open_clip": "token_embedding.weight", "hf": "embeddings.token_embedding.weight"}


def extract_open_clip_text_state(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The open_clip text-tower tensors of any supported checkpoint, and a description of its layout.

    Image-tower keys are dropped. Raises ValueError when no text tower is recognised.
    """
    for prefix, layout in _KNOWN_PREFIXES:
        if prefix + _MARKERS[layout] not in state_dict:
            continue
        if layout == "hf":
            keep = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if prefix == "text_model." and "text_projection.weight" in state_dict:  # CLIPModel / WithProjection
                keep["text_projection.weight"] = state_dict["text_projection.weight"]
            if prefix == "":  # a bare text model holds nothing else
                keep = {k: v for k, v in keep.items() if not k.startswith("vision_model.")}
            return hf_text_to_open_clip(keep), f"transformers CLIP text layout (prefix {prefix!r})"
        keep = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and not k.startswith(prefix + "visual.")}
        return keep, f"open_clip layout (prefix {prefix!r})"
    raise ValueError(
        "No CLIP text tower found: expected open_clip keys (token_embedding.weight, optionally under "
        "'cond_stage_model.model.' or 'model.') or transformers keys (embeddings.token_embedding.weight, "
        "optionally under 'text_model.' or 'cond_stage_model.transformer.text_model.')."
    )
