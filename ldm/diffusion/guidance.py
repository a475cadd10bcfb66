"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

``D_cfg = D_u + scale * (D_c - D_u)`` on x0 predictions. D is affine in the network output with the same x for
both branches, so this equals guiding eps (or v) with the same scale. A negative prompt is simply another
``uncond`` context. Optional guidance rescale (Lin et al. 2023, sec. 3.4) counters over-exposure at high scales.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn


def _batched(value: Any, batch: int, name: str) -> Any:
    """A conditioning tensor with batch ``batch`` (batch-1 tensors broadcast); non-tensors pass through."""
    if not isinstance(value, Tensor):
        return value
    if value.ndim == 0 or value.shape[0] not in (1, batch):
        raise ValueError(f"Conditioning {name!r} has shape {tuple(value.shape)}; expected batch 1 or {batch}.")
    return value.expand(batch, *value.shape[1:])


class CFGDenoiser(nn.Module):
    """Wrap ``denoiser(x, sigma, **kwargs) -> x0_hat`` with classifier-free guidance.

    Called as ``cfg(x, sigma, cond={...}, uncond={...}, **shared)``: ``cond`` / ``uncond`` hold the kwargs that
    differ between the branches (same keys, e.g. ``context`` [B, 77, D]); ``shared`` kwargs (e.g. ``concat``
    [B, C', H, W] for inpainting / depth conditioning) are given to both branches identically. Both branches run in
    one batched call ordered [uncond, cond]; ``scale == 1`` runs only the conditional branch.
    """

    def __init__(self, denoiser: Callable[..., Tensor], scale: float, rescale: float = 0.0):
        super().__init__()
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale (phi in Lin et al. 2023) must be in [0, 1], got {rescale}.")
        self.denoiser = denoiser
        self.scale = scale
        self.rescale = rescale

    def forward(
        self,
        x: Tensor,
        sigma: Tensor,
        *,
        cond: Mapping[str, Any],
        uncond: Optional[Mapping[str, Any]] = None,
        **shared: Any,
    ) -> Tensor:
        overlap = set(shared) & set(cond)
        if overlap:
            raise ValueError(f"Keys {sorted(overlap)} are both branch-specific (cond) and shared; pass them once.")
        batch = x.shape[0]
        if self.scale == 1.0:
            single = {key: _batched(value, batch, key) for key, value in {**cond, **shared}.items()}
            return self.denoiser(x, sigma, **single)
        if uncond is None:
            raise ValueError(f"Guidance scale {self.scale} needs an `uncond` context (e.g. the empty-prompt one).")
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} vs {sorted(uncond)}.")

        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(batch)  # [B]
        kwargs = {}
        for key in cond:
            c, u = _batched(cond[key], batch, key), _batched(uncond[key], batch, key)
            if isinstance(c, Tensor) != isinstance(u, Tensor):
                raise ValueError(f"Conditioning {key!r} must be a tensor in both cond and uncond or in neither.")
            if isinstance(c, Tensor):
                kwargs[key] = torch.cat([u, c])  # [2B, ...]
            elif c is u or c == u:
                kwargs[key] = c
            else:
                raise ValueError(f"Non-tensor conditioning {key!r} differs between cond and uncond; pass a tensor.")
        for key, value in shared.items():
            value = _batched(value, batch, key)
            kwargs[key] = torch.cat([value, value]) if isinstance(value, Tensor) else value

        x_uncond, x_cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **kwargs).chunk(2)
        guided = x_uncond + self.scale * (x_cond - x_uncond)
        if self.rescale > 0:
            dims = tuple(range(1, x.ndim))
            factor = x_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)  # [B, 1, ...]
            guided = guided * (self.rescale * factor + (1 - self.rescale))
        return guided
