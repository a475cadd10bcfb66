"""U-Net weights: original SD layout (``UNetModel``) <-> diffusers ``UNet2DConditionModel``.

Both layouts hold the same tensors under different names, so conversion is a pure renaming (no
reshapes): a round trip returns bit-identical tensors. The name table is derived from the topology
(``unet_config.params`` of the SD config) by building ``UNetModel`` on the meta device and mapping
each of its keys, so every key is accounted for and an incomplete state dict is reported by name.

    from ldm.convert.unet import diffusers_unet_config, unet_diffusers_to_sd
    unet = UNet2DConditionModel(**diffusers_unet_config(params))
    ours = UNetModel(**params); ours.load_state_dict(unet_diffusers_to_sd(unet.state_dict(), params))
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ldm.modules.unet import UNetModel

# ResBlock sub-module names: SD -> diffusers ResnetBlock2D
_RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb": "class_embedding",
}


def _levels_params(params: Mapping[str, Any]) -> tuple[int, list[int], list[bool]]:
    mult = list(params.get("channel_mult", (1, 2, 4, 8)))
    nrb = params["num_res_blocks"]
    nrb = [nrb] * len(mult) if isinstance(nrb, int) else list(nrb)
    attn = [2**level in list(params["attention_resolutions"]) for level in range(len(mult))]
    return len(mult), nrb, attn


def _module_prefixes(params: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """SD module prefix -> (diffusers prefix, is_resnet)."""
    levels, nrb, attn = _levels_params(params)
    prefixes: dict[str, tuple[str, bool]] = {k: (v, False) for k, v in _TOP_LEVEL.items()}
    index = 1
    for level in range(levels):
        for j in range(nrb[level]):
            prefixes[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", True)
            prefixes[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", False)
            index += 1
        if level != levels - 1:
            prefixes[f"input_blocks.{index}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", False)
            index += 1
    prefixes["middle_block.0"] = ("mid_block.resnets.0", True)
    prefixes["middle_block.1"] = ("mid_block.attentions.0", False)
    prefixes["middle_block.2"] = ("mid_block.resnets.1", True)
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(nrb[level] + 1):
            prefixes[f"output_blocks.{index}.0"] = (f"up_blocks.{up}.resnets.{j}", True)
            prefixes[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{j}", False)
            if level and j == nrb[level]:
                slot = 2 if attn[level] else 1
                prefixes[f"output_blocks.{index}.{slot}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", False)
            index += 1
    return prefixes


def _rename(key: str, prefixes: Mapping[str, tuple[str, bool]]) -> str:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest matching module prefix first
        prefix = ".".join(parts[:cut])
        if prefix in prefixes:
            target, is_resnet = prefixes[prefix]
            rest = ".".join(parts[cut:])
            if is_resnet:
                for old, new in _RESNET_RENAMES.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
            return f"{target}.{rest}"
    raise KeyError(f"No diffusers name for U-Net key {key!r}.")


def unet_key_map(sd_unet_params: Mapping[str, Any]) -> dict[str, str]:
    """Every state-dict key of ``UNetModel(**sd_unet_params)`` -> its diffusers name."""
    diffusers_unet_config(sd_unet_params)  # refuses topologies diffusers cannot express
    with torch.device("meta"):
        keys = list(UNetModel(**sd_unet_params).state_dict())
    prefixes = _module_prefixes(sd_unet_params)
    return {key: _rename(key, prefixes) for key in keys}


def _convert(state_dict: Mapping[str, torch.Tensor], names: Mapping[str, str], source: str) -> dict[str, torch.Tensor]:
    missing = sorted(set(names) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(names))
    if missing or unexpected:
        raise KeyError(
            f"The {source} U-Net state dict does not match the topology given: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
            f"Check that the unet_config params describe this checkpoint."
        )
    return {names[key]: state_dict[key] for key in names}


def unet_sd_to_diffusers(state_dict: Mapping[str, torch.Tensor], sd_unet_params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Original SD U-Net keys (without ``model.diffusion_model.``) -> ``UNet2DConditionModel`` keys."""
    return _convert(state_dict, unet_key_map(sd_unet_params), "original-layout")


def unet_diffusers_to_sd(state_dict: Mapping[str, torch.Tensor], sd_unet_params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``UNet2DConditionModel`` keys -> original SD U-Net keys (load into ``UNetModel``)."""
    inverse = {v: k for k, v in unet_key_map(sd_unet_params).items()}
    return _convert(state_dict, inverse, "diffusers")


def diffusers_unet_config(sd_unet_params: Mapping[str, Any]) -> dict[str, Any]:
    """``UNet2DConditionModel(**cfg)`` keyword arguments for the topology of ``sd_unet_params``.

    Raises ValueError for options diffusers' ``UNet2DConditionModel`` cannot express.
    """
    p = dict(sd_unet_params)
    unsupported = {
        "use_spatial_transformer": not p.get("use_spatial_transformer", False),
        "resblock_updown": p.get("resblock_updown", False),
        "conv_resample=False": not p.get("conv_resample", True),
        "disable_middle_self_attn": p.get("disable_middle_self_attn", False),
        "use_new_attention_order": p.get("use_new_attention_order", False),
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"diffusers' UNet2DConditionModel has no equivalent for {bad}; keep this U-Net in the SD layout.")
    levels, nrb, attn = _levels_params(p)
    if p.get("num_attention_blocks") is not None and list(p["num_attention_blocks"]) != nrb:
        raise ValueError("num_attention_blocks (attention on only some ResBlocks) has no diffusers equivalent.")
    mc = p["model_channels"]
    widths = [mc * m for m in p.get("channel_mult", (1, 2, 4, 8))]
    if any(w % 32 for w in widths):
        raise ValueError(f"diffusers uses 32 GroupNorm groups: every level width must be a multiple of 32, got {widths}.")
    num_heads, nhc = p.get("num_heads", -1), p.get("num_head_channels", -1)
    heads = []
    for ch in widths:
        h = num_heads if nhc == -1 else ch // nhc
        d = ch // h if nhc == -1 else nhc
        if p.get("legacy", True):
            d = ch // h
        if h * d != ch:
            raise ValueError(f"heads x head_dim = {h} x {d} != width {ch}: diffusers requires them to match.")
        heads.append(h)
    context_dim = p["context_dim"]
    if not isinstance(context_dim, int):
        context_dim = int(list(context_dim)[0])
    dsa = p.get("disable_self_attentions")
    cfg = {
        "sample_size": p.get("image_size"),
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": widths,
        "layers_per_block": nrb,
        "transformer_layers_per_block": p.get("transformer_depth", 1),
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,  # diffusers' (historically misnamed) number of heads per level
        "use_linear_projection": p.get("use_linear_in_transformer", False),
        "only_cross_attention": [bool(d) for d in dsa] if dsa is not None else False,
        "mid_block_only_cross_attention": False,
        "num_class_embeds": p.get("num_classes"),
        "resnet_time_scale_shift": "scale_shift" if p.get("use_scale_shift_norm", False) else "default",
        "dropout": p.get("dropout", 0.0),
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
    }
    return cfg
