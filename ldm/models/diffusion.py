"""Stage 2: latent diffusion (Rombach et al. 2022) as a LightningModule that composes blocks.

    image --first_stage.encode--> z --normalise--> z0 --q_sample(t, eps)--> z_t
    caption --(dropped to "" with p for CFG)--> cond_stage.encode --> context [B, 77, D] (+ pooled y [B, E])
    unet(z_t, t, context, y) --> eps / v / x0 prediction --> (min-SNR weighted) MSE

State-dict layout follows the original SD checkpoints: ``model.diffusion_model.*`` (U-Net),
``first_stage_model.*`` (autoencoder), ``cond_stage_model.*`` (text encoder), ``model_ema.*``; a trainable text
encoder (``cond_stage_config.freeze=false``, as CompVis' text-to-image LDM trained its BERT) also gets an EMA,
``cond_stage_ema.*``, so that samples pair the EMA U-Net with the EMA text encoder it was averaged against.
The checkpoint is self-contained: the first stage and text encoder configs are stored in its
hyper-parameters and their weights in its state dict, so loading it reads no other file.
"""

from __future__ import annotations

import copy
import logging
from contextlib import ExitStack
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import nn

from ldm.checkpoints import load_checkpoint
from ldm.diffusion.loss import diffusion_loss, loss_weights, sample_timesteps
from ldm.diffusion.schedule import NoiseSchedule, sample_noise
from ldm.models.first_stage import FirstStage
from ldm.models.latent_source import autoencoder_identity, check_latent_sources
from ldm.models.text_cache import CachedTextConditioning
from ldm.modules.conditioning import OpenCLIPTextEncoder
from ldm.modules.ema import EMA
from ldm.modules.unet import UNetModel
from ldm.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

LATENT_NORMS = ("per_channel", "whiten", "global", "none")


class LatentDiffusion(L.LightningModule):
    """Text-to-image latent diffusion.

    Args:
        unet_config: ``UNetModel`` keyword arguments (SD ``unet_config.params`` names).
        cond_stage_config: ``OpenCLIPTextEncoder`` keyword arguments (arch, pretrained, layer, freeze).
        first_stage_config: ``{"ckpt_path": str}`` of a trained autoencoder checkpoint, or
            ``{"ddconfig": ..., "embed_dim": ...}`` (filled in automatically when a checkpoint is read).
        schedule: ``make_betas`` arguments plus ``zero_terminal_snr``.
        parameterization: what the U-Net predicts: "eps" | "v" | "x0".
        loss_weighting / snr_gamma: "uniform" or "min_snr" (Hang et al. 2023) with gamma.
        offset_noise: strength of per-channel offset noise (0 disables).
        cond_drop_prob: probability of replacing a caption by "" (classifier-free guidance training).
        latent_norm: "per_channel" (autoencoder's stored mean/std per channel), "whiten" (per channel, then the
            channels decorrelated, ZCA, measured on the first training batch), "global" (one std over all
            channels, no shift, SD style), or "none". ``scale_factor`` (e.g. 0.18215) overrides with a fixed scale.
        ema_decay: EMA decay of the U-Net (None disables EMA).
        timestep_range: [t_min, t_max) sampled during training (curriculum can change it).
        concat_channels: extra U-Net input channels concatenated to the latents (upscaling, inpainting).
        lora: ``{rank, alpha, dropout, target_modules}``: train only LoRA adapters on the U-Net's attention
            projections (``ldm/lora.py``; needs ``ema_decay=None`` and a frozen text encoder). None: all weights train.
    """

    def __init__(
        self,
        unet_config: dict,
        cond_stage_config: dict,
        first_stage_config: dict,
        schedule: Optional[dict] = None,
        parameterization: str = "eps",
        loss_weighting: str = "min_snr",
        snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        cond_drop_prob: float = 0.1,
        latent_norm: str = "per_channel",
        scale_factor: Optional[float] = None,
        ema_decay: Optional[float] = 0.9999,
        timestep_range: Optional[list[int]] = None,
        concat_channels: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        lora: Optional[dict] = None,
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
        scheduler: Optional[Callable[..., Any]] = None,
    ):
        super().__init__()
        if parameterization not in ("eps", "v", "x0"):
            raise ValueError(f"parameterization must be 'eps', 'v' or 'x0', got {parameterization!r}.")
        if latent_norm not in LATENT_NORMS:
            raise ValueError(f"latent_norm must be one of {', '.join(map(repr, LATENT_NORMS))}, got {latent_norm!r}.")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1), got {cond_drop_prob}.")
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

        # --- first stage (frozen autoencoder) ---
        self.first_stage_model = FirstStage.from_config(first_stage_config)
        first_stage_config = dict(self.first_stage_model.config)  # completed with ddconfig/embed_dim
        # --- text encoder ---
        self.cond_stage_model = OpenCLIPTextEncoder(**cond_stage_config)
        # --- U-Net, wrapped so keys read model.diffusion_model.* ---
        self._check_compatible(unet_config, concat_channels, self.first_stage_model, self.cond_stage_model)
        self.model = nn.ModuleDict({"diffusion_model": UNetModel(**unet_config)})
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model_ema = EMA(self.model, decay=ema_decay) if ema_decay else None
        trainable_text = ema_decay and not self.cond_stage_model.frozen
        self.cond_stage_ema = EMA(self.cond_stage_model, decay=ema_decay) if trainable_text else None
        # not a registered sub-module: its state would repeat the U-Net's under "_compiled_unet._orig_mod.*"
        object.__setattr__(self, "_compiled_unet", torch.compile(self.unet) if compile else None)

        self.schedule = NoiseSchedule.from_config(**(schedule or {}))

        z_channels = self.first_stage_model.z_channels
        self.register_buffer("latent_shift", torch.zeros(z_channels))  # z_norm = (z - shift) * scale
        self.register_buffer("latent_scale", torch.ones(z_channels))
        # latent_norm=whiten: z_norm = mix @ ((z - shift) * scale), mix = corr^(-1/2) (ZCA); identity otherwise
        self.register_buffer("latent_mix", torch.eye(z_channels))
        self.register_buffer("latent_unmix", torch.eye(z_channels))
        self.register_buffer("latent_stats_ready", torch.tensor(False))
        self._latent_stats_ready_host: Optional[bool] = None  # host mirror of the buffer: no device sync per step
        self._init_latent_norm(latent_norm, scale_factor)

        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.hparams["first_stage_config"] = first_stage_config
        self._first_stage_identity: Optional[dict] = None  # computed on the first cached-latent batch
        self._cached_text = CachedTextConditioning()  # batches with cached text embeddings (ldm.models.text_cache)
        if lora:
            self.add_lora(lora)

    def add_lora(self, spec: dict) -> None:
        """Freeze the U-Net and inject LoRA adapters (``ldm.lora``): from here on only they train. Recorded in the
        hyper-parameters, so the checkpoint reloads with its adapters."""
        from ldm.lora import inject_lora, lora_spec

        if self.model_ema is not None or not self.cond_stage_model.frozen:
            raise ValueError("LoRA trains only the U-Net adapters, without EMA: set model.ema_decay=null and "
                             "model.cond_stage_config.freeze=true.")
        spec = lora_spec(spec)
        inject_lora(self.unet, spec)
        self.hparams["lora"] = spec

    # ------------------------------------------------------------------ public surface
    @property
    def unet(self) -> UNetModel:
        return self.model["diffusion_model"]

    @property
    def first_stage(self) -> FirstStage:
        return self.first_stage_model

    @property
    def cond_stage(self) -> OpenCLIPTextEncoder:
        return self.cond_stage_model

    @property
    def ema_unet(self) -> Optional[UNetModel]:
        return None if self.model_ema is None else self.model_ema.shadow["diffusion_model"]

    def sampling_unet(self, use_ema: bool = True) -> UNetModel:
        """The U-Net used for sampling: EMA weights when available and requested."""
        return self.ema_unet if (use_ema and self.ema_unet is not None) else self.unet

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised latents [B, C, h, w]."""
        posterior = self.first_stage_model.encode(images.to(self.first_stage_model.dtype))
        z = posterior.sample() if sample else posterior.mode()
        return self.normalize_latents(z.float())

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] (not clamped)."""
        return self.first_stage_model.decode(self.denormalize_latents(z).to(self.first_stage_model.dtype))

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents z [B, C, h, w] -> the diffusion model's latents [B, C, h, w]."""
        shift = self.latent_shift.view(1, -1, 1, 1).to(z.dtype)
        scale = self.latent_scale.view(1, -1, 1, 1).to(z.dtype)
        z = (z - shift) * scale
        if self.latent_norm == "whiten":
            z = torch.einsum("dc,bchw->bdhw", self.latent_mix.to(z.dtype), z)
        return z

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalize_latents``."""
        if self.latent_norm == "whiten":
            z = torch.einsum("dc,bchw->bdhw", self.latent_unmix.to(z.dtype), z)
        shift = self.latent_shift.view(1, -1, 1, 1).to(z.dtype)
        scale = self.latent_scale.view(1, -1, 1, 1).to(z.dtype)
        return z / scale + shift

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context [B, 77, D]."""
        return self.cond_stage_model.encode(prompts)["context"]

    @property
    def uses_pooled_text(self) -> bool:
        """Whether the U-Net also takes the pooled text embedding as y (unet_config.num_classes='sequential')."""
        return self.unet.num_classes == "sequential"

    def sampling_text_encoder(self, use_ema: bool = True) -> OpenCLIPTextEncoder:
        """The text encoder used for sampling: its EMA when it is trained (and EMA is on and requested)."""
        if use_ema and self.cond_stage_ema is not None:
            return self.cond_stage_ema.shadow
        return self.cond_stage_model

    def encode_conditioning(self, prompts: list[str], use_ema: bool = False) -> dict[str, torch.Tensor]:
        """Prompts -> the U-Net's text keyword arguments: ``context`` [B, 77, D] for cross-attention and, with
        pooled-text conditioning (SDXL style), ``y`` [B, E], the pooled embedding added to the timestep embedding."""
        out = self.sampling_text_encoder(use_ema).encode(prompts)
        cond = {"context": out["context"]}
        if self.uses_pooled_text:
            cond["y"] = out["pooled"]
        return cond

    # ------------------------------------------------------------------ set-up checks
    @staticmethod
    def _check_compatible(unet_config: dict, concat: int, first_stage: FirstStage,
                          cond_stage: OpenCLIPTextEncoder) -> None:
        expected_in = first_stage.z_channels + concat
        if unet_config.get("in_channels") != expected_in:
            raise ValueError(
                f"U-Net in_channels={unet_config.get('in_channels')} but the autoencoder has "
                f"z_channels={first_stage.z_channels} (+{concat} concat channels): set "
                f"model.unet_config.in_channels={expected_in}."
            )
        if unet_config.get("out_channels") != first_stage.z_channels:
            raise ValueError(
                f"U-Net out_channels={unet_config.get('out_channels')} but the autoencoder has "
                f"z_channels={first_stage.z_channels}: set model.unet_config.out_channels={first_stage.z_channels}."
            )
        if unet_config.get("num_classes") == "sequential" and unet_config.get("adm_in_channels") != cond_stage.embed_dim:
            raise ValueError(
                f"U-Net adm_in_channels={unet_config.get('adm_in_channels')} but the text encoder's pooled embedding "
                f"has {cond_stage.embed_dim} features: set model.unet_config.adm_in_channels={cond_stage.embed_dim}."
            )
        context_dim = unet_config.get("context_dim")
        if context_dim is not None and context_dim != cond_stage.width:
            raise ValueError(
                f"U-Net context_dim={context_dim} but the text encoder outputs width {cond_stage.width}: "
                f"set model.unet_config.context_dim={cond_stage.width}."
            )

    def _init_latent_norm(self, latent_norm: str, scale_factor: Optional[float]) -> None:
        self.latent_norm = latent_norm
        if scale_factor is not None and latent_norm == "whiten":
            raise ValueError("scale_factor fixes one scale for all channels; latent_norm='whiten' measures its own "
                             "statistics: leave scale_factor unset (null) or use latent_norm='global'.")
        if scale_factor is not None:
            self.latent_scale.fill_(float(scale_factor))
            self.latent_stats_ready.fill_(True)
            return
        if latent_norm == "none":
            self.latent_stats_ready.fill_(True)
            return
        if latent_norm == "whiten":  # needs the channels' correlations: measured on the first training batch
            return
        stats = self.first_stage_model.latent_stats()
        if stats is not None:  # otherwise estimated on the first training batch
            self._set_latent_stats(*stats)

    def _set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        std = std.clamp_min(1e-6)
        if self.latent_norm in ("per_channel", "whiten"):
            self.latent_shift.copy_(mean)
            self.latent_scale.copy_(1.0 / std)
        else:  # global: one scale, no shift (SD's 0.18215 convention)
            self.latent_shift.zero_()
            self.latent_scale.fill_(float(1.0 / std.pow(2).mean().sqrt()))
        self.latent_stats_ready.fill_(True)
        self._latent_stats_ready_host = True

    @torch.no_grad()
    def _estimate_latent_stats(self, z: torch.Tensor) -> None:
        """Per-channel statistics (and for ``whiten`` the channel correlations) from the first batch's posterior
        samples z [B, C, h, w] (un-normalised)."""
        distributed = self._trainer is not None and self.trainer.world_size > 1
        mean = z.mean(dim=(0, 2, 3))
        std = z.std(dim=(0, 2, 3))
        if distributed:
            mean = self.trainer.strategy.reduce(mean, reduce_op="mean")
            std = self.trainer.strategy.reduce(std, reduce_op="mean")
        self._set_latent_stats(mean, std)
        if self.latent_norm == "whiten":
            # [C, C] over all cells [C, B*h*w], in double: near-collinear channels are common
            corr = torch.corrcoef(z.transpose(0, 1).flatten(1).double())
            if distributed:
                corr = self.trainer.strategy.reduce(corr, reduce_op="mean")
            self._set_whitening(corr)
        log.info(f"Latent statistics from the first batch: mean {mean.tolist()}, std {std.tolist()}")

    @torch.no_grad()
    def _set_whitening(self, corr: torch.Tensor) -> None:
        """ZCA whitening of the standardised channels: mix = corr^(-1/2), unmix = corr^(1/2) (Kessy et al. 2018).
        Strongly correlated channels leave some directions of the latent space with a tiny share of the variance:
        under per-channel scaling noise buries them at the first noise levels (BENCHMARKS.md, "Stage-1 KL weight,
        decoder noise and whitened latents": on the quickstart it did not raise prompt accuracy)."""
        eigenvalues, eigenvectors = torch.linalg.eigh(corr.double())
        eigenvalues = eigenvalues.clamp_min(1e-6 * float(eigenvalues.max()))  # a degenerate direction stays finite
        self.latent_mix.copy_((eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T)
        self.latent_unmix.copy_((eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T)
        log.info(f"Latent whitening: correlation eigenvalues {eigenvalues.tolist()}")

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        self.first_stage_model.eval()
        if not self.first_stage_model.weights_loaded:
            raise RuntimeError(
                "The autoencoder (first stage) has no trained weights: set "
                "model.first_stage_config.ckpt_path to a stage-1 checkpoint (train one with "
                "`python train.py experiment=quickstart_autoencoder`), or for model=sd15|sd21_base|sd21_v "
                "set model.init_from=<SD single file or diffusers folder>."
            )

    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage_model.eval()  # frozen: dropout/norm statistics stay in eval mode
        if self.cond_stage_model.frozen:
            self.cond_stage_model.eval()
        return self

    def first_stage_identity(self) -> dict:
        """The first stage's identity as latent caches record it (cached; reset when a checkpoint loads)."""
        if self._first_stage_identity is None:
            ckpt_path = self.first_stage_model.config.get("ckpt_path")
            self._first_stage_identity = autoencoder_identity(self.first_stage_model, ckpt_path, hash_checkpoint=False)
        return self._first_stage_identity

    def _latents_from_batch(self, batch: dict) -> torch.Tensor:
        """Normalised training latents: sampled from cached moments when the batch has them, else encoded."""
        if "latent_mean" in batch:
            if "latent_source" in batch:
                check_latent_sources(batch["latent_source"], self.first_stage_identity())
            mean, logvar = batch["latent_mean"].float(), batch["latent_logvar"].float()  # [B, C, h, w]
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # z ~ q(z|x), as posterior.sample()
        else:
            with torch.no_grad():
                z = self.first_stage_model.encode(batch["image"]).sample()
        if self._latent_stats_ready_host is None:  # once after construction or a state-dict load
            self._latent_stats_ready_host = bool(self.latent_stats_ready)
        if not self._latent_stats_ready_host:
            self._estimate_latent_stats(z)
        return self.normalize_latents(z)

    def _drop_captions(self, captions: list[str]) -> list[str]:
        p = self.hparams.cond_drop_prob
        if p <= 0 or not self.training:
            return list(captions)
        keep = torch.rand(len(captions)) >= p  # CPU RNG: seeded by seed_everything, no device sync
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def diffusion_step(self, batch: dict, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """One noising + denoising pass; returns the loss and its parts."""
        z0 = self._latents_from_batch(batch)  # [B, C, h, w]
        captions = self._drop_captions(batch["caption"])
        if "text_context" in batch:  # cached text embeddings: the text encoder runs only for ""
            cond = self._cached_text(self, batch, captions)
        else:
            cond = self.encode_conditioning(captions)  # context [B, 77, D] (+ y [B, E])
        t_min, t_max = self.hparams.timestep_range or (0, self.schedule.num_timesteps)
        rng_device = generator.device if generator is not None else z0.device
        t = sample_timesteps(z0.shape[0], self.schedule.num_timesteps, t_min, t_max, generator=generator,
                             device=rng_device).to(z0.device)
        noise = sample_noise(z0.shape, offset_noise=self.hparams.offset_noise, generator=generator,
                             device=rng_device, dtype=z0.dtype).to(z0.device)
        z_t = self.schedule.q_sample(z0, t, noise)
        unet = self.unet if self._compiled_unet is None else self._compiled_unet  # a compiled module has no truth value
        if self.hparams.channels_last:
            z_t = z_t.contiguous(memory_format=torch.channels_last)
        pred = unet(z_t, t, **cond)
        target = self.schedule.target(z0, noise, t, self.hparams.parameterization)
        weights = loss_weights(self.schedule, t, self.hparams.parameterization,
                               self.hparams.loss_weighting, self.hparams.snr_gamma)
        loss = diffusion_loss(pred.float(), target.float(), weights)
        return {"loss": loss}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.diffusion_step(batch)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=len(batch["caption"]))
        return out["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.model_ema is not None:
            self.model_ema.update(self.model)
        if self.cond_stage_ema is not None:
            self.cond_stage_ema.update(self.cond_stage_model)

    def ema_weights(self) -> ExitStack:
        """Context in which the U-Net (and a trained text encoder) hold their EMA weights."""
        stack = ExitStack()
        for ema, live in ((self.model_ema, self.model), (self.cond_stage_ema, self.cond_stage_model)):
            if ema is not None:
                stack.enter_context(ema.swapped_into(live))
        return stack

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # deterministic noise and timesteps per batch so validation loss is comparable across evaluations
        generator = torch.Generator().manual_seed(1000 + batch_idx)
        with self.ema_weights():
            out = self.diffusion_step(batch, generator=generator)
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True, batch_size=len(batch["caption"]))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(2000 + batch_idx)
        out = self.diffusion_step(batch, generator=generator)
        self.log("test/loss", out["loss"], sync_dist=True, batch_size=len(batch["caption"]))

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("No optimizer configured: set model.optimizer (a _partial_ torch.optim class).")
        trainable = nn.ModuleDict({"unet": self.unet})
        if not self.cond_stage_model.frozen:
            trainable["text"] = self.cond_stage_model
        optimizer = build_optimizer(self.optimizer_factory, trainable)
        scheduler = build_scheduler(self.scheduler_factory, optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Make the checkpoint self-contained: no external weight files are read when it is loaded."""
        hparams = copy.deepcopy(dict(checkpoint.get("hyper_parameters", self.hparams)))
        hparams["first_stage_config"] = {**self.first_stage_model.config, "ckpt_path": None}
        cond = dict(hparams.get("cond_stage_config", {}))
        cond["pretrained"] = None
        hparams["cond_stage_config"] = cond
        checkpoint["hyper_parameters"] = hparams

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._latent_stats_ready_host = None  # re-read the restored latent_stats_ready on the next batch
        self._cached_text.reset()  # the text encoder's weights may change
        for name in ("latent_mix", "latent_unmix"):  # checkpoints from before latent_norm=whiten: identity
            state_dict.setdefault(prefix + name, torch.eye(self.latent_shift.numel()))
        for key in [k for k in state_dict if k.startswith(prefix + "_compiled_unet.")]:
            del state_dict[key]  # compile=true runs before 2026-12-05 saved the U-Net a second time there
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.first_stage_model.weights_loaded = True
        self._first_stage_identity = None  # the first stage's weights are about to change
        self.fill_missing_text_ema(checkpoint["state_dict"])

    def fill_missing_text_ema(self, state_dict: dict) -> None:
        """A checkpoint of a trainable text encoder saved without its EMA (older versions) starts the EMA from the
        saved text encoder, with a warning, instead of failing the strict load."""
        if self.cond_stage_ema is None or any(k.startswith("cond_stage_ema.") for k in state_dict):
            return
        log.warning("The checkpoint has no EMA of its trainable text encoder (cond_stage_ema.*): the EMA starts "
                    "from the saved text encoder weights.")
        for key in self.cond_stage_ema.state_dict():
            source = "cond_stage_model." + key.removeprefix("shadow.")
            state_dict["cond_stage_ema." + key] = (state_dict[source] if key.startswith("shadow.")
                                                   else torch.zeros((), dtype=torch.long))


def load_latent_diffusion(path: str, map_location: str = "cpu") -> LatentDiffusion:
    """Load a LatentDiffusion checkpoint safely (weights_only); a clear error for other checkpoints."""
    ckpt = load_checkpoint(path, map_location)
    hparams = ckpt.get("hyper_parameters", {})
    if "unet_config" not in hparams:
        raise ValueError(
            f"{path} is not a latent-diffusion checkpoint (no unet_config in its hyper-parameters). "
            f"Pass the checkpoint of a `*_ldm` run (checkpoints/last.ckpt); SD single-file checkpoints "
            f"are imported with scripts/convert_checkpoint.py."
        )
    model = LatentDiffusion(**hparams)
    model.fill_missing_text_ema(ckpt["state_dict"])
    model.load_state_dict(ckpt["state_dict"])
    model.first_stage_model.weights_loaded = True
    return model.eval()
