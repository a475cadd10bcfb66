"""Autoencoder training objective (Rombach et al. 2022, sec. 3.1; Esser et al. 2021, taming, sec. 3.1).

Generator side: per-pixel L1 / L2 reconstruction (+ LPIPS if weights are available locally), a small KL
penalty towards N(0, I), and a PatchGAN hinge term with taming's adaptive weight once the discriminator is
switched on. Reductions follow CompVis: reconstruction and KL are summed over each image and averaged over
the batch, so ``kl_weight=1e-6`` means the same here as in SD's ``kl-f8`` config.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoints import load_state_dict
from ldm.modules.autoencoder import DiagonalGaussianDistribution
from ldm.modules.discriminator import NLayerDiscriminator

_LPIPS_WEIGHTS_KEY = "model.loss.lpips_weights"


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 backbone (Zhang et al. 2018, eq. 1), built only from local files.

    ``weights_path`` holds either the full LPIPS state (``net.slice*`` + ``lin*``: the ``lpips`` package
    layout, or the ``loss.perceptual_loss.*`` entries of a CompVis autoencoder checkpoint) or torchvision's
    ImageNet VGG16 weights (``features.*``, e.g. ``vgg16-397923af.pth``); the linear heads then come
    from the copy that torchmetrics ships. Frozen and always in eval mode.

    x, y: [B, 3, H, W] in [-1, 1] -> [B, 1, 1, 1].
    """

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from torchmetrics.functional.image import lpips as tm_lpips

        # pretrained=False, pnet_rand=True: construct the network without any download, then fill it.
        self.net = tm_lpips._LPIPS(pretrained=False, net="vgg", pnet_rand=True, pnet_tune=False)
        target = self.net.state_dict()
        state = _lpips_state(load_state_dict(weights_path), target.keys(), tm_lpips.__file__)
        missing = sorted(set(target) - set(state))
        if missing:
            raise ValueError(
                f"LPIPS weights at {weights_path} lack {len(missing)} tensors (e.g. {missing[:3]}); "
                "give torchvision's VGG16 ImageNet state dict or a full LPIPS state dict."
            )
        self.net.load_state_dict({k: state[k] for k in target}, strict=True)
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> LPIPS:  # frozen metric network: never leave eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y)


def _lpips_state(state: dict, target_keys, torchmetrics_lpips_file: str) -> dict:
    """Map a VGG16 / LPIPS state dict onto torchmetrics' ``_LPIPS`` keys."""
    for prefix in ("first_stage_model.loss.perceptual_loss.", "loss.perceptual_loss.", "perceptual_loss."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    out = {k: v for k, v in state.items() if k.startswith(("net.", "lin"))}
    if any(k.startswith("features.") for k in state):  # torchvision VGG16: features.N.* -> net.sliceK.N.*
        by_index = {k.split(".", 2)[2]: k for k in target_keys if k.startswith("net.slice")}  # "N.weight"
        for key, value in state.items():
            if key.startswith("features.") and key[len("features."):] in by_index:
                out[by_index[key[len("features."):]]] = value
    if not any(k.startswith("lin") for k in out):  # linear heads shipped with torchmetrics (a few KB)
        heads = Path(torchmetrics_lpips_file).parent / "lpips_models" / "vgg.pth"
        out.update(torch.load(heads, map_location="cpu", weights_only=True))
    for key in list(out):  # torchmetrics keeps each head twice: lin{k} and lins.{k}
        alias = re.sub(r"^lin(\d+)\.", r"lins.\1.", key)
        out.setdefault(alias, out[key])
    return out


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017): ``0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AutoencoderLoss(nn.Module):
    """Reconstruction + KL [+ LPIPS] [+ PatchGAN] loss of the KL autoencoder.

    The discriminator is built only when ``disc_weight > 0`` and ``disc_factor > 0``; it is used from
    generator step ``disc_start`` on. ``perceptual_weight > 0`` needs local VGG16 / LPIPS weights at
    ``lpips_weights`` (nothing is downloaded).
    """

    def __init__(
        self,
        rec_loss: str = "l1",
        kl_weight: float = 1e-6,
        disc_start: int = 50001,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_num_layers: int = 3,
        disc_ndf: int = 64,
        disc_in_channels: int = 3,
        perceptual_weight: float = 0.0,
        lpips_weights: str | None = None,
    ):
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"model.loss.rec_loss must be 'l1' or 'l2' (got {rec_loss!r}).")
        self.rec_loss = rec_loss
        self.kl_weight = float(kl_weight)
        self.disc_start = int(disc_start)
        self.disc_weight = float(disc_weight)
        self.disc_factor = float(disc_factor)
        self.perceptual_weight = float(perceptual_weight)

        self.perceptual_loss: LPIPS | None = None
        if self.perceptual_weight > 0:
            if lpips_weights is None or not os.path.isfile(lpips_weights):
                raise FileNotFoundError(
                    f"perceptual_weight={self.perceptual_weight} needs local VGG16/LPIPS weights, but "
                    f"{_LPIPS_WEIGHTS_KEY} is {lpips_weights!r}, which is not a file. They cannot be "
                    "downloaded here (offline). Point it at torchvision's vgg16-397923af.pth or an LPIPS "
                    f"state dict, or set model.loss.perceptual_weight=0."
                )
            self.perceptual_loss = LPIPS(lpips_weights)

        self.discriminator: NLayerDiscriminator | None = None
        if self.disc_weight > 0 and self.disc_factor > 0:
            self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers)

    def gan_active(self, generator_step: int) -> bool:
        """Whether the adversarial terms are on at this generator step (taming's ``adopt_weight``)."""
        return self.discriminator is not None and generator_step >= self.disc_start

    def pixel_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Per-pixel L1 or squared error, [B, C, H, W]."""
        diff = inputs - reconstructions
        return diff.abs() if self.rec_loss == "l1" else diff.pow(2)

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        last_layer: torch.Tensor | None = None,
        use_gan: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder objective for one batch; returns (loss, detached per-term logs).

        inputs, reconstructions: [B, C, H, W] in [-1, 1]. ``last_layer`` (the decoder's output conv weight)
        is needed for the adaptive GAN weight when ``use_gan``.
        """
        batch = inputs.shape[0]
        pixel = self.pixel_loss(inputs, reconstructions)  # [B, C, H, W]
        nll = pixel
        logs: dict[str, torch.Tensor] = {"rec_loss": pixel.detach().mean()}
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs, reconstructions)  # [B, 1, 1, 1]
            nll = pixel + self.perceptual_weight * p_loss  # broadcast per pixel, as CompVis
            logs["p_loss"] = p_loss.detach().mean()
        nll_loss = nll.sum() / batch
        kl_loss = posterior.kl().sum() / batch
        loss = nll_loss + self.kl_weight * kl_loss
        logs.update(nll_loss=nll_loss.detach(), kl_loss=kl_loss.detach())

        if use_gan:
            if self.discriminator is None:
                raise RuntimeError("use_gan=True but the GAN is disabled (disc_weight or disc_factor is 0).")
            g_loss = -self.discriminator(reconstructions).mean()
            d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer)
            loss = loss + d_weight * self.disc_factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        logs["total_loss"] = loss.detach()
        return loss, logs

    def adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None
    ) -> torch.Tensor:
        """Balance the GAN gradient against the reconstruction gradient at the decoder's last layer
        (Esser et al. 2021, eq. 7): ``disc_weight * ||grad nll|| / (||grad g|| + 1e-4)``, clamped to [0, 1e4]."""
        if last_layer is None:
            raise ValueError("The adaptive GAN weight needs last_layer (the decoder's conv_out.weight).")
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = nll_grads.norm() / (g_grads.norm() + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.disc_weight

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of the PatchGAN on real inputs vs. (detached) reconstructions."""
        if self.discriminator is None:
            raise RuntimeError("discriminator_loss called, but the GAN is off (disc_weight or disc_factor is 0).")
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        d_loss = self.disc_factor * hinge_d_loss(logits_real, logits_fake)
        logs = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs
