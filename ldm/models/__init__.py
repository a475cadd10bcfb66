"""LightningModules that compose the blocks of ``ldm.modules`` into trainable stages."""

from ldm.models.autoencoder import AutoencoderKL

__all__ = ["AutoencoderKL"]
