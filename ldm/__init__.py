"""Latent diffusion models trained from scratch: Hydra configs, Lightning loops, WebDataset shards."""

__version__ = "0.1.0"
