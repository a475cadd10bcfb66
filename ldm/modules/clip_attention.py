"""open_clip's attention with the attention product in fp32 under CPU autocast.

open_clip's transformer blocks attend through ``nn.MultiheadAttention``, which under ``torch.autocast("cpu",
bfloat16)`` runs the attention product on the CPU's bf16 flash-attention kernels; their backward is far slower than
the fp32 one (10.6 ms against 0.8 ms per call in the quickstart CLIP's text tower, torch 2.14), so a CLIP trained in
bf16-mixed on a CPU stepped slower than in fp32. :class:`FP32ProductMultiheadAttention` keeps everything else of
``nn.MultiheadAttention`` (parameters, names, state dict, the input and output projections in bf16) and takes the
product ``softmax(q k^T / sqrt(d) + mask) v`` (Vaswani et al. 2017, eq. 1) in fp32 through
:func:`ldm.modules.attention.attention`, as the U-Net does. Outside CPU autocast, and for the options open_clip does
not use (attention weights returned, key padding masks, dropout in training, separate key/value projections), it
is ``nn.MultiheadAttention`` unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import _cpu_autocast, attention


class FP32ProductMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose self-attention product is taken in fp32 under CPU autocast.

    query = key = value: [L, B, D] (``batch_first=False``) or [B, L, D] -> (same shape, None).
    ``attn_mask``: [L, L] or [B * heads, L, L], bool (True = may not attend, torch's convention) or float (added).
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if not self._fp32_product_applies(query, key, value, key_padding_mask, need_weights, is_causal):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        # project in the input's own layout (a contiguous tensor: no strided batch for matmul to expand)
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # [L, B, 3D] or [B, L, 3D]
        qkv = qkv.unflatten(-1, (3, self.num_heads, self.head_dim))  # [L, B, 3, H, Dh] or [B, L, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4) if self.batch_first else qkv.permute(2, 1, 3, 0, 4)  # [B, H, L, Dh]
        out = attention(q, k, v, attn_mask=self._sdpa_mask(attn_mask, q.shape[0]))  # [B, H, L, Dh]
        out = out.permute(0, 2, 1, 3) if self.batch_first else out.permute(2, 0, 1, 3)  # [B, L, H, Dh] or [L, B, H, Dh]
        return self.out_proj(out.flatten(2)), None

    def _fp32_product_applies(self, query, key, value, key_padding_mask, need_weights, is_causal) -> bool:
        return (
            _cpu_autocast(query)
            and query is key is value
            and query.dim() == 3
            and self._qkv_same_embed_dim
            and self.in_proj_weight is not None
            and self.bias_k is None
            and not self.add_zero_attn
            and key_padding_mask is None
            and not need_weights
            and not is_causal
            and (self.dropout == 0.0 or not self.training)
        )

    def _sdpa_mask(self, attn_mask: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
        """torch's MHA mask -> SDPA's: bool inverted (SDPA's True = may attend), float in fp32 (the product's
        dtype), a per-head [B * H, L, S] mask as [B, H, L, S]."""
        if attn_mask is None:
            return None
        mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.float()
        if mask.dim() == 3:
            mask = mask.view(batch, self.num_heads, *mask.shape[-2:])
        return mask


def take_attention_products_in_fp32(model: nn.Module, enabled: bool = True) -> int:
    """Turn every ``nn.MultiheadAttention`` in ``model`` into :class:`FP32ProductMultiheadAttention` (``enabled=False``:
    back to ``nn.MultiheadAttention``), in place: the class changes; the parameters, their names and the outputs
    outside CPU autocast do not. Returns the number of modules turned."""
    source, target = ((nn.MultiheadAttention, FP32ProductMultiheadAttention) if enabled
                      else (FP32ProductMultiheadAttention, nn.MultiheadAttention))
    turned = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            turned += 1
    return turned
