"""KL autoencoder state-dict conversion: original SD (CompVis) layout <-> diffusers ``AutoencoderKL``.

Original keys (this project's layout)           diffusers keys
  {enc,dec}.norm_out                              {enc,dec}.conv_norm_out
  encoder.down.{i}.block.{j}.nin_shortcut         encoder.down_blocks.{i}.resnets.{j}.conv_shortcut
  encoder.down.{i}.attn.{j}                       encoder.down_blocks.{i}.attentions.{j}
  encoder.down.{i}.downsample.conv                encoder.down_blocks.{i}.downsamplers.0.conv
  decoder.up.{n-1-i}.block.{j}                    decoder.up_blocks.{i}.resnets.{j}
  decoder.up.{n-1-i}.upsample.conv                decoder.up_blocks.{i}.upsamplers.0.conv
  {enc,dec}.mid.block_{k}                         {enc,dec}.mid_block.resnets.{k-1}
  {enc,dec}.mid.attn_1.{norm,q,k,v,proj_out}      {enc,dec}.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
  (attention projections: 1x1 conv [C, C, 1, 1])  (linear [C, C])

``quant_conv``, ``post_quant_conv``, ``conv_in``, ``conv_out`` and the resnet ``norm1/conv1/norm2/conv2``
keep their names. Old diffusers attention names (``query/key/value/proj_attn``) are accepted on import.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

_SD_PREFIXES = ("first_stage_model.", "vae.")
_DIFFUSERS_MARKERS = (".down_blocks.", ".up_blocks.", ".mid_block.")

# Leaf renames inside an attention block: original -> diffusers.
_ATTN_SD_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIFFUSERS_TO_SD = {v: k for k, v in _ATTN_SD_TO_DIFFUSERS.items()}
_ATTN_DIFFUSERS_TO_SD.update({"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"})


def is_diffusers_vae(state_dict: dict) -> bool:
    """True when the keys use diffusers' naming (``down_blocks``, ``up_blocks``, ``mid_block``)."""
    return any(marker in key for key in state_dict for marker in _DIFFUSERS_MARKERS)


def _num_levels(keys, pattern: str) -> int:
    levels = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    if not levels:
        raise ValueError(f"No decoder level keys matching {pattern!r}; is this a KL autoencoder state dict?")
    return max(levels) + 1


Rule = tuple[str, Callable[[re.Match], tuple[str, str]]]


def _apply(state_dict: dict[str, torch.Tensor], rules: list[Rule], to_diffusers: bool) -> dict[str, torch.Tensor]:
    """Rename each key by the first rule whose pattern matches its start; a rule gives the new prefix and
    the kind of block (``resnet``, ``attn`` or ``plain``) whose leaf names follow. Others keep their key."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for pattern, build in rules:
            match = re.match(pattern, key)
            if match is not None:
                prefix, kind = build(match)
                rest = key[match.end():]
                if kind == "resnet":
                    rest = _rename_shortcut(rest, to_diffusers)
                elif kind == "attn":
                    rest, value = _convert_attention(rest, value, to_diffusers)
                key = prefix + rest
                break
        out[key] = value  # unmatched: conv_in, conv_out, quant_conv, post_quant_conv, resnet leaves
    return out


def _rename_shortcut(rest: str, to_diffusers: bool) -> str:
    old, new = ("nin_shortcut.", "conv_shortcut.") if to_diffusers else ("conv_shortcut.", "nin_shortcut.")
    return new + rest[len(old):] if rest.startswith(old) else rest


def _convert_attention(rest: str, value: torch.Tensor, to_diffusers: bool) -> tuple[str, torch.Tensor]:
    """Rename an attention leaf (``q.weight`` <-> ``to_q.weight``) and reshape its projection weight:
    1x1 conv [C, C, 1, 1] <-> linear [C, C]."""
    module, _, param = rest.rpartition(".")
    table = _ATTN_SD_TO_DIFFUSERS if to_diffusers else _ATTN_DIFFUSERS_TO_SD
    if module not in table:
        raise KeyError(f"Unknown autoencoder attention parameter '{rest}'.")
    new_module = table[module]
    if param == "weight" and new_module not in ("norm", "group_norm"):
        c_out, c_in = value.shape[:2]
        value = value.reshape(c_out, c_in) if to_diffusers else value.reshape(c_out, c_in, 1, 1)
    return f"{new_module}.{param}", value


def sd_to_diffusers_vae(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original SD autoencoder keys (``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``;
    no ``first_stage_model.`` prefix) -> diffusers ``AutoencoderKL`` keys."""
    n = _num_levels(state_dict, r"decoder\.up\.(\d+)\.")

    def up(m: re.Match) -> str:  # SD stores decoder levels highest resolution first, diffusers lowest first
        return f"decoder.up_blocks.{n - 1 - int(m[1])}"

    rules: list[Rule] = [
        (r"(encoder|decoder)\.norm_out\.", lambda m: (f"{m[1]}.conv_norm_out.", "plain")),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.", lambda m: (f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.", "resnet")),
        (r"encoder\.down\.(\d+)\.attn\.(\d+)\.", lambda m: (f"encoder.down_blocks.{m[1]}.attentions.{m[2]}.", "attn")),
        (r"encoder\.down\.(\d+)\.downsample\.", lambda m: (f"encoder.down_blocks.{m[1]}.downsamplers.0.", "plain")),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: (f"{up(m)}.resnets.{m[2]}.", "resnet")),
        (r"decoder\.up\.(\d+)\.attn\.(\d+)\.", lambda m: (f"{up(m)}.attentions.{m[2]}.", "attn")),
        (r"decoder\.up\.(\d+)\.upsample\.", lambda m: (f"{up(m)}.upsamplers.0.", "plain")),
        (r"(encoder|decoder)\.mid\.block_(\d+)\.", lambda m: (f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", "resnet")),
        (r"(encoder|decoder)\.mid\.attn_1\.", lambda m: (f"{m[1]}.mid_block.attentions.0.", "attn")),
    ]
    return _apply(state_dict, rules, to_diffusers=True)


def diffusers_to_sd_vae(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> original SD autoencoder keys (without ``first_stage_model.``)."""
    n = _num_levels(state_dict, r"decoder\.up_blocks\.(\d+)\.")

    def up(m: re.Match) -> str:
        return f"decoder.up.{n - 1 - int(m[1])}"

    rules: list[Rule] = [
        (r"(encoder|decoder)\.conv_norm_out\.", lambda m: (f"{m[1]}.norm_out.", "plain")),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: (f"encoder.down.{m[1]}.block.{m[2]}.", "resnet")),
        (r"encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: (f"encoder.down.{m[1]}.attn.{m[2]}.", "attn")),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: (f"encoder.down.{m[1]}.downsample.", "plain")),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: (f"{up(m)}.block.{m[2]}.", "resnet")),
        (r"decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: (f"{up(m)}.attn.{m[2]}.", "attn")),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: (f"{up(m)}.upsample.", "plain")),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: (f"{m[1]}.mid.block_{int(m[2]) + 1}.", "resnet")),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.", lambda m: (f"{m[1]}.mid.attn_1.", "attn")),
    ]
    return _apply(state_dict, rules, to_diffusers=False)


def extract_vae_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder tensors, in the original layout, of an SD single-file / latent-diffusion checkpoint
    (``first_stage_model.*`` or ``vae.*``), a diffusers ``AutoencoderKL`` or a bare autoencoder state dict."""
    for prefix in _SD_PREFIXES:
        if any(key.startswith(prefix) for key in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    return diffusers_to_sd_vae(state_dict) if is_diffusers_vae(state_dict) else dict(state_dict)


def diffusers_vae_config(ddconfig: dict, embed_dim: int) -> dict:
    """``diffusers.AutoencoderKL(**cfg)`` keyword arguments for the topology of an SD ``ddconfig``.

    Raises ValueError for autoencoders diffusers' ``AutoencoderKL`` cannot express.
    """
    if not ddconfig.get("double_z", True) or embed_dim != ddconfig["z_channels"]:
        raise ValueError(f"diffusers' AutoencoderKL needs double_z=True and embed_dim == z_channels "
                         f"(got double_z={ddconfig.get('double_z', True)}, embed_dim={embed_dim}, "
                         f"z_channels={ddconfig['z_channels']}); keep this autoencoder in the SD layout.")
    mult = list(ddconfig["ch_mult"])
    attn_res = set(ddconfig.get("attn_resolutions") or [])
    level_attn = [ddconfig["resolution"] // 2**level in attn_res for level in range(len(mult))]
    return {
        "in_channels": ddconfig["in_channels"],
        "out_channels": ddconfig["out_ch"],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in level_attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(level_attn)],
        "block_out_channels": [ddconfig["ch"] * m for m in mult],
        "layers_per_block": ddconfig["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": ddconfig["z_channels"],
        "norm_num_groups": ddconfig.get("norm_num_groups", 32),
        "sample_size": ddconfig["resolution"],
    }
