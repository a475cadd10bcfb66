"""Inference on a trained latent-diffusion model: text-to-image (img2img / inpainting build on it).

prompt -> text encoder -> context; noise -> sampler(denoiser(U-Net), CFG) -> latents
-> de-normalise -> decoder -> images in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.guidance import CFGDenoiser
from ldm.diffusion.samplers import get_sampler, get_sigmas


@dataclass
class SamplingConfig:
    """How to sample; every field maps to a `scripts/sample.py` option."""

    sampler: str = "dpmpp_2m"
    steps: int = 20
    cfg_scale: float = 4.0
    negative_prompt: str = ""
    spacing: str = "karras"  # sigma spacing: karras | leading | trailing | linspace
    height: Optional[int] = None  # pixels; default: the training resolution
    width: Optional[int] = None
    seed: int = 0
    batch_size: int = 16
    use_ema: bool = True
    eta: float = 1.0  # ancestral noise for ddim / euler_a (ddim: 0 = deterministic)
    progress: bool = True
    sampler_options: dict = field(default_factory=dict)


def latent_size(model, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """(h, w) of the latents for an image of height x width pixels (default: the training resolution)."""
    factor = model.first_stage_model.downsample_factor
    default = model.first_stage_model.config["ddconfig"].get("resolution", 32)
    height, width = height or default, width or default
    for name, value in (("height", height), ("width", width)):
        if value % factor:
            raise ValueError(f"{name}={value} is not divisible by the autoencoder's factor {factor}.")
    h, w = height // factor, width // factor
    levels = len(model.unet.channel_mult) - 1 if hasattr(model.unet, "channel_mult") else 0
    if h % (2 ** levels) or w % (2 ** levels):
        raise ValueError(
            f"{height}x{width} px gives {h}x{w} latents, not divisible by 2^{levels} (the U-Net's downsampling)."
        )
    return h, w


def initial_noise(
    shape: Sequence[int], seeds: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """One N(0, I) latent per seed: image i is reproducible from its own seed. -> [len(seeds), *shape]."""
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


@torch.no_grad()
def sample_latents(
    model,
    cond: dict[str, torch.Tensor],
    uncond: Optional[dict[str, torch.Tensor]],
    noise: torch.Tensor,
    config: SamplingConfig,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[dict], None]] = None,
) -> torch.Tensor:
    """Run the configured sampler. cond/uncond: the U-Net's text kwargs (``context`` [B, 77, D], and ``y`` [B, E]
    with pooled-text conditioning) from ``model.encode_conditioning``; noise: [B, C, h, w] ~ N(0, I);
    ``callback`` sees ``{"x", "i", "sigma", "sigma_next", "denoised"}`` after every step."""
    unet = model.sampling_unet(config.use_ema)
    denoiser = DiscreteDenoiser(unet, model.schedule, model.hparams.parameterization)
    if uncond is not None and config.cfg_scale != 1.0:
        denoiser = CFGDenoiser(denoiser, config.cfg_scale)
        extra_args = {"cond": cond, "uncond": uncond}
    else:
        extra_args = dict(cond)
    sigmas = get_sigmas(model.schedule, config.steps, spacing=config.spacing).to(noise.device)
    sampler = get_sampler(config.sampler)
    options = dict(config.sampler_options)
    if config.sampler in ("ddim", "euler_a", "ddpm") and "eta" not in options and config.sampler != "ddpm":
        options["eta"] = config.eta
    x = noise * sigmas[0]
    return sampler(denoiser, x, sigmas, extra_args=extra_args, generator=generator, callback=callback,
                   progress=config.progress, **options)


@torch.no_grad()
def text_to_image(model, prompts: Sequence[str], config: Optional[SamplingConfig] = None) -> torch.Tensor:
    """Generate one image per prompt. Returns [N, 3, H, W] in [0, 1] (float32, CPU).

    Image i uses seed ``config.seed + i``, so it is reproducible on its own.
    """
    config = config or SamplingConfig()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("No prompts given.")
    device = next(model.parameters()).device
    h, w = latent_size(model, config.height, config.width)
    channels = model.first_stage_model.z_channels
    images = []
    batches = math.ceil(len(prompts) / config.batch_size)
    for b in range(batches):
        chunk = prompts[b * config.batch_size:(b + 1) * config.batch_size]
        seeds = [config.seed + b * config.batch_size + i for i in range(len(chunk))]
        cond = {k: v.to(device) for k, v in model.encode_conditioning(chunk).items()}
        uncond = None
        if config.cfg_scale != 1.0:
            negative = model.encode_conditioning([config.negative_prompt] * len(chunk))
            uncond = {k: v.to(device) for k, v in negative.items()}
        noise = initial_noise((channels, h, w), seeds, device)
        generator = torch.Generator(device=device).manual_seed(seeds[0] + 7919)  # ancestral noise
        z = sample_latents(model, cond, uncond, noise, config, generator=generator)
        x = model.decode_latents(z)  # [b, 3, H, W] in ~[-1, 1]
        images.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(images)
