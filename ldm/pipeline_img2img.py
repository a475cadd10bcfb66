"""Image-to-image (SDEdit, Meng et al. 2022) and inpainting on a trained latent-diffusion model.

    init image --encode (posterior mode)--> z0 --z0 + sigma_k * noise--> x ──sampler on sigmas[-(k+1):]──> z
    z --(inpainting: known latents kept, ldm/inpaint.py)--> decoder --(inpainting: paste original pixels)--> image

``strength`` s picks how much of the schedule is re-run, as diffusers' ``StableDiffusionImg2ImgPipeline``: the
last k = round(s * steps) steps of the sampler's sigma list (diffusers truncates with int(); round() keeps e.g.
s = 0.29, steps = 100 at 29 steps despite 0.29 * 100 = 28.999...). The ends are exact:

- k = 0 (s = 0, or s < 0.5 / steps): nothing to sample; the result is the autoencoder round trip
  decode(encode(x)) (short-circuited, no network call) -- not x itself, the latents are all a sampler can change.
- k = steps (s = 1): the start is pure noise ``sigma_max * noise`` exactly as text-to-image (and diffusers'
  inpaint pipeline at ``strength=1``), so with the same seed the result *is* the text-to-image sample. With a
  blending mask the known region starts at ``z0 + sigma_max * noise`` so the first step already sees it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.inpaint import MaskBlendDenoiser, check_mask, latent_mask, paste_known_pixels
from ldm.pipeline import (SamplingConfig, guided_denoiser, latent_size, prompt_batches, run_sampler, sampling_sigmas,
                          to_unit_range)


def strength_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` sampler steps strength s re-runs: round(s * steps), halves rounded up."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0: return the input, 1: ignore it), got {strength}.")
    return int(strength * steps + 0.5)


def img2img_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a sampler's sigma list ([steps + 1], ending in 0) that strength s runs: its last
    round(s * steps) steps, [k + 1] sigmas from sigmas[steps - k] down to 0 (k = 0 gives just [0])."""
    k = strength_steps(sigmas.numel() - 1, strength)
    return sigmas[sigmas.numel() - 1 - k:]


def encode_init(model, images: Tensor) -> Tensor:
    """Init images [B, 3, H, W] in [-1, 1] -> normalised latents [B, C, h, w] (posterior mode, float32)."""
    dtype = next(model.first_stage_model.parameters()).dtype
    return model.encode_images(images.to(dtype), sample=False).float()


def inpaint_concat(model, images: Tensor, mask: Tensor, h: int, w: int) -> Tensor:
    """U-Net concat channels of an inpainting-trained model (SD-inpainting layout, as diffusers'
    ``StableDiffusionInpaintPipeline``): [mask resized (nearest) to h x w, latents of the image with the repaint
    region zeroed] -> [B, 1 + C, h, w]."""
    small = F.interpolate(mask, size=(h, w), mode="nearest")  # [B, 1, h, w]
    masked_latents = encode_init(model, images * (1 - mask))  # [B, C, h, w]
    return torch.cat([small, masked_latents], dim=1)


def _concat_mode(model) -> bool:
    """False for a plain text-to-image U-Net; True for an inpainting U-Net with mask + masked-image channels."""
    concat = int(model.hparams.get("concat_channels", 0) or 0)
    channels = model.first_stage_model.z_channels
    if concat not in (0, channels + 1):
        raise ValueError(f"This model takes {concat} concat channels; image_to_image supports 0 (any model, latent "
                         f"blending) or {channels + 1} (an inpainting U-Net: mask + masked-image latents).")
    return concat > 0


def _check_init(images: Tensor, n_prompts: int, config: SamplingConfig) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"init_images must be [B, 3, H, W] RGB, got shape {tuple(images.shape)}.")
    if images.shape[0] not in (1, n_prompts):
        raise ValueError(f"{images.shape[0]} init images for {n_prompts} prompts: give one image per prompt or one "
                         f"for all.")
    if float(images.min()) < -1.0 - 1e-3 or float(images.max()) > 1.0 + 1e-3:
        raise ValueError(f"init_images must lie in [-1, 1], got [{float(images.min()):.3g}, "
                         f"{float(images.max()):.3g}]; convert images in [0, 1] with x * 2 - 1.")
    for name, value, actual in (("height", config.height, images.shape[2]), ("width", config.width, images.shape[3])):
        if value is not None and value != actual:
            raise ValueError(f"config.{name}={value} but the init images have {name} {actual}; resize the images "
                             f"or leave config.{name} unset.")


@torch.no_grad()
def image_to_image(
    model,
    prompts: Sequence[str],
    init_images: Tensor,
    config: Optional[SamplingConfig] = None,
    strength: float = 0.8,
    mask: Optional[Tensor] = None,
    paste: bool = True,
    paste_dilation: int = 0,
    callback: Optional[Callable[[dict], None]] = None,
) -> Tensor:
    """img2img, or inpainting when ``mask`` is given. Returns [N, 3, H, W] in [0, 1] (float32, CPU).

    init_images: [N or 1, 3, H, W] in [-1, 1] (one per prompt, or one for all); mask: [N or 1, 1, H, W] in {0, 1},
    1 = repaint. Image i uses seed ``config.seed + i`` like ``text_to_image``. Any model inpaints by latent
    blending (``ldm.inpaint.MaskBlendDenoiser``); a model with ``concat_channels == C + 1`` instead receives the
    mask and masked-image latents as U-Net input channels (``inpaint_concat``, no blending). ``paste`` puts the
    original pixels back outside the mask dilated by ``paste_dilation`` pixels (exact there); without it the
    kept region is the decoder's rendering of the unchanged latents.
    """
    config = config or SamplingConfig()
    prompts = list(prompts)
    _check_init(init_images, len(prompts), config)
    device = next(model.parameters()).device
    init_images = init_images.float().to(device).expand(len(prompts), -1, -1, -1)  # [N, 3, H, W]
    height, width = init_images.shape[2:]
    h, w = latent_size(model, height, width)
    if mask is not None:
        mask = check_mask(mask, init_images).to(device)  # [N, 1, H, W]
    if paste_dilation < 0:
        raise ValueError(f"paste_dilation must be >= 0 pixels, got {paste_dilation}.")
    concat = _concat_mode(model)
    if concat and mask is None:
        raise ValueError("This is an inpainting model (concat_channels = latent channels + 1): pass a mask.")
    sigmas = img2img_sigmas(sampling_sigmas(model, config, device), strength)  # [k + 1]

    images = []
    for batch in prompt_batches(model, prompts, config, h, w):
        rows = slice(batch.start, batch.start + len(batch.prompts))
        init = init_images[rows]  # [b, 3, H, W]
        pixel_mask = mask[rows] if mask is not None else None  # [b, 1, H, W]
        z0 = encode_init(model, init)  # [b, C, h, w]
        if sigmas.numel() == 1 or (pixel_mask is not None and not pixel_mask.any()):
            z = z0  # nothing to repaint: the autoencoder round trip
        else:
            z = _sample(model, batch, z0, init, pixel_mask, concat, sigmas, config, callback)
        out = model.decode_latents(z)  # [b, 3, H, W] in ~[-1, 1]
        if pixel_mask is not None and paste:
            out = paste_known_pixels(out.float(), init, pixel_mask, paste_dilation)
        images.append(to_unit_range(out))
    return torch.cat(images)


def _sample(model, batch, z0: Tensor, init: Tensor, pixel_mask: Optional[Tensor], concat: bool, sigmas: Tensor,
            config: SamplingConfig, callback) -> Tensor:
    """Latents of one batch: noise z0 [b, C, h, w] to sigmas[0] and run the sampler down the truncated sigmas."""
    denoiser, extra_args = guided_denoiser(model, batch.cond, batch.uncond, config)
    blend = pixel_mask is not None and not concat
    factor = model.first_stage_model.downsample_factor
    repaint = latent_mask(pixel_mask, factor) if blend else None  # [b, 1, h, w]
    x = batch.noise * sigmas[0]  # [b, C, h, w]
    if sigmas.numel() - 1 < config.steps:
        x = x + z0  # SDEdit: the init latents noised to sigmas[0]
    elif blend:
        x = x + (1 - repaint) * z0  # full strength: pure noise to repaint, the known region on its marginal
    if blend:
        denoiser = MaskBlendDenoiser(denoiser, z0, repaint)
    if concat:
        extra_args["concat"] = inpaint_concat(model, init, pixel_mask, *z0.shape[2:])  # both CFG branches
    z = run_sampler(denoiser, x, sigmas, extra_args, config, batch.generator, callback)
    return torch.where(repaint.bool(), z, z0) if blend else z  # known latents exactly (no float drift)
