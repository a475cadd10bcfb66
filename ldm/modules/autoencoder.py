"""Convolutional encoder / decoder of the KL autoencoder (Rombach et al. 2022, sec. 3.1 and appendix G).

Constructors take the original Stable Diffusion ``ddconfig`` keys (``double_z, z_channels, resolution,
in_channels, out_ch, ch, ch_mult, num_res_blocks, attn_resolutions, dropout`` plus ``attn_type``,
``resamp_with_conv``, ``give_pre_end``, ``tanh_out``, ``use_linear_attn``) and build modules with the
CompVis parameter names, so ``first_stage_model.*`` weights of SD checkpoints load without renaming:

- ``conv_in``, ``down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``, ``down.{i}.attn.{j}``,
  ``down.{i}.downsample.conv``, ``mid.{block_1,attn_1,block_2}``, ``norm_out``, ``conv_out``
- decoder: ``up.{i}.block.{j}``, ``up.{i}.attn.{j}``, ``up.{i}.upsample.conv`` where ``up.0`` is the
  *highest* resolution (stored in the original reversed order).

The math is CompVis': GroupNorm(32, eps=1e-6), swish, zero pad (0, 1, 0, 1) before the stride-2 conv,
nearest-neighbour upsampling followed by a 3x3 conv.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.attention import AttnBlock, normalization

_ATTN_TYPES = ("vanilla", "vanilla-xformers", "linear", "none")


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm -> swish -> conv3x3) x 2, 1x1 shortcut on width change.

    x: [B, C_in, H, W] -> [B, C_out, H, W]. The autoencoder has no timestep embedding (CompVis' ``temb=None``).
    """

    def __init__(
        self, *, in_channels: int, out_channels: int | None = None, dropout: float = 0.0, num_groups: int = 32
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = normalization(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalization(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Halve H and W: asymmetric zero pad (0, 1, 0, 1) + 3x3 stride-2 conv, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H/2, W/2]
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then (optionally) a 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, 2H, 2W]
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class LinAttnBlock(nn.Module):
    """CompVis' linear attention (``attn_type="linear"``): softmax over keys, no norm, no residual.

    Keys ``to_qkv`` (no bias) and ``to_out`` as in the original. x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.to_qkv = nn.Conv2d(in_channels, in_channels * 3, 1, bias=False)
        self.to_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.to_qkv(x), "b (qkv c) h w -> qkv b c (h w)", qkv=3)
        k = k.softmax(dim=-1)
        context = torch.einsum("bdn,ben->bde", k, v)  # [B, C, C]
        out = torch.einsum("bde,bdn->ben", context, q)  # [B, C, H*W]
        return self.to_out(rearrange(out, "b c (h w) -> b c h w", h=h, w=w))


def make_attn(in_channels: int, attn_type: str = "vanilla", num_groups: int = 32) -> nn.Module:
    """Attention block by CompVis' ``attn_type`` name (``vanilla-xformers`` is the same math as vanilla)."""
    if attn_type in ("vanilla", "vanilla-xformers"):
        block = AttnBlock(in_channels)
        block.norm = normalization(in_channels, num_groups)  # same key (norm.*), configurable groups
        return block
    if attn_type == "linear":
        return LinAttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type={attn_type!r} is not supported; use one of {_ATTN_TYPES}.")


def _resolve_attn_type(attn_type: str, use_linear_attn: bool) -> str:
    attn_type = "linear" if use_linear_attn else attn_type
    if attn_type not in _ATTN_TYPES:
        raise ValueError(f"attn_type={attn_type!r} is not supported; use one of {_ATTN_TYPES}.")
    return attn_type


class _Level(nn.Module):
    """One resolution level; a plain container so keys read ``down.{i}.block.{j}`` as in CompVis."""

    def __init__(self, block: nn.ModuleList, attn: nn.ModuleList):
        super().__init__()
        self.block = block
        self.attn = attn


class _Mid(nn.Module):
    """Middle of the network at the lowest resolution: ResNet -> attention -> ResNet."""

    def __init__(self, channels: int, dropout: float, attn_type: str, num_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(in_channels=channels, dropout=dropout, num_groups=num_groups)
        self.attn_1 = make_attn(channels, attn_type, num_groups)
        self.block_2 = ResnetBlock(in_channels=channels, dropout=dropout, num_groups=num_groups)


class _Checkpointed(nn.Module):
    """Mixin-like base: run a submodule under activation checkpointing while training."""

    use_checkpoint: bool = False

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)


class Encoder(_Checkpointed):
    """Image -> latent moments. x: [B, in_channels, H, W] -> [B, (2 if double_z else 1) * z_channels, H/f, W/f]
    with f = 2 ** (len(ch_mult) - 1).

    ``use_checkpoint`` trades compute for memory (activation checkpointing per block) while training.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        norm_num_groups: int = 32,
        use_checkpoint: bool = False,
        **ignored,  # CompVis' Encoder also accepts (and ignores) the decoder-only keys of a shared ddconfig
    ):
        super().__init__()
        _check_unknown_keys(ignored, "Encoder")
        attn_type = _resolve_attn_type(attn_type, use_linear_attn)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.use_checkpoint = use_checkpoint

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(
                    in_channels=block_in, out_channels=block_out, dropout=dropout, num_groups=norm_num_groups
                ))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type, norm_num_groups))
            level = _Level(block, attn)
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(level)

        self.mid = _Mid(block_in, dropout, attn_type, norm_num_groups)
        self.norm_out = normalization(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, ch, H, W]
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = self._run(block, h)
                if len(level.attn) > 0:
                    h = self._run(level.attn[i_block], h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self._run(self.mid.block_1, h)
        h = self._run(self.mid.attn_1, h)
        h = self._run(self.mid.block_2, h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 2*z_channels, H/f, W/f]


class Decoder(_Checkpointed):
    """Latent -> image. z: [B, z_channels, h, w] -> [B, out_ch, h*f, w*f] with f = 2 ** (len(ch_mult) - 1).

    ``give_pre_end`` returns the features before ``norm_out``; ``tanh_out`` squashes the output to (-1, 1).
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        norm_num_groups: int = 32,
        use_checkpoint: bool = False,
        **ignored,  # e.g. ``double_z``, which only the encoder reads
    ):
        super().__init__()
        _check_unknown_keys(ignored, "Decoder")
        attn_type = _resolve_attn_type(attn_type, use_linear_attn)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        self.use_checkpoint = use_checkpoint

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, attn_type, norm_num_groups)

        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(
                    in_channels=block_in, out_channels=block_out, dropout=dropout, num_groups=norm_num_groups
                ))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type, norm_num_groups))
            level = _Level(block, attn)
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            levels.insert(0, level)  # up.0 is the highest resolution, as in CompVis
        self.up = nn.ModuleList(levels)

        self.norm_out = normalization(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # [B, ch * ch_mult[-1], h, w]
        h = self._run(self.mid.block_1, h)
        h = self._run(self.mid.attn_1, h)
        h = self._run(self.mid.block_2, h)
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = self._run(block, h)
                if len(level.attn) > 0:
                    h = self._run(level.attn[i_block], h)
            if i_level != 0:
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))  # [B, out_ch, H, W]
        return torch.tanh(h) if self.tanh_out else h


# Keys of a shared SD ddconfig that one side reads and the other ignores.
_SHARED_DDCONFIG_KEYS = {"double_z", "give_pre_end", "tanh_out"}


def _check_unknown_keys(ignored: dict, where: str) -> None:
    unknown = set(ignored) - _SHARED_DDCONFIG_KEYS
    if unknown:
        raise TypeError(
            f"{where} got unknown ddconfig keys {sorted(unknown)}; expected the Stable Diffusion names "
            "(double_z, z_channels, resolution, in_channels, out_ch, ch, ch_mult, num_res_blocks, "
            "attn_resolutions, dropout, attn_type, resamp_with_conv, give_pre_end, tanh_out, "
            "use_linear_attn) or use_checkpoint."
        )


class DiagonalGaussianDistribution:
    """Diagonal Gaussian posterior q(z|x) from encoder moments ``[B, 2C, h, w]`` = (mean, log-variance).

    The log-variance is clamped to [-30, 20] as in CompVis. ``deterministic`` makes it a point mass.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # [B, C, h, w] each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std * eps`` (Kingma & Welling 2014, eq. 10 sampling)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(q || p) summed over C, h, w -> [B]; p = N(0, I) by default (Kingma & Welling 2014, eq. 10):
        ``0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over C, h, w -> [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        log_two_pi = torch.log(torch.tensor(2.0 * torch.pi, dtype=self.mean.dtype, device=self.mean.device))
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=[1, 2, 3])
