"""The frozen autoencoder inside the diffusion stage (``first_stage_model.*`` in SD checkpoints).

It carries only what inference needs (encoder, decoder, quant convs and the per-channel latent
statistics measured by stage 1), not the discriminator or losses of the training module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ldm.checkpoints import load_checkpoint
from ldm.modules.autoencoder import Decoder, DiagonalGaussianDistribution, Encoder

_KEEP_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "latent_mean", "latent_std")


class FirstStage(nn.Module):
    """KL autoencoder for inference: ``encode(x) -> posterior``, ``decode(z) -> x``.

    x: [B, 3, H, W] in [-1, 1]; z: [B, z_channels, H/f, W/f].
    """

    def __init__(self, ddconfig: dict, embed_dim: int, ckpt_path: Optional[str] = None):
        super().__init__()
        self.config = {"ddconfig": dict(ddconfig), "embed_dim": int(embed_dim), "ckpt_path": ckpt_path}
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        factor = 2 if ddconfig.get("double_z", True) else 1
        self.quant_conv = nn.Conv2d(factor * ddconfig["z_channels"], factor * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.z_channels = int(embed_dim)
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
        # per-channel statistics of the latents, measured by stage 1 (NaN = unknown)
        self.register_buffer("latent_mean", torch.full((embed_dim,), float("nan")))
        self.register_buffer("latent_std", torch.full((embed_dim,), float("nan")))
        self.weights_loaded = False
        self.requires_grad_(False)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights (float32, or bfloat16 after ``.to(torch.bfloat16)``)."""
        return self.quant_conv.weight.dtype

    @classmethod
    def from_config(cls, config: dict) -> "FirstStage":
        """Build from ``{"ckpt_path": ...}`` (reads the stage-1 checkpoint) or from ``{"ddconfig", "embed_dim"}``."""
        config = dict(config)
        ckpt_path = config.get("ckpt_path")
        if "ddconfig" in config and ckpt_path is None:
            return cls(config["ddconfig"], config["embed_dim"])
        if ckpt_path is None:
            raise ValueError("first_stage_config needs `ckpt_path` (a stage-1 checkpoint) or `ddconfig` + `embed_dim`.")
        if not Path(ckpt_path).exists():
            raise FileNotFoundError(
                f"Autoencoder checkpoint not found: model.first_stage_config.ckpt_path={ckpt_path}. "
                f"Train stage 1 first (`python train.py experiment=quickstart_autoencoder`) and pass its "
                f"checkpoints/last.ckpt."
            )
        ckpt = load_checkpoint(ckpt_path)
        hparams = ckpt.get("hyper_parameters", {})
        ddconfig = config.get("ddconfig") or hparams.get("ddconfig")
        embed_dim = config.get("embed_dim") or hparams.get("embed_dim")
        if ddconfig is None or embed_dim is None:
            raise ValueError(
                f"{ckpt_path} carries no ddconfig/embed_dim hyper-parameters (not a stage-1 checkpoint of this "
                f"project?). Give model.first_stage_config.ddconfig and .embed_dim explicitly."
            )
        module = cls(ddconfig, embed_dim, ckpt_path=str(ckpt_path))
        module.load_autoencoder_state(ckpt["state_dict"], source=str(ckpt_path))
        return module

    def load_autoencoder_state(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load encoder/decoder weights, ignoring the training-only parts (``loss.*``); strict otherwise."""
        wanted = {k: v for k, v in state_dict.items() if k.startswith(_KEEP_PREFIXES)}
        result = self.load_state_dict(wanted, strict=False)
        missing = [k for k in result.missing_keys if k not in ("latent_mean", "latent_std")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"Autoencoder weights from {source} do not fit the configured architecture: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {result.unexpected_keys[:8]}."
            )
        self.weights_loaded = True

    def latent_stats(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, std) per latent channel if stage 1 measured them, else None."""
        if torch.isnan(self.latent_mean).any() or torch.isnan(self.latent_std).any():
            return None
        return self.latent_mean.clone(), self.latent_std.clone()

    def train(self, mode: bool = True) -> "FirstStage":
        return super().train(False)  # always frozen

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        moments = self.quant_conv(self.encoder(x))  # [B, 2*C, h, w]
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))
