"""Inpainting by latent blending for any model (RePaint-lite, diffusers' legacy inpaint pipeline).

Masks are [B, 1, H, W] in {0, 1} with **1 = repaint**, 0 = keep. The known region is imposed through the
denoiser (``MaskBlendDenoiser``), the samplers stay unchanged pure functions, and after decoding the original
pixels are pasted back outside the (optionally dilated) mask (``paste_known_pixels``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_mask(mask: Tensor, images: Tensor) -> Tensor:
    """Validate a pixel mask against init images [B, 3, H, W]; returns it as float [B, 1, H, W] (batch-1 masks
    are broadcast)."""
    batch, _, height, width = images.shape
    if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[1] != 1:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a [B, 1, H, W] tensor (1 = repaint, 0 = keep), got {shape}; "
                         f"add the missing dimensions, e.g. mask[None, None] for an [H, W] mask.")
    if mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != (height, width):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the init images are {tuple(images.shape)}: "
                         f"expected [{batch} or 1, 1, {height}, {width}]; resize the mask to the image size.")
    if not torch.isin(mask, mask.new_tensor([0, 1])).all():
        raise ValueError("mask values must be 0 (keep) or 1 (repaint); threshold a soft mask first, "
                         "e.g. mask = (mask > 0.5).float().")
    return mask.float().expand(batch, -1, -1, -1)


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """Pixel mask [B, 1, H, W] -> latent mask [B, 1, H/f, W/f]: a latent is repainted if any of its f x f pixels
    is (max-pooling), so every kept latent lies wholly inside the kept pixels."""
    return F.max_pool2d(mask, kernel_size=factor) if factor > 1 else mask


def dilate(mask: Tensor, pixels: int) -> Tensor:
    """Grow the repaint region [B, 1, H, W] by ``pixels`` in every direction (square structuring element)."""
    if pixels < 0:
        raise ValueError(f"Mask dilation must be >= 0 pixels, got {pixels}.")
    if pixels == 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * pixels + 1, stride=1, padding=pixels)


class MaskBlendDenoiser(nn.Module):
    """``D'(x, sigma) = m * D(x, sigma) + (1 - m) * z_known``: the x0-prediction is the known latents outside the
    repaint mask m (latent size, 1 = repaint).

    Why a denoiser wrapper rather than a sampler callback: every sampler touches the data only through D, so
    this works for all of them (multistep DPM-Solver++ history and Heun's second evaluation included) without
    changing a sampler. For a point mass at z_known every sampler step is exact: started from
    ``x = z_known + sigma_0 * n`` the known region stays ``z_known + sigma * n`` along the whole trajectory
    (ancestral samplers refresh n with the right variance), i.e. it *is* the init latents noised to the
    current sigma that diffusers' legacy pipeline writes back after each step, and it reaches z_known at
    sigma = 0. The U-Net therefore always sees the known region at the correct noise level. The final
    latents' known region is still set to z_known exactly by the caller, removing float round-off.
    """

    def __init__(self, denoiser: Callable[..., Tensor], known: Tensor, mask: Tensor):
        super().__init__()
        if mask.shape[0] != known.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != known.shape[2:]:
            raise ValueError(f"Latent mask {tuple(mask.shape)} does not fit the known latents {tuple(known.shape)}.")
        self.denoiser = denoiser
        self.known = known  # [B, C, h, w]
        self.repaint = mask.bool()  # [B, 1, h, w]

    def forward(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        return torch.where(self.repaint, self.denoiser(x, sigma, **kwargs), self.known.to(x.dtype))


def paste_known_pixels(generated: Tensor, init: Tensor, mask: Tensor, dilation: int = 0) -> Tensor:
    """Post-processing paste: the original pixels outside the repaint mask dilated by ``dilation`` pixels, the
    generated ones inside. generated, init: [B, 3, H, W]; mask: [B, 1, H, W] in {0, 1}. Exact (a select)."""
    return torch.where(dilate(mask, dilation).bool(), generated, init)
