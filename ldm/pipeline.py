"""Inference on a trained latent-diffusion model: text-to-image (img2img / inpainting: ``ldm/pipeline_img2img.py``).

prompt -> text encoder -> context; noise -> sampler(denoiser(U-Net), CFG) -> latents
-> de-normalise -> decoder -> images in [0, 1].
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

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
    eta: float = 1.0  # noise of ddim / euler_a / dpmpp_2m_sde (0 = deterministic: ddim = euler, sde = dpmpp_2m)
    progress: bool = True
    sampler_options: dict = field(default_factory=dict)


def image_size(model, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """(height, width) in pixels; unset values default to the autoencoder's training resolution."""
    default = model.first_stage_model.config["ddconfig"].get("resolution", 32)
    return height or default, width or default


def latent_size(model, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """(h, w) of the latents for an image of height x width pixels (default: the training resolution)."""
    factor = model.first_stage_model.downsample_factor
    height, width = image_size(model, height, width)
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


@dataclass
class PromptBatch:
    """One batch of prompts with everything that makes its images reproducible."""

    start: int  # index of the first prompt in the whole call
    prompts: list[str]
    seeds: list[int]  # image i uses seed config.seed + start + i
    cond: dict[str, torch.Tensor]  # the U-Net's text kwargs (context [b, 77, D], y [b, E])
    uncond: Optional[dict[str, torch.Tensor]]  # negative-prompt kwargs; None without guidance
    noise: torch.Tensor  # [b, C, h, w] ~ N(0, I), one draw per seed
    generator: torch.Generator  # ancestral-step noise


@torch.no_grad()
def prompt_batches(model, prompts: Sequence[str], config: SamplingConfig, h: int, w: int) -> Iterator[PromptBatch]:
    """Split ``prompts`` into batches of ``config.batch_size`` with their conditioning, seeds and initial noise."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("No prompts given.")
    device = next(model.parameters()).device
    channels = model.first_stage_model.z_channels
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start:start + config.batch_size]
        seeds = [config.seed + start + i for i in range(len(chunk))]
        cond = {k: v.to(device) for k, v in model.encode_conditioning(chunk, use_ema=config.use_ema).items()}
        uncond = None
        if config.cfg_scale != 1.0:
            negative = model.encode_conditioning([config.negative_prompt] * len(chunk), use_ema=config.use_ema)
            uncond = {k: v.to(device) for k, v in negative.items()}
        noise = initial_noise((channels, h, w), seeds, device)
        generator = torch.Generator(device=device).manual_seed(seeds[0] + 7919)  # ancestral noise
        yield PromptBatch(start, chunk, seeds, cond, uncond, noise, generator)


def guided_denoiser(
    model, cond: dict[str, torch.Tensor], uncond: Optional[dict[str, torch.Tensor]], config: SamplingConfig
) -> tuple[Callable[..., torch.Tensor], dict]:
    """(denoiser D(x, sigma, **extra_args) -> x0_hat, extra_args): the (EMA) U-Net as a VE denoiser, wrapped in
    classifier-free guidance when ``uncond`` is given and ``cfg_scale != 1``. Shared kwargs (e.g. ``concat``) may
    be added to ``extra_args``: both guidance branches receive them."""
    unet = model.sampling_unet(config.use_ema)
    denoiser = DiscreteDenoiser(unet, model.schedule, model.hparams.parameterization)
    if uncond is not None and config.cfg_scale != 1.0:
        return CFGDenoiser(denoiser, config.cfg_scale), {"cond": cond, "uncond": uncond}
    return denoiser, dict(cond)


def run_sampler(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict,
    config: SamplingConfig,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[dict], None]] = None,
) -> torch.Tensor:
    """The configured sampler from ``x`` (already at noise level ``sigmas[0]``) along ``sigmas`` (ending in 0)."""
    sampler = get_sampler(config.sampler)
    options = dict(config.sampler_options)
    if "eta" in inspect.signature(sampler).parameters and "eta" not in options:  # ddim, euler_a, dpmpp_2m_sde
        options["eta"] = config.eta
    return sampler(denoiser, x, sigmas, extra_args=extra_args, generator=generator, callback=callback,
                   progress=config.progress, **options)


def sampling_sigmas(model, config: SamplingConfig, device: torch.device) -> torch.Tensor:
    """The ``config.steps + 1`` sigmas (ending in 0) of the configured spacing."""
    return get_sigmas(model.schedule, config.steps, spacing=config.spacing).to(device)


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
    denoiser, extra_args = guided_denoiser(model, cond, uncond, config)
    sigmas = sampling_sigmas(model, config, noise.device)
    return run_sampler(denoiser, noise * sigmas[0], sigmas, extra_args, config, generator, callback)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Decoder output [B, 3, H, W] in ~[-1, 1] -> float32 CPU images in [0, 1]."""
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


@torch.no_grad()
def text_to_image(model, prompts: Sequence[str], config: Optional[SamplingConfig] = None) -> torch.Tensor:
    """Generate one image per prompt. Returns [N, 3, H, W] in [0, 1] (float32, CPU).

    Image i uses seed ``config.seed + i``, so it is reproducible on its own.
    """
    config = config or SamplingConfig()
    h, w = latent_size(model, config.height, config.width)
    images = []
    for batch in prompt_batches(model, prompts, config, h, w):
        z = sample_latents(model, batch.cond, batch.uncond, batch.noise, config, generator=batch.generator)
        images.append(to_unit_range(model.decode_latents(z)))  # [b, 3, H, W]
    return torch.cat(images)


def __getattr__(name: str):
    """``from ldm.pipeline import image_to_image``: img2img and inpainting (``ldm/pipeline_img2img.py``, which builds
    on this module and is therefore imported on first use)."""
    if name == "image_to_image":
        from ldm.pipeline_img2img import image_to_image

        return image_to_image
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
