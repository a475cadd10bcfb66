"""Super-resolution with a diffusion upscaler (``ldm/models/upscaler.py``): degradation, conditioning, inference.

    high-res x [B, 3, H, W] --area_downsample(s)--> low [B, 3, H/s, W/s]                 (training pairs)
    low --noise_augment(level)--> low_aug --bicubic x s--> concat [B, 3, H, W]          (SD x4 upscaler's
    U-Net(r_t ‖ concat, t, y = embed(level)) --> eps / v of the residual r = x - bicubic(low)  low_scale_model)
    sampler(DiscreteDenoiser) --> r --> bicubic(low) + r --> upscaled image

The U-Net works in pixel space at the target resolution (no autoencoder). Noise augmentation (Ho et al. 2022,
"Cascaded Diffusion Models", sec. 4.1; SD 2's ``ImageConcatWithNoiseAugmentation``) noises the low-res input to
a level in [0, max_noise_level] of its own schedule and tells the U-Net the level, so the upscaler learns not to
trust low-res artefacts (e.g. of a text-to-image first stage); at inference the level is a user knob. Diffusing
the residual over bicubic instead of the image is SRDiff's choice (Li et al. 2022, sec. 3.2): the network starts
at "bicubic" and only has to add the missing detail.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.samplers import get_sampler, get_sigmas
from ldm.diffusion.schedule import NoiseSchedule
from ldm.modules.unet import timestep_embedding

# SD 2's x4 upscaler noises its low-res input on CompVis' "linear" (= our scaled_linear) 1e-4 .. 0.02 schedule.
NOISE_AUG_SCHEDULE = {"kind": "scaled_linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}


def check_scale(scale) -> int:
    """The upscaling factor as an int >= 2 (area downsampling needs an integer factor)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
        raise ValueError(f"scale must be an integer >= 2 (e.g. 2 or 4), got {scale!r}.")
    return scale


def check_images(images: Tensor, name: str = "images") -> None:
    """[B, 3, H, W] in [-1, 1], or a clear error."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be [B, 3, H, W] RGB, got shape {tuple(images.shape)}.")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"{name} must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]; convert [0, 1] images with x * 2 - 1.")


def area_downsample(images: Tensor, scale: int) -> Tensor:
    """Antialiased box (area) downsampling by an integer factor: each output pixel is the mean of an s x s block
    (``F.interpolate(mode="area")`` / PIL's BOX filter at integer factors). [B, C, H, W] -> [B, C, H/s, W/s]."""
    scale = check_scale(scale)
    height, width = images.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"Image size {height}x{width} is not divisible by the upscaling factor {scale}; crop or "
                         f"resize the images to a multiple of {scale} (e.g. {height // scale * scale}x"
                         f"{width // scale * scale}).")
    return F.avg_pool2d(images, kernel_size=scale)


def bicubic_upsample(low: Tensor, scale: int) -> Tensor:
    """Bicubic upsampling (torch's a = -0.75 kernel) clamped to [-1, 1]: the baseline and the residual's base.
    [B, C, h, w] -> [B, C, h * s, w * s]."""
    up = F.interpolate(low.float(), scale_factor=check_scale(scale), mode="bicubic", align_corners=False)
    return up.clamp(-1.0, 1.0)


def noise_augment(low: Tensor, levels: Tensor, schedule: NoiseSchedule, generator: Optional[torch.Generator] = None
                  ) -> Tensor:
    """q(low_t | low) at integer ``levels`` [B] of the augmentation schedule (Ho et al. 2020, eq. 4), as SD's
    ``ImageConcatWithNoiseAugmentation``. low: [B, 3, h, w] -> [B, 3, h, w]."""
    rng_device = generator.device if generator is not None else low.device
    noise = torch.randn(low.shape, generator=generator, device=rng_device, dtype=low.dtype).to(low.device)
    return schedule.q_sample(low, levels.to(low.device), noise)


def noise_level_condition(unet, levels: Tensor) -> Tensor:
    """The U-Net's ``y`` for noise levels [B]: the class ids themselves for an embedding table
    (``num_classes`` = int, as SD's upscaler with 1000 entries), or sinusoidal features [B, adm_in_channels]
    for ``num_classes="sequential"`` (smooth in the level, so rarely drawn levels still get a sensible input)."""
    if unet.num_classes == "sequential":
        return timestep_embedding(levels, unet.adm_in_channels)
    return levels.long()


def check_noise_level(level: int, max_noise_level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= max_noise_level:
        raise ValueError(f"noise_level must be an integer in [0, {max_noise_level}] (the range the upscaler was "
                         f"trained on), got {level!r}.")
    return level


@torch.no_grad()
def upscale(
    model,
    low_res: Tensor,
    sampler: str = "ddpm",
    steps: int = 20,
    noise_level: int = 0,
    generator: Optional[torch.Generator] = None,
    spacing: str = "karras",
    use_ema: bool = True,
    sampler_options: Optional[dict] = None,
    progress: bool = False,
) -> Tensor:
    """Upscale ``low_res`` [B, 3, h, w] in [-1, 1] by ``model.scale`` -> [B, 3, h * s, w * s] in [-1, 1].

    ``model`` is an ``Upscaler``; any sampler of ``ldm.diffusion.samplers`` runs on the (EMA) U-Net wrapped as a
    ``DiscreteDenoiser``, with the noise-augmented low-res image and its level as extra U-Net inputs. The default,
    20 ancestral DDPM steps on Karras sigmas, draws a sharp sample; ``steps=1`` returns the U-Net's mean estimate
    (higher PSNR, less sharp; docs/upscaler.md). Initial, augmentation and ancestral noise come from ``generator`` (on the model's device
    for the ancestral samplers), so a fixed seed is reproducible.
    """
    check_images(low_res, "low_res")
    max_level = model.hparams.max_noise_level
    check_noise_level(noise_level, max_level)
    device = next(model.parameters()).device
    low_res = low_res.float().to(device)
    scale = model.scale
    model.check_size(low_res.shape[2] * scale, low_res.shape[3] * scale)
    levels = torch.full((low_res.shape[0],), noise_level, dtype=torch.long, device=device)  # [B]
    concat, y, base = model.condition(low_res, levels, generator)  # [B, 3, H, W], y, [B, 3, H, W]
    unet = model.sampling_unet(use_ema)
    denoiser = DiscreteDenoiser(unet, model.schedule, model.hparams.parameterization)
    sigmas = get_sigmas(model.schedule, steps, spacing=spacing).to(device)
    rng_device = generator.device if generator is not None else device
    noise = torch.randn(base.shape, generator=generator, device=rng_device).to(device)  # [B, 3, H, W]
    sample = get_sampler(sampler)(denoiser, noise * sigmas[0], sigmas, extra_args={"concat": concat, "y": y},
                                  generator=generator, progress=progress, **(sampler_options or {}))
    return model.from_target(sample, base).clamp(-1.0, 1.0)
