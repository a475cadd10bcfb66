"""Stage 0 (optional): contrastive image-text pre-training of an open_clip model (Radford et al. 2021).

Trains the text tower that later conditions the U-Net, on the same image-caption shards:

    images [-1, 1] --CLIP normalisation--> visual --> f_img [B, E] (unit norm)
    captions --BPE--> text transformer --> f_txt [B, E] (unit norm)
    loss = (CE(s * f_img f_txt^T, I) + CE(s * f_txt f_img^T, I)) / 2          (open_clip ClipLoss)

State-dict keys are ``model.*`` (the open_clip ``CLIP``), so a checkpoint of this module is read by
``OpenCLIPTextEncoder(arch=..., pretrained="<run>/checkpoints/last.ckpt")`` (text tower only).

Validation measures, over all validation batches of the epoch (per rank under DDP):
  - ``val/i2t_top1``: the nearest caption of each image is its own caption (string equality, so
    repeated captions count as correct); ``val/t2i_top1`` the same from text to image;
    ``val/retrieval_chance``: the accuracy of a uniformly random pick.
  - ``val/zero_shot_top1`` (when ``zero_shot`` is set): classification of each image among the
    prompts ``template.format(class)``; an image's label is the class whose keywords occur in its
    caption (captions matching no class or several are skipped and counted in ``val/zero_shot_skipped``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import lightning as L
import open_clip
import torch
import torch.nn.functional as F

from ldm.modules.clip_configs import create_clip_model
from ldm.modules.conditioning import PromptTokenizer, text_transformer
from ldm.optim import build_optimizer, build_scheduler
from ldm.utils.step_logging import writes_step_metrics


def _zero_shot_classes(spec: Union[Sequence[str], Mapping[str, Sequence[str]]]) -> dict[str, list[str]]:
    """Class name -> keywords (lower case); a list of names uses each name as its only keyword."""
    if isinstance(spec, Mapping):
        return {str(name): [str(k).lower() for k in keywords] for name, keywords in spec.items()}
    return {str(name): [str(name).lower()] for name in spec}


class CLIPModule(L.LightningModule):
    """Contrastive training of ``open_clip`` architecture ``arch`` from scratch.

    Args:
        arch: open_clip architecture name (e.g. "ldm-tiny-clip", see ``ldm.modules.clip_configs``).
        quick_gelu: QuickGELU activations (as OpenAI's CLIP).
        zero_shot: optional ``{"template": "a {}", "classes": [names] | {name: [keywords]}}``.
        logit_scale_max: upper clamp of the learned temperature ``exp(logit_scale)`` (CLIP: 100).
        optimizer / scheduler: Hydra partials, completed in ``configure_optimizers``.
    """

    def __init__(
        self,
        arch: str = "ldm-tiny-clip",
        quick_gelu: bool = False,
        zero_shot: Optional[Mapping[str, Any]] = None,
        logit_scale_max: float = 100.0,
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
        scheduler: Optional[Callable[..., Any]] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model = create_clip_model(arch, quick_gelu=quick_gelu)
        self.tokenizer = PromptTokenizer(arch, context_length=self.model.context_length)
        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        self.register_buffer("pixel_mean", torch.tensor(preprocess["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(preprocess["std"]).view(1, 3, 1, 1), persistent=False)
        size = self.model.visual.image_size  # an int (ModifiedResNet) or a pair (ViT)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.loss_fn = open_clip.ClipLoss()
        self.zero_shot = None
        if zero_shot is not None:
            if "template" not in zero_shot or "classes" not in zero_shot:
                raise ValueError("zero_shot needs 'template' (e.g. 'a {}') and 'classes' (names or {name: keywords}).")
            self.zero_shot = (str(zero_shot["template"]), _zero_shot_classes(zero_shot["classes"]))
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:  # open_clip's recommended DDP setting
            self.loss_fn = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                                              rank=self.trainer.global_rank, world_size=self.trainer.world_size)

    # ------------------------------------------------------------------ features
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> CLIP input at the model's resolution, normalised with its mean/std."""
        x = (images.float() + 1.0) / 2.0
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [B, E] of images in [-1, 1] (e.g. for CLIP score)."""
        return self.model.encode_image(self.preprocess(images), normalize=True)

    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings [B, E] (equal to open_clip's ``encode_text(..., normalize=True)``)."""
        tokens = self.tokenizer(captions)  # [B, 77] on the CPU
        tokens = tokens[:, : int(tokens.argmax(dim=1).max()) + 1]  # trailing padding cannot reach EOT (causal)
        _, _, pooled = text_transformer(self.model, tokens.to(self.device))
        return F.normalize(pooled, dim=-1)

    def contrastive_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, image features, text features) of a batch {"image", "caption"}."""
        images, captions = batch["image"], batch["caption"]
        if len(captions) < 2:
            raise ValueError("Contrastive training needs at least 2 image-caption pairs per batch.")
        img, txt = self.image_features(images), self.text_features(captions)
        return self.loss_fn(img, txt, self.model.logit_scale.exp()), img, txt

    # ------------------------------------------------------------------ loops
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self.contrastive_loss(batch)
        bs = len(batch["caption"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if writes_step_metrics(self.trainer):  # only the loggers read it
            self.log("train/logit_scale", self.model.logit_scale.detach().exp(), batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # CLIP clamps the temperature so the logits cannot explode
            self.model.logit_scale.clamp_(0, math.log(self.hparams.logit_scale_max))

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        loss, img, txt = self.contrastive_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["caption"]))
        # features in fp32 whatever the precision (bf16-mixed gives bf16): the epoch-end metrics multiply them with
        # class features computed outside autocast
        self._val_outputs.append((img.float(), txt.float(), list(batch["caption"])))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        img = torch.cat([o[0] for o in self._val_outputs])  # [N, E]
        txt = torch.cat([o[1] for o in self._val_outputs])  # [N, E]
        captions = [c for o in self._val_outputs for c in o[2]]
        self._val_outputs = []
        for name, value in retrieval_metrics(img, txt, captions).items():
            self.log(f"val/{name}", value, sync_dist=True)
        if self.zero_shot is not None:
            for name, value in self._zero_shot_metrics(img, captions).items():
                self.log(f"val/{name}", value, sync_dist=True)

    def _zero_shot_metrics(self, img: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        template, classes = self.zero_shot
        labels = caption_labels(captions, classes)  # [N], -1 = no unique class
        keep = labels >= 0
        class_features = self.text_features([template.format(name) for name in classes]).float()  # [K, E]
        pred = (img[keep] @ class_features.T).argmax(dim=1).cpu()
        acc = (pred == labels[keep]).float().mean() if keep.any() else torch.tensor(float("nan"))
        return {"zero_shot_top1": acc, "zero_shot_chance": torch.tensor(1.0 / len(classes)),
                "zero_shot_skipped": (~keep).sum().float()}

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("No optimizer configured: set model.optimizer (a _partial_ torch.optim class).")
        optimizer = build_optimizer(self.optimizer_factory, self.model)
        scheduler = build_scheduler(self.scheduler_factory, optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Top-1 image->text and text->image retrieval among N pairs (unit-norm features [N, E]).

    A retrieved item is correct when its caption equals the query's caption.
    """
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions], device=img.device)
    same = ids[:, None] == ids[None, :]  # [N, N]: pair (image i, text j) has matching captions
    sim = img @ txt.T  # [N images, N texts]
    rows = torch.arange(len(captions), device=img.device)
    return {
        "i2t_top1": same[rows, sim.argmax(dim=1)].float().mean(),
        "t2i_top1": same[sim.argmax(dim=0), rows].float().mean(),
        "retrieval_chance": same.float().mean(),
    }


def caption_labels(captions: Sequence[str], classes: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """Index of the one class whose keyword occurs (as whole words) in each caption; -1 if none or several."""
    patterns = [re.compile("|".join(rf"\b{re.escape(k)}\b" for k in kws)) for kws in classes.values()]
    labels = []
    for caption in captions:
        hits = [k for k, pattern in enumerate(patterns) if pattern.search(caption.lower())]
        labels.append(hits[0] if len(hits) == 1 else -1)
    return torch.tensor(labels, dtype=torch.long)
