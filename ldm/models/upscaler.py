"""Super-resolution stage: a pixel-space diffusion upscaler conditioned on a low-res image (SD 2's x4 upscaler recipe).

    image x [B, 3, H, W] --area_downsample(scale)--> low [B, 3, H/s, W/s]
    low --noise_augment(level ~ U{0..max_noise_level})--> bicubic x s --> concat [B, 3, H, W]
    residual r0 = x - bicubic(low) --q_sample(t, eps)--> r_t
    unet(r_t ‖ concat, t, y = embed(level)) --> eps / v / x0 prediction of r0 --> (min-SNR weighted) MSE

Unlike SD's x4 upscaler, which diffuses the latents of an f=4 autoencoder at the low-res size, this U-Net runs on
the high-res pixels themselves: our images are 32-64 px, where an autoencoder would cost more than it saves.
The low-res image is concatenated to the U-Net input after bicubic upsampling, its noise level enters through
the class-embedding path (``unet_config.num_classes``: an int table as SD's ``num_classes: 1000``, or
``"sequential"`` with ``adm_in_channels`` for sinusoidal level features), and the U-Net diffuses the residual over
bicubic (SRDiff, Li et al. 2022). Helpers and inference live in ``ldm/upscale.py``.

State-dict layout: ``model.diffusion_model.*`` (U-Net) and ``model_ema.*`` as ``LatentDiffusion``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio

from ldm.checkpoints import load_checkpoint
from ldm.diffusion.loss import diffusion_loss, loss_weights, sample_timesteps
from ldm.diffusion.schedule import NoiseSchedule, _check_parameterization
from ldm.modules.ema import EMA
from ldm.modules.unet import UNetModel
from ldm.optim import build_optimizer, build_scheduler
from ldm.upscale import (NOISE_AUG_SCHEDULE, area_downsample, bicubic_upsample, check_scale, noise_augment,
                         noise_level_condition, upscale)


def psnr_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Each image's PSNR in dB, [B]; pred, target: [B, 3, H, W] in [-1, 1] (compared in [0, 1])."""
    pred, target = ((pred.float() + 1) / 2).clamp(0, 1), ((target.float() + 1) / 2).clamp(0, 1)
    return peak_signal_noise_ratio(pred, target, data_range=1.0, dim=(1, 2, 3), reduction="none")


class Upscaler(L.LightningModule):
    """Diffusion super-resolution by an integer ``scale``.

    Args:
        unet_config: ``UNetModel`` keyword arguments; in_channels = 6 (residual + low-res), out_channels = 3,
            no cross-attention (``context_dim`` unset), ``num_classes`` an int > max_noise_level or "sequential".
        scale: upscaling factor (training degrades by area downsampling with it).
        schedule: ``NoiseSchedule.from_config`` arguments of the diffusion itself.
        parameterization: "eps" | "v" | "x0" (SD's x4 upscaler: v).
        max_noise_level: training noise-augmentation levels are drawn from {0, ..., max_noise_level} of
            ``noise_aug_schedule`` (SD: 350 of a 1000-step schedule).
        residual: diffuse x - bicubic(low) (True) or the image itself.
        target_scale: multiplies what is diffused, so that it has about unit standard deviation as the schedule and
            min-SNR weighting assume (the residual's std is 0.02-0.09 on our data: 10 brings it near SD's latents;
            the same role as SD's latent ``scale_factor``).
        loss_weighting / snr_gamma: "uniform" (SD's upscaler) or "min_snr" (Hang et al. 2023). Min-SNR nearly
            ignores the high-noise steps where the U-Net learns E[residual | low-res], which PSNR rewards.
        train_crop: train on random high-res crops of this side (a multiple of ``scale`` and of the U-Net's
            downsampling; crops start on the low-res pixel grid) instead of whole images: the U-Net is fully
            convolutional and super-resolution is local, so patches cost less per step (SRDiff trains on patches).
        ema_decay: EMA decay of the U-Net (None disables EMA).
        val_sampler / val_steps / val_noise_level: the quick sample behind val/psnr.
    """

    def __init__(
        self,
        unet_config: dict,
        scale: int = 4,
        schedule: Optional[dict] = None,
        parameterization: str = "v",
        max_noise_level: int = 350,
        noise_aug_schedule: Optional[dict] = None,
        residual: bool = True,
        target_scale: float = 1.0,
        loss_weighting: str = "uniform",
        snr_gamma: float = 5.0,
        train_crop: Optional[int] = None,
        ema_decay: Optional[float] = 0.999,
        val_sampler: str = "ddpm",
        val_steps: int = 10,
        val_noise_level: int = 0,
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
        scheduler: Optional[Callable[..., Any]] = None,
    ):
        super().__init__()
        _check_parameterization(parameterization)
        if not target_scale > 0:
            raise ValueError(f"target_scale must be positive, got {target_scale}.")
        self.scale = check_scale(scale)
        self.noise_aug_schedule = NoiseSchedule.from_config(**(noise_aug_schedule or NOISE_AUG_SCHEDULE))
        if isinstance(max_noise_level, bool) or not 0 <= int(max_noise_level) < self.noise_aug_schedule.num_timesteps:
            raise ValueError(f"max_noise_level must lie in [0, {self.noise_aug_schedule.num_timesteps - 1}] (the "
                             f"augmentation schedule's steps), got {max_noise_level}.")
        self._check_unet_config(unet_config, int(max_noise_level))
        self.model = nn.ModuleDict({"diffusion_model": UNetModel(**unet_config)})
        if train_crop is not None:
            if train_crop % self.scale:
                raise ValueError(f"train_crop={train_crop} must be a multiple of scale={self.scale}.")
            self.check_size(train_crop, train_crop)
        self.model_ema = EMA(self.model, decay=ema_decay) if ema_decay else None
        self.schedule = NoiseSchedule.from_config(**(schedule or {}))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])

    # ------------------------------------------------------------------ public surface
    @property
    def unet(self) -> UNetModel:
        return self.model["diffusion_model"]

    @property
    def ema_unet(self) -> Optional[UNetModel]:
        return None if self.model_ema is None else self.model_ema.shadow["diffusion_model"]

    def sampling_unet(self, use_ema: bool = True) -> UNetModel:
        """The U-Net used for sampling: EMA weights when available and requested."""
        return self.ema_unet if (use_ema and self.ema_unet is not None) else self.unet

    def check_size(self, height: int, width: int) -> None:
        """Refuse a high-res size the U-Net cannot downsample and restore exactly."""
        factor = 2 ** (len(self.unet.channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"The upscaled size {height}x{width} is not divisible by {factor} (the U-Net's downsampling, "
                f"channel_mult={self.unet.channel_mult}): crop the input so that each side times {self.scale} is a "
                f"multiple of {factor}.")

    def condition(self, low: Tensor, levels: Tensor, generator: Optional[torch.Generator] = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """low [B, 3, h, w] and noise levels [B] -> (concat [B, 3, H, W]: the noised low-res image upsampled,
        y: the level's U-Net embedding input, base [B, 3, H, W]: bicubic of the clean low-res image)."""
        augmented = noise_augment(low, levels, self.noise_aug_schedule, generator)  # [B, 3, h, w]
        concat = bicubic_upsample(augmented, self.scale)
        base = bicubic_upsample(low, self.scale)
        return concat, noise_level_condition(self.unet, levels), base

    def to_target(self, images: Tensor, base: Tensor) -> Tensor:
        """What is diffused: the residual over bicubic (or the image), times target_scale. [B, 3, H, W]."""
        return (images - base if self.hparams.residual else images) * self.hparams.target_scale

    def from_target(self, sample: Tensor, base: Tensor) -> Tensor:
        """Inverse of ``to_target``: a sample of the diffused quantity -> the image. [B, 3, H, W]."""
        sample = sample / self.hparams.target_scale
        return sample + base if self.hparams.residual else sample

    @torch.no_grad()
    def upscale(self, low_res: Tensor, **kwargs) -> Tensor:
        """``ldm.upscale.upscale`` on this model: [B, 3, h, w] in [-1, 1] -> [B, 3, h * s, w * s]."""
        return upscale(self, low_res, **kwargs)

    # ------------------------------------------------------------------ set-up checks
    @staticmethod
    def _check_unet_config(unet_config: dict, max_noise_level: int) -> None:
        if unet_config.get("in_channels") != 6 or unet_config.get("out_channels") != 3:
            raise ValueError(
                f"The upscaler's U-Net takes the noisy image and the upsampled low-res image (3 + 3 channels) and "
                f"predicts 3: set model.unet_config.in_channels=6 and out_channels=3 (got "
                f"{unet_config.get('in_channels')} and {unet_config.get('out_channels')}).")
        if unet_config.get("context_dim") is not None or unet_config.get("use_spatial_transformer"):
            raise ValueError("The upscaler is not text-conditioned: set model.unet_config.context_dim=null and "
                             "use_spatial_transformer=false.")
        num_classes = unet_config.get("num_classes")
        if num_classes != "sequential" and (not isinstance(num_classes, int) or num_classes <= max_noise_level):
            raise ValueError(
                f"The noise level enters through the U-Net's class embedding: set model.unet_config.num_classes to "
                f"an int > max_noise_level={max_noise_level} (a table, as SD's 1000) or to 'sequential' with "
                f"adm_in_channels (sinusoidal level features); got num_classes={num_classes!r}.")

    # ------------------------------------------------------------------ training
    def diffusion_step(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Degrade, noise-augment, noise the residual and regress the target; returns the loss."""
        images = images.float()
        low = area_downsample(images, self.scale)  # [B, 3, h, w]
        self.check_size(*images.shape[2:])
        batch, device = images.shape[0], images.device
        rng_device = generator.device if generator is not None else device
        levels = torch.randint(0, self.hparams.max_noise_level + 1, (batch,), generator=generator,
                               device=rng_device).to(device)  # [B]
        concat, y, base = self.condition(low, levels, generator)
        x0 = self.to_target(images, base)  # [B, 3, H, W]
        t = sample_timesteps(batch, self.schedule.num_timesteps, generator=generator, device=rng_device).to(device)
        noise = torch.randn(x0.shape, generator=generator, device=rng_device).to(device)
        x_t = self.schedule.q_sample(x0, t, noise)
        pred = self.unet(x_t, t, y=y, concat=concat)
        parameterization = self.hparams.parameterization
        target = self.schedule.target(x0, noise, t, parameterization)
        weights = loss_weights(self.schedule, t, parameterization, self.hparams.loss_weighting, self.hparams.snr_gamma)
        return diffusion_loss(pred.float(), target.float(), weights)

    def random_crop(self, images: Tensor) -> Tensor:
        """Random ``train_crop`` x ``train_crop`` patches, one per image, offsets on the low-res grid (multiples of
        ``scale``, so downsampling the crop equals cropping the downsampled image). [B, 3, H, W] -> [B, 3, c, c]."""
        crop = self.hparams.train_crop
        height, width = images.shape[2:]
        if crop is None or (crop == height and crop == width):
            return images
        if crop > min(height, width):
            raise ValueError(f"train_crop={crop} exceeds the training images ({height}x{width}); lower "
                             f"model.train_crop or set it to null.")
        s = self.scale
        rows = torch.randint(0, (height - crop) // s + 1, (images.shape[0],)) * s  # CPU RNG: seeded, no sync
        cols = torch.randint(0, (width - crop) // s + 1, (images.shape[0],)) * s
        return torch.stack([img[:, r:r + crop, c:c + crop] for img, r, c in zip(images, rows.tolist(), cols.tolist())])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.diffusion_step(self.random_crop(batch["image"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.model_ema is not None:
            self.model_ema.update(self.model)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """val/loss at fixed noise, and the PSNR of a quick upscale against bicubic on the same images."""
        images = batch["image"].float()  # [B, 3, H, W]
        size = images.shape[0]
        generator = torch.Generator(device=images.device).manual_seed(1000 + batch_idx)
        ema_weights = self.model_ema.swapped_into(self.model) if self.model_ema is not None else nullcontext()
        with ema_weights:
            loss = self.diffusion_step(images, generator=torch.Generator(images.device).manual_seed(batch_idx))
            low = area_downsample(images, self.scale)
            ours = upscale(self, low, sampler=self.hparams.val_sampler, steps=self.hparams.val_steps,
                           noise_level=self.hparams.val_noise_level, generator=generator, use_ema=False)
        psnr = psnr_per_image(ours, images).mean()
        psnr_bicubic = psnr_per_image(bicubic_upsample(low, self.scale), images).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/psnr", psnr, prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/psnr_bicubic", psnr_bicubic, sync_dist=True, batch_size=size)
        self.log("val/psnr_margin", psnr - psnr_bicubic, sync_dist=True, batch_size=size)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("No optimizer configured: set model.optimizer (a _partial_ torch.optim class).")
        optimizer = build_optimizer(self.optimizer_factory, self.unet)
        scheduler = build_scheduler(self.scheduler_factory, optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def load_upscaler(path: str, map_location: str = "cpu") -> Upscaler:
    """Load an ``Upscaler`` checkpoint safely (weights_only); a clear error for other checkpoints."""
    ckpt = load_checkpoint(path, map_location)
    hparams = ckpt.get("hyper_parameters", {})
    if "unet_config" not in hparams or "scale" not in hparams or "first_stage_config" in hparams:
        raise ValueError(
            f"{path} is not an upscaler checkpoint (its hyper-parameters lack unet_config and scale, or describe a "
            f"latent-diffusion model). Pass checkpoints/last.ckpt of a `*_upscaler_*` run "
            f"(python train.py experiment=shapes_upscaler_x4).")
    model = Upscaler(**hparams)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
