"""Cross-attention maps: where in the image each text token is read.

Every cross-attention layer of the U-Net computes, per head, the weights ``softmax(q k^T / sqrt(d))``
(Vaswani et al. 2017, eq. 1) between the pixels of its feature map (queries) and the text tokens (keys). Averaged
over heads, layers (each upsampled to the latent's size) and denoising steps, the weights of one token form a heat
map of the pixels that read it: the picture prompt-to-prompt (Hertz et al. 2022) edits with and DAAM (Tang et al.
2022) aggregates.

    with CrossAttentionRecorder(model.unet) as recorder:
        model.unet(z_t, t, **cond)           # as many calls as wanted
    maps = recorder.token_maps()            # [B, M, h, w], sums to 1 over the M tokens at every pixel

The recorder only reads: the U-Net's outputs are unchanged, and its hooks are removed on exit.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import CrossAttention


def attention_probs(module: CrossAttention, x: torch.Tensor, context: torch.Tensor,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weights ``module`` applies: x [B, N, C], context [B, M, D], mask [B, M] (True = attend) ->
    [B, heads, N, M] (fp32, rows sum to 1)."""
    q = module.split_heads(module.to_q(x).float())  # [B, H, N, d]
    k = module.split_heads(module.to_k(context).float())  # [B, H, M, d]
    scores = q @ k.transpose(-1, -2) / math.sqrt(module.dim_head)  # [B, H, N, M]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].to(torch.bool), float("-inf"))
    return torch.softmax(scores, dim=-1)


class CrossAttentionRecorder:
    """Records the head-averaged weights of every attention in ``unet`` that attends to a ``context``."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.layers = [m for m in unet.modules() if isinstance(m, CrossAttention)]
        self.records: list[torch.Tensor] = []  # one [B, N, M] per call of a layer given a context
        self.latent_size: Optional[tuple[int, int]] = None
        self._handles: list = []

    def __enter__(self) -> "CrossAttentionRecorder":
        self._handles.append(self.unet.register_forward_pre_hook(self._remember_latent_size, with_kwargs=True))
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._record, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _remember_latent_size(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        size = tuple((args[0] if args else kwargs["x"]).shape[-2:])  # x: [B, C, h, w]
        if self.latent_size not in (None, size):
            raise ValueError(f"the recorder saw latents of {self.latent_size} and then {size}; "
                             "record one latent size at a time (a new recorder per size)")
        self.latent_size = size

    def _record(self, module: CrossAttention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        if context is None:  # self-attention: keys are pixels, not text
            return
        x = args[0] if args else kwargs["x"]
        mask = kwargs.get("mask", args[2] if len(args) > 2 else None)
        with torch.no_grad():
            self.records.append(attention_probs(module, x, context, mask).mean(dim=1))  # [B, N, M]

    def token_maps(self) -> torch.Tensor:
        """The records averaged into one map per token: [B, M, h, w] at the latent's size, summing to 1 over M."""
        if not self.records or self.latent_size is None:
            raise RuntimeError("nothing recorded: call the U-Net with a text context inside the recorder's `with`")
        h, w = self.latent_size
        maps = []
        for probs in self.records:  # [B, N, M], N = (h / f) * (w / f) for the layer's downsampling factor f
            factor = math.sqrt(h * w / probs.shape[1])
            fh, fw = round(h / factor), round(w / factor)
            if fh * fw != probs.shape[1]:
                raise ValueError(f"a layer's {probs.shape[1]} queries are not a downsampled {h}x{w} latent")
            grid = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], fh, fw)  # [B, M, h/f, w/f]
            maps.append(F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False))
        return torch.stack(maps).mean(dim=0)
