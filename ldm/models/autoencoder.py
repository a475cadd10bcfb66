"""Stage 1: the KL-regularised autoencoder (Rombach et al. 2022, sec. 3.1) as a LightningModule.

State-dict keys match SD's ``first_stage_model.*``: ``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*``; the training loss (discriminator) lives under ``loss.*`` and is optional on load.
Two persistent buffers, ``latent_mean`` and ``latent_std`` [embed_dim], hold the per-channel statistics of
the posterior mode over the last validation set; the diffusion stage normalises latents with them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.checkpoints import load_state_dict
from ldm.convert.vae import extract_vae_state_dict
from ldm.modules.autoencoder import Decoder, DiagonalGaussianDistribution, Encoder
from ldm.modules.losses import AutoencoderLoss
from ldm.optim import build_optimizer, build_scheduler, clip_gradients_
from ldm.utils.image_logging import log_image_grid
from ldm.utils.step_logging import writes_step_metrics

_LOSS_PREFIX = "loss."
_FROZEN_PREFIX = "loss.perceptual_loss."  # LPIPS/VGG: rebuilt from local files, never saved
_LATENT_STATS = ("latent_mean", "latent_std")
_RGB_PREFIX = "latent_to_rgb."


class AutoencoderKL(L.LightningModule):
    """KL autoencoder with optional LPIPS and PatchGAN terms, trained with manual optimisation.

    Args:
        ddconfig: SD ``ddconfig`` (see ``ldm.modules.autoencoder.Encoder``); ``double_z`` must be true.
        embed_dim: latent channels after ``quant_conv`` (SD: 4).
        loss: keyword arguments of ``ldm.modules.losses.AutoencoderLoss``; ``None`` builds no loss
            (inference only, like SD's ``lossconfig: torch.nn.Identity``).
        optimizer: partial optimizer for encoder/decoder (Hydra ``_partial_: true``).
        disc_optimizer: partial optimizer for the discriminator; defaults to ``optimizer``.
        scheduler: partial LR scheduler, applied to each optimizer and stepped once per generator step.
        grad_clip: max global gradient norm per optimizer step (``None``: no clipping, norm still logged).
        image_key: batch entry with images [B, C, H, W] in [-1, 1].
        monitor: metric the checkpoint callback should follow (informational).
        ckpt_path: initial weights (SD / latent-diffusion single file, diffusers VAE or own checkpoint).
        num_log_images: images in the validation reconstruction grid.
        decoder_noise: during training, Gaussian noise of this many per-channel latent standard deviations is
            added to the posterior sample before decoding, so the decoder learns to map slightly-off latents
            (what a diffusion model generates) to clean images (0: off, as SD; validation decodes the mode).
        latent_rgb_weight: weight of a linear-colour term: a 1x1 conv ``latent_to_rgb`` (embed_dim -> out_ch),
            trained with the autoencoder, must predict the image average-pooled by f from the posterior mean
            (squared error summed per image, like the pixel loss). It makes colour a linear function of the
            latent channels, which stage 2 separates more easily (0: off, as SD; no extra tensors then). A small
            case of aligning latents with a target through a learned projection, as VA-VAE (Yao et al. 2025) does
            with vision-foundation-model features; docs/autoencoder.md, "A linear colour term".

    ``trainer.global_step`` (and so ``max_steps``) counts generator steps: the discriminator steps
    through the strategy directly, without advancing Lightning's step counter.
    """

    def __init__(
        self,
        ddconfig: dict,
        embed_dim: int,
        loss: dict | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        disc_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        grad_clip: float | None = None,
        image_key: str = "image",
        monitor: str = "val/psnr",
        ckpt_path: str | None = None,
        num_log_images: int = 8,
        decoder_noise: float = 0.0,
        latent_rgb_weight: float = 0.0,
    ):
        super().__init__()
        # Plain containers keep the checkpoint loadable with torch.load(weights_only=True).
        ddconfig = _to_builtin(ddconfig)
        loss = _to_builtin(loss)
        self.save_hyperparameters(ignore=["optimizer", "disc_optimizer", "scheduler", "ckpt_path"])
        self.automatic_optimization = False
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z=true (the encoder predicts mean and log-variance)")
        self._optimizer = optimizer
        self._disc_optimizer = disc_optimizer
        self._scheduler = scheduler
        self.grad_clip = grad_clip
        self.image_key = image_key
        self.monitor = monitor
        self.num_log_images = num_log_images
        if decoder_noise < 0:
            raise ValueError(f"decoder_noise must be >= 0 (latent standard deviations), got {decoder_noise}.")
        self.decoder_noise = decoder_noise
        if latent_rgb_weight < 0:
            raise ValueError(f"latent_rgb_weight must be >= 0, got {latent_rgb_weight}.")
        self.latent_rgb_weight = latent_rgb_weight

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
        # latent [B, embed_dim, h, w] -> image average-pooled by f [B, out_ch, h, w]; only with latent_rgb_weight
        self.latent_to_rgb = nn.Conv2d(embed_dim, ddconfig["out_ch"], 1) if latent_rgb_weight > 0 else None
        self.loss = None if loss is None else AutoencoderLoss(**{"disc_in_channels": ddconfig["out_ch"], **loss})

        # NaN until measured: a consumer can tell "never measured" from a real (0, 1).
        self.register_buffer("latent_mean", torch.full((embed_dim,), float("nan")))
        self.register_buffer("latent_std", torch.full((embed_dim,), float("nan")))
        self._latent_moments: torch.Tensor | None = None  # [2 * embed_dim + 1]: sum, sum of squares, count

        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path)

    # ------------------------------------------------------------------ model
    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x: [B, C, H, W] in [-1, 1] -> posterior over z [B, embed_dim, H/f, W/f]."""
        moments = self.quant_conv(self.encoder(x))  # [B, 2 * embed_dim, h, w]
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, embed_dim, h, w] -> image [B, out_ch, h*f, w*f] (approximately in [-1, 1])."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @property
    def has_latent_stats(self) -> bool:
        """True once ``latent_mean`` / ``latent_std`` hold measured values."""
        return bool(torch.isfinite(self.latent_mean).all() and torch.isfinite(self.latent_std).all())

    def get_input(self, batch: Mapping) -> torch.Tensor:
        if not isinstance(batch, Mapping) or self.image_key not in batch:
            found = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(f"Batch must be a dict with '{self.image_key}' (model.image_key); got {found}.")
        x = batch[self.image_key]
        expected = self.hparams.ddconfig["in_channels"]
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != expected or not x.is_floating_point():
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(
                f"batch['{self.image_key}'] must be a float tensor [B, {expected}, H, W] in [-1, 1]; got {shape}."
            )
        return x

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping, batch_idx: int) -> None:
        if self.loss is None:
            raise RuntimeError("AutoencoderKL was built with loss=None (inference only); give model.loss to train.")
        x = self.get_input(batch)  # [B, C, H, W]
        g_opt, d_opt = self._generator_and_discriminator_optimizers()
        use_gan = self.loss.gan_active(self.global_step)

        with self.toggled_optimizer(g_opt):
            posterior = self.encode(x)
            x_rec = self.decode(self._noised_for_decoder(posterior.sample()))
            loss, logs = self.loss.generator_loss(
                x, x_rec, posterior, last_layer=self.decoder.conv_out.weight, use_gan=use_gan
            )
            if self.latent_to_rgb is not None:
                rgb_loss = self.latent_rgb_loss(x, posterior.mode())
                loss = loss + self.latent_rgb_weight * rgb_loss
                logs.update(latent_rgb_loss=rgb_loss.detach(), total_loss=loss.detach())
            g_opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            g_opt.step()  # advances trainer.global_step by one
        schedulers = self._schedulers()  # [autoencoder, discriminator] when configured
        if schedulers:
            schedulers[0].step()

        if use_gan:
            with self.toggled_optimizer(d_opt):
                d_loss, d_logs = self.loss.discriminator_loss(x, x_rec.detach())
                d_opt.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
                # Strategy-level step: same precision/AMP handling as LightningOptimizer.step, but it does not
                # count towards global_step (Lightning issue #17958), so max_steps means generator steps.
                self.trainer.strategy.optimizer_step(d_opt.optimizer, closure=lambda: None)
            if len(schedulers) > 1:
                schedulers[1].step()
            logs.update(d_logs)

        batch_size = x.shape[0]
        self.log("train/rec_loss", logs.pop("rec_loss"), prog_bar=True, batch_size=batch_size)
        if writes_step_metrics(self.trainer):  # the other terms only reach the loggers: ~2 ms a step saved
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)
            self.log("train/lr", g_opt.param_groups[0]["lr"], batch_size=batch_size)

    def latent_rgb_loss(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Squared error of ``latent_to_rgb(z)`` [B, out_ch, h, w] against x [B, out_ch, H, W] average-pooled by
        f, summed per image and averaged over the batch (the scale of the pixel loss, per latent cell)."""
        target = nn.functional.avg_pool2d(x, self.downsample_factor)  # [B, out_ch, h, w]
        return (self.latent_to_rgb(z) - target).pow(2).sum() / x.shape[0]

    def _noised_for_decoder(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] plus N(0, (decoder_noise * std_c)^2) per channel c (batch std, no gradient through it)."""
        if self.decoder_noise == 0:
            return z
        channel_std = z.detach().std(dim=(0, 2, 3), keepdim=True)  # [1, C, 1, 1]
        return z + self.decoder_noise * channel_std * torch.randn_like(z)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip (after AMP unscaling) the global gradient norm of the optimizer about to step; log it on the
        batches whose metrics reach the loggers."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = clip_gradients_(params, self.grad_clip)
        if writes_step_metrics(self.trainer):
            g_opt, _ = self._generator_and_discriminator_optimizers()
            name = "train/grad_norm" if optimizer is g_opt.optimizer else "train/disc_grad_norm"
            self.log(name, norm)

    def _generator_and_discriminator_optimizers(self):
        optimizers = self.optimizers()
        if isinstance(optimizers, (list, tuple)):
            return optimizers[0], (optimizers[1] if len(optimizers) > 1 else None)
        return optimizers, None

    def _schedulers(self) -> list:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers]

    def configure_optimizers(self):
        if self._optimizer is None:
            raise ValueError("AutoencoderKL needs model.optimizer (a partial optimizer, _partial_: true) to train.")
        parts = [self.encoder, self.decoder, self.quant_conv, self.post_quant_conv]
        autoencoder = nn.ModuleList(parts + ([self.latent_to_rgb] if self.latent_to_rgb is not None else []))
        optimizers = [build_optimizer(self._optimizer, autoencoder)]
        if self.loss is not None and self.loss.discriminator is not None:
            optimizers.append(build_optimizer(self._disc_optimizer or self._optimizer, self.loss.discriminator))
        names = ("lr-autoencoder", "lr-discriminator")
        schedulers = [build_scheduler(self._scheduler, opt, name) for opt, name in zip(optimizers, names)]
        return optimizers, [s for s in schedulers if s is not None]

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._latent_moments = torch.zeros(2 * self.embed_dim + 1, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        x = self.get_input(batch)  # [B, C, H, W]
        posterior = self.encode(x)
        z = posterior.mode()  # [B, embed_dim, h, w]: deterministic reconstruction for the metrics
        x_rec = self.decode(z)
        batch_size = x.shape[0]
        pixel = (x - x_rec).abs() if self.loss is None else self.loss.pixel_loss(x, x_rec)
        self.log("val/rec_loss", pixel.mean(), batch_size=batch_size, sync_dist=True)
        self.log("val/kl_loss", posterior.kl().mean(), batch_size=batch_size, sync_dist=True)
        if self.latent_to_rgb is not None:
            self.log("val/latent_rgb_loss", self.latent_rgb_loss(x, z), batch_size=batch_size, sync_dist=True)

        x01, rec01 = _to_unit(x), _to_unit(x_rec)  # [B, C, H, W] in [0, 1]
        self.val_psnr.update(rec01, x01)
        self.val_ssim.update(rec01, x01)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=batch_size)
        self.log("val/ssim", self.val_ssim, batch_size=batch_size)

        z64 = z.detach().to(torch.float64).transpose(0, 1).flatten(1)  # [embed_dim, B*h*w]
        count = torch.tensor([z64.shape[1]], dtype=torch.float64, device=z.device)
        self._latent_moments += torch.cat([z64.sum(1), z64.pow(2).sum(1), count])

        if batch_idx == 0 and not self.trainer.sanity_checking:
            n = min(self.num_log_images, batch_size)
            captions = list(batch.get("caption") or ["input"] * batch_size)[:n]
            log_image_grid(
                self.trainer,
                "val/reconstructions",
                torch.cat([x01[:n], rec01[:n]]),  # row 1: inputs, row 2: reconstructions
                step=self.global_step,
                captions=captions + ["reconstruction"] * n,
                ncol=n,
            )

    def on_validation_epoch_end(self) -> None:
        """Store per-channel mean / std of the posterior mode over the (all-rank) validation set."""
        moments, self._latent_moments = self._latent_moments, None
        if moments is None or self.trainer.sanity_checking:
            return
        moments = self.trainer.strategy.reduce(moments, reduce_op="sum")
        count = moments[-1]
        if count == 0:
            return
        mean = moments[: self.embed_dim] / count
        var = moments[self.embed_dim : 2 * self.embed_dim] / count - mean.pow(2)
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(var.clamp_min(0).sqrt())

    # ------------------------------------------------------------------ checkpoints
    def init_from_ckpt(self, path: str) -> None:
        """Load autoencoder weights; loss (discriminator) tensors load only where they fit.

        Accepts an SD / latent-diffusion single file (``first_stage_model.*``), a diffusers VAE state dict
        or a checkpoint of this class. Encoder/decoder tensors must all be present.
        """
        state = extract_vae_state_dict(load_state_dict(path))
        state = self._reconcile_optional(state)
        if self.latent_to_rgb is None:  # a colour head trained elsewhere: not part of this autoencoder
            state = {k: v for k, v in state.items() if not k.startswith(_RGB_PREFIX)}
        missing, unexpected = self.load_state_dict(state, strict=False)
        # a new colour head starts from scratch on SD / diffusers weights
        optional = (_LOSS_PREFIX, _RGB_PREFIX)
        missing = [k for k in missing if k not in _LATENT_STATS and not k.startswith(optional)]
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match this autoencoder (check ddconfig / embed_dim): "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
            )
        rank_zero_info(f"AutoencoderKL: loaded {len(state)} tensors from {path}.")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_FROZEN_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = self._reconcile_optional(checkpoint["state_dict"], fill_missing=True)

    def _reconcile_optional(self, state: dict, fill_missing: bool = False) -> dict:
        """Fit the optional ``loss.*`` tensors of ``state`` to this instance's loss module.

        Drops loss tensors this instance has no slot for (or of another shape); with ``fill_missing``, takes
        this instance's own values for loss tensors the checkpoint lacks (e.g. the frozen LPIPS network).
        """
        own = self.state_dict()
        kept = {
            k: v
            for k, v in state.items()
            if not k.startswith(_LOSS_PREFIX) or (k in own and own[k].shape == v.shape)
        }
        dropped = len(state) - len(kept)
        if dropped:
            rank_zero_info(f"AutoencoderKL: ignoring {dropped} loss tensors that this loss config does not use.")
        if fill_missing:
            kept.update({k: v for k, v in own.items() if k.startswith(_LOSS_PREFIX) and k not in kept})
        return kept


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (metrics expect the data range)."""
    return ((x.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _to_builtin(obj: Any) -> Any:
    """Mappings -> dict and sequences -> list, recursively (e.g. OmegaConf containers from Hydra)."""
    if isinstance(obj, Mapping):
        return {str(k): _to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_to_builtin(v) for v in obj]
    return obj
