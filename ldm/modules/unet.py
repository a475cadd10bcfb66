"""The Stable Diffusion U-Net (``openaimodel.py`` of CompVis / Stability) with the original names.

``UNetModel(**sd_config["model"]["params"]["unet_config"]["params"])`` builds the same modules and
parameter names as the original, so the ``model.diffusion_model.*`` weights of SD 1.x / 2.x
checkpoints load without renaming::

    time_embed.{0,2}                       timestep MLP (sinusoidal features -> 4 * model_channels)
    label_emb                              class embedding (num_classes), or an MLP of a vector y (num_classes="sequential")
    input_blocks.0.0                       conv_in
    input_blocks.{i}.0                     ResBlock: in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection
    input_blocks.{i}.1                     SpatialTransformer (or QKVAttentionBlock without a context)
    input_blocks.{i}.0.op                  Downsample (stride-2 conv)
    middle_block.{0,1,2}                   ResBlock, attention, ResBlock
    output_blocks.{i}.{0,1,2}              ResBlock (on the skip concatenation), attention, Upsample (.conv)
    out.{0,2}                              GroupNorm, SiLU, conv_out

Architecture: Ho et al. 2020 (DDPM U-Net), Dhariwal & Nichol 2021 (scale-shift norm, multi-resolution
attention), Rombach et al. 2022 (cross-attention conditioning, sec. 3.3).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import (QKVAttentionBlock, SpatialTransformer, autocast_dtype, maybe_checkpoint,
                                   normalization)

# The U-Net's own GroupNorms use torch's default eps (SD's GroupNorm32); the transformers use 1e-6.
UNET_NORM_EPS = 1e-5


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep features (Vaswani et al. 2017, sec. 3.5), cosines first as in SD.

    timesteps: [B] (int or float, may be fractional) -> [B, dim] float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]  # [B, half]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters (SD initialises residual-branch outputs at zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv (key ``conv``). [B, C, H, W] -> [B, C', 2H, 2W]."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a conv cannot change the channel count.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling (key ``op``). [B, C, H, W] -> [B, C', H/2, W/2]."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        elif self.out_channels == channels:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)
        else:
            raise ValueError("Downsample without a conv cannot change the channel count.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (Dhariwal & Nichol 2021, sec. 3).

    x: [B, C, H, W], emb: [B, E] -> [B, C_out, H', W'] (H' = 2H / H/2 with ``up`` / ``down``).
    ``use_scale_shift_norm`` applies ``norm(h) * (1 + scale) + shift`` (AdaGN) instead of adding emb.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels, eps=UNET_NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, eps=UNET_NORM_EPS),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self, self.use_checkpoint, self._forward, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # [B, C(*2), 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, self.out_layers[0](h), 1 + scale)
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _as_list(value: Union[int, Sequence[int]], n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} needs one entry per level of channel_mult ({n}), got {value}.")
    return value


class UNetModel(nn.Module):
    """The SD U-Net: eps / v / x0 prediction from a noisy latent, a timestep and a text context.

    The constructor takes the original ``unet_config.params`` names; extra channels for channel-concat
    conditioning (inpainting masks, depth, low-res images) are part of ``in_channels`` and are passed
    to ``forward`` as ``concat``.

    Notes on options kept only for config compatibility:
      - ``image_size`` is informational (the network is fully convolutional).
      - ``use_fp16`` is ignored: pick the precision with the Trainer (``precision="bf16-mixed"`` etc.).
      - ``dims`` must be 2.
    """

    def __init__(
        self,
        image_size: Optional[int],
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: Union[int, Sequence[int]],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[Union[int, str]] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: Optional[int] = None,
        legacy: bool = True,
        disable_self_attentions: Optional[Sequence[bool]] = None,
        num_attention_blocks: Optional[Sequence[int]] = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: Optional[int] = None,
    ):
        super().__init__()
        if dims != 2:
            raise ValueError(f"Only 2-D U-Nets are supported (dims=2), got dims={dims}.")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the text encoder width).")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is set but use_spatial_transformer=False: cross-attention needs "
                             "use_spatial_transformer=True.")
        if isinstance(context_dim, Sequence):  # SD allows a list (one per depth); all equal here
            context_dim = int(list(context_dim)[0])
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("Set num_heads or num_head_channels (SD 1.x: num_heads=8; SD 2.x: num_head_channels=64).")
        if num_classes is not None and not isinstance(num_classes, int) and num_classes != "sequential":
            raise ValueError(f"num_classes must be an int (class-embedding table size) or 'sequential' (a vector "
                             f"y of adm_in_channels features, SDXL style), got {num_classes!r}.")
        if num_classes == "sequential" and not adm_in_channels:
            raise ValueError("num_classes='sequential' embeds a vector y [B, adm_in_channels]: set adm_in_channels "
                             "(for pooled-text conditioning: the text encoder's embed_dim).")
        if use_fp16:
            warnings.warn("UNetModel ignores use_fp16: choose the precision with the Trainer "
                          "(precision='bf16-mixed' / '16-mixed') or cast the model.", stacklevel=2)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        levels = len(channel_mult)
        self.num_res_blocks = _as_list(num_res_blocks, levels, "num_res_blocks")
        if disable_self_attentions is not None:
            disable_self_attentions = [bool(d) for d in _as_list(disable_self_attentions, levels, "disable_self_attentions")]
        if num_attention_blocks is not None:
            num_attention_blocks = _as_list(num_attention_blocks, levels, "num_attention_blocks")
            if any(a > r for a, r in zip(num_attention_blocks, self.num_res_blocks)):
                raise ValueError(f"num_attention_blocks {num_attention_blocks} exceeds num_res_blocks {self.num_res_blocks}.")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.attention_resolutions = list(attention_resolutions)
        self.channel_mult = list(channel_mult)
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.use_checkpoint = use_checkpoint

        def attention(ch: int, level: Optional[int], index: Optional[int], decoder: bool = False) -> Optional[nn.Module]:
            """The attention layer after a ResBlock of width ``ch``; None where SD puts none (level None: middle)."""
            if num_attention_blocks is not None and level is not None and index >= num_attention_blocks[level]:
                return None
            # head rules of the original, kept exactly for checkpoint compatibility
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            dim_head = ch // heads if num_head_channels == -1 else num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            if not use_spatial_transformer:
                return QKVAttentionBlock(ch, num_heads=num_heads_upsample if decoder else heads,
                                         num_head_channels=dim_head, use_checkpoint=use_checkpoint,
                                         new_order=use_new_attention_order)
            if level is None:
                disable_sa = disable_middle_self_attn
            else:
                disable_sa = disable_self_attentions[level] if disable_self_attentions is not None else False
            return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim,
                                      disable_self_attn=disable_sa, use_linear=use_linear_in_transformer,
                                      use_checkpoint=use_checkpoint)

        def resblock(ch: int, out: int, **kw) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes == "sequential":  # SDXL's vector conditioning; keys label_emb.0.0 / label_emb.0.2
            self.adm_in_channels = adm_in_channels
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
            ))
        elif num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        # ---- encoder
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, level, nr))
                self.input_blocks.append(TimestepEmbedSequential(*[m for m in layers if m is not None]))
                input_block_chans.append(ch)
            if level != levels - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        # ---- bottleneck (attention here is never removed by num_attention_blocks)
        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch, None, None), resblock(ch, ch))

        # ---- decoder
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [resblock(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, level, i, decoder=True))
                if level and i == self.num_res_blocks[level]:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*[m for m in layers if m is not None]))

        self.out = nn.Sequential(
            normalization(ch, eps=UNET_NORM_EPS),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
        concat: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: [B, C, H, W], timesteps: [B] or scalar, context: [B, M, D], y: [B] class ids (or
        [B, adm_in_channels] features with num_classes='sequential', e.g. the pooled text embedding),
        concat: [B, Cc, H, W] extra input channels -> [B, out_channels, H, W]."""
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        self._check_inputs(x, context, y)
        if context is not None and (dtype := autocast_dtype(context.device.type)) is not None:
            context = context.to(dtype)  # once here, not in every cross-attention's to_k and to_v (per-call casts)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)  # [B, 4 * model_channels]
        if self.num_classes is not None:
            emb = emb + self.label_emb(y.to(emb.dtype) if y.is_floating_point() else y)

        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)

    def _check_inputs(self, x: torch.Tensor, context: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"U-Net expects [B, {self.in_channels}, H, W] input (latent channels + concat channels), got "
                f"{tuple(x.shape)}. Channel-concat conditioning is passed as concat=[B, Cc, H, W]."
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"Spatial size {tuple(x.shape[2:])} must be divisible by {factor} "
                             f"(2 ** (levels - 1) for channel_mult={self.channel_mult}).")
        if (context is None) != (self.context_dim is None):
            if context is None:
                raise ValueError(f"This U-Net has cross-attention (context_dim={self.context_dim}): pass context "
                                 f"[B, M, {self.context_dim}] (the text encoder's null_context for unconditional).")
            raise ValueError("This U-Net has no cross-attention (context_dim=None): pass context=None.")
        if context is not None and (context.ndim != 3 or context.shape[-1] != self.context_dim):
            raise ValueError(f"context must be [B, M, {self.context_dim}], got {tuple(context.shape)}.")
        if (y is None) != (self.num_classes is None):
            raise ValueError("Pass class labels y=[B] if and only if the U-Net was built with num_classes "
                             f"(num_classes={self.num_classes}).")
        if self.num_classes == "sequential" and (y.ndim != 2 or y.shape != (x.shape[0], self.adm_in_channels)):
            raise ValueError(f"y must be [B, adm_in_channels] = [{x.shape[0]}, {self.adm_in_channels}] "
                             f"(num_classes='sequential'), got {tuple(y.shape)}.")
