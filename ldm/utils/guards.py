"""Pre-flight checks that need both the data and the model: refuse a run before its first step.

Checks that concern the model alone live in the model constructors (``LatentDiffusion`` refuses a
U-Net whose ``in_channels``/``out_channels`` differ from the autoencoder's latent channels, or whose
``context_dim`` differs from the text encoder width). What only the pair (data, model) can tell is
checked here, from ``train.py``, before ``trainer.fit``:

- the image side must be divisible by the model's total downsampling: ``f`` for an autoencoder,
  ``f * 2 ** (len(channel_mult) - 1)`` for latent diffusion (autoencoder factor x U-Net levels);
  otherwise the decoder / U-Net skip connections cannot restore the input shape.
- an upscaler's high-res side must be divisible by its ``scale`` (the low-res image is an exact area
  downsample) and, unless it trains on ``train_crop`` patches, by the U-Net's downsampling.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion import LatentDiffusion
from ldm.models.upscaler import Upscaler
from ldm.utils.run import ConfigError


def spatial_factors(model: L.LightningModule) -> Optional[list[tuple[str, int]]]:
    """The downsampling stages an input image passes through, as ``[(description, factor), ...]``.

    ``None`` for models that accept any resolution (e.g. CLIP resizes its input).
    """
    if isinstance(model, LatentDiffusion):
        ae_levels = len(model.first_stage_model.config["ddconfig"]["ch_mult"])
        unet_mult = model.unet.channel_mult
        return [
            (f"autoencoder factor (ch_mult with {ae_levels} levels)", model.first_stage_model.downsample_factor),
            (f"U-Net downsampling (model.unet_config.channel_mult={unet_mult})", 2 ** (len(unet_mult) - 1)),
        ]
    if isinstance(model, AutoencoderKL):
        ch_mult = model.hparams.ddconfig["ch_mult"]
        return [(f"autoencoder factor (model.ddconfig.ch_mult={ch_mult})", 2 ** (len(ch_mult) - 1))]
    return None


def check_resolution(image_size: int, model: L.LightningModule) -> None:
    """Refuse an image side the model cannot downsample and restore exactly."""
    factors = spatial_factors(model)
    if not factors:
        return
    divisor = 1
    for _, factor in factors:
        divisor *= factor
    if image_size % divisor == 0:
        return
    parts = " x ".join(f"{factor} = {what}" for what, factor in factors)
    lower, upper = (image_size // divisor) * divisor, (image_size // divisor + 1) * divisor
    suggestion = f"{lower} or {upper}" if lower > 0 else str(upper)
    raise ConfigError(
        f"data.image_size={image_size} is not divisible by the model's total downsampling {divisor} ({parts}). "
        f"Set data.image_size to a multiple of {divisor} (e.g. {suggestion}) or change the model's levels."
    )


def check_upscaler_resolution(image_size: int, model: Upscaler) -> None:
    """Refuse a high-res side the upscaler cannot downsample by ``scale`` or crop to ``train_crop``."""
    crop = model.hparams.get("train_crop")
    unet_factor = 2 ** (len(model.unet.channel_mult) - 1)
    if crop is not None and image_size < crop:
        raise ConfigError(f"data.image_size={image_size} is smaller than model.train_crop={crop}: "
                          f"set model.train_crop <= {image_size} or train on larger images.")
    divisor = model.scale if crop is not None else math.lcm(model.scale, unet_factor)
    if image_size % divisor:
        raise ConfigError(
            f"data.image_size={image_size} is not divisible by {divisor} (upscaling scale={model.scale}"
            + ("" if crop is not None else f", U-Net downsampling {unet_factor}") + f"). Set data.image_size to a "
            f"multiple of {divisor}, e.g. {max(divisor, image_size // divisor * divisor)}.")


def check_run(datamodule: L.LightningDataModule, model: L.LightningModule) -> None:
    """All data-vs-model checks; called by ``train.py`` after instantiating both."""
    image_size: Any = getattr(datamodule, "hparams", {}).get("image_size")
    if image_size is not None and isinstance(model, Upscaler):
        check_upscaler_resolution(int(image_size), model)
    elif image_size is not None:
        check_resolution(int(image_size), model)
