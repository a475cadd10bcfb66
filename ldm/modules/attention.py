"""Attention blocks shared by the U-Net and the autoencoder.

Every attention here runs on ``torch.nn.functional.scaled_dot_product_attention`` (fused
flash / memory-efficient kernels where the device has them). Parameter names follow the
original Stable Diffusion code (``ldm/modules/attention.py`` of CompVis / Stability), so
official checkpoints load without renaming:

- ``CrossAttention``: ``to_q``, ``to_k``, ``to_v`` (no bias), ``to_out.0``
- ``FeedForward`` (GEGLU): ``net.0.proj``, ``net.2``
- ``BasicTransformerBlock``: ``attn1`` (self), ``attn2`` (cross), ``ff``, ``norm1..3``
- ``SpatialTransformer``: ``norm``, ``proj_in``, ``transformer_blocks.N``, ``proj_out``
- ``AttnBlock`` (autoencoder mid block): ``norm``, ``q``, ``k``, ``v``, ``proj_out`` (1x1 convs)
- ``QKVAttentionBlock`` (U-Net without cross-attention): ``norm``, ``qkv``, ``proj_out`` (Conv1d)

Attention is Vaswani et al. 2017, eq. 1: ``softmax(Q K^T / sqrt(d)) V``.

bf16-mixed on a CPU: the matrix products (Linear, conv) run in bf16 (AMX makes them several times faster than
fp32), but the CPU's bf16 flash-attention kernels are much slower than their fp32 form (the backward about 8x,
torch 2.14). Under CPU autocast the attention product therefore computes in fp32 (``_cpu_autocast``); on GPUs, and
without autocast, nothing changes. GEGLU's GELU stays in bf16: its bf16 kernels run as fast as fp32 on ordinary
values, and the fp32 round trip (casting both halves up and the product back down) cost a U-Net step 6-7 %.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def normalization(channels: int, num_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """SD's GroupNorm: 32 groups (fewer for tiny widths); eps 1e-6 in the autoencoder and the
    transformers, 1e-5 (torch's default, SD's ``GroupNorm32``) in the U-Net's ResBlocks."""
    groups = min(num_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast(device_type)`` computes in where it is active, else None (also for devices
    autocast does not know, e.g. "meta")."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions (CPU and CUDA)
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" and torch.is_autocast_enabled() else None
    except RuntimeError:  # "unknown device type for autocast"
        return None


def _cpu_autocast(t: torch.Tensor) -> bool:
    """True inside ``torch.autocast("cpu")`` for a CPU tensor: where bf16 attention kernels are slow."""
    return t.device.type == "cpu" and autocast_dtype("cpu") is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` by ``F.scaled_dot_product_attention`` (Vaswani et al. 2017, eq. 1).

    q: [B, H, N, D], k, v: [B, H, M, D] -> [B, H, N, D] in q's dtype. Under CPU autocast the product is
    taken in fp32 (the CPU's bf16 flash-attention kernels are the slow ones; fp32 is also the more exact).
    """
    if _cpu_autocast(q):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def maybe_checkpoint(module: nn.Module, enabled: bool, fn, *args):
    """``fn(*args)``, recomputed in the backward pass instead of stored (non-reentrant
    ``torch.utils.checkpoint``) when ``enabled`` and ``module`` trains with gradients on."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None.

    x: [B, N, query_dim], context: [B, M, context_dim] -> [B, N, query_dim]
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, H*D] -> [B, H, N, D] as a view; SDPA takes the strided layout directly."""
        return t.view(t.shape[0], t.shape[1], self.heads, self.dim_head).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.split_heads(self.to_q(x))  # [B, H, N, D]
        k, v = self.split_heads(self.to_k(context)), self.split_heads(self.to_v(context))  # [B, H, M, D]
        attn_mask = None
        if mask is not None:  # mask: [B, M] True = attend
            attn_mask = mask[:, None, None, :].to(torch.bool)
        out = attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, D]
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): ``a * gelu(b)`` with ``[a, b] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # [..., dim_out] each
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP; GEGLU by default (as SD), plain GELU otherwise."""

    def __init__(self, dim: int, mult: int = 4, glu: bool = True, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention -> cross-attention -> GEGLU feed-forward, each residual.

    With ``disable_self_attn`` the first attention also attends to the context (SD 2.x option).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        gated_ff: bool = True,
        checkpoint: bool = False,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout
        )
        self.ff = FeedForward(dim, glu=gated_ff, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return maybe_checkpoint(self, self.checkpoint, self._forward, x, context)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (Rombach et al. 2022, sec. 3.3).

    x: [B, C, H, W], context: [B, M, context_dim] -> [B, C, H, W].
    ``use_linear`` selects Linear (SD 2.x) instead of 1x1-conv (SD 1.x) projections.
    ``context`` may also be a list with one entry per block (depth).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = normalization(in_channels)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dim,
                checkpoint=use_checkpoint,
                disable_self_attn=disable_self_attn,
            )
            for _ in range(depth)
        )
        # SD initialises the output projection at zero: the block starts as identity.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        if not isinstance(context, (list, tuple)):
            context = [context] * len(self.transformer_blocks)
        b, c, h, w = x.shape
        # [B, C, H, W] -> [B, H*W, C]: free for channels_last input, one copy otherwise. The 1x1-conv
        # projections of SD 1.x are applied as matrix products on the tokens (same numbers, no
        # layout round trip through the convolution).
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        tokens = _pointwise(self.proj_in, tokens)
        for block, ctx in zip(self.transformer_blocks, context):
            tokens = block(tokens, context=ctx)
        tokens = _pointwise(self.proj_out, tokens)  # [B, H*W, C]
        # back to [B, C, H, W] as a channels_last-strided view; the residual add writes its result in
        # the layout of ``x`` (the first operand), so no extra copy is made in either memory format
        return x + tokens.view(b, h, w, c).permute(0, 3, 1, 2)


def _pointwise(layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a Linear or a 1x1 Conv2d to tokens [B, N, C_in] -> [B, N, C_out]."""
    if isinstance(layer, nn.Conv2d):
        return F.linear(tokens, layer.weight.flatten(1), layer.bias)
    return layer(tokens)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (the autoencoder mid block).

    x: [B, C, H, W] -> [B, C, H, W], residual.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = normalization(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        # [B, C, H, W] -> [B, 1, H*W, C] (views)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (q, k, v))
        out = attention(q, k, v)  # [B, 1, H*W, C]
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class QKVAttentionBlock(nn.Module):
    """Multi-head spatial self-attention of the original U-Net (``openaimodel.AttentionBlock``).

    Used by ``UNetModel`` when ``use_spatial_transformer=False`` (unconditional / class-conditional
    LDMs). Keys: ``norm``, ``qkv`` (Conv1d C -> 3C), ``proj_out`` (Conv1d, zero-initialised).
    ``new_order`` selects the [3, heads, ch] split of ``qkv`` (``QKVAttention``) instead of the
    legacy [heads, 3, ch] split (``QKVAttentionLegacy``). x: [B, C, H, W] -> [B, C, H, W], residual.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        new_order: bool = False,
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        elif channels % num_head_channels:
            raise ValueError(f"channels={channels} is not divisible by num_head_channels={num_head_channels}.")
        else:
            self.num_heads = channels // num_head_channels
        self.new_order = new_order
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels, eps=1e-5)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self, self.use_checkpoint, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_flat = x.reshape(b, c, h * w)  # [B, C, T]
        qkv = self.qkv(self.norm(x_flat))  # [B, 3C, T]
        heads, ch = self.num_heads, c // self.num_heads
        if self.new_order:
            q, k, v = qkv.view(b, 3, heads, ch, h * w).unbind(1)  # each [B, heads, ch, T]
        else:
            q, k, v = qkv.view(b, heads, 3 * ch, h * w).split(ch, dim=2)
        out = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h * w)  # [B, heads, T, ch] -> [B, C, T]
        return (x_flat + self.proj_out(out)).view(b, c, h, w)
