"""Evaluate a checkpoint and write metrics.json + metrics.md (a Markdown table) to the run directory.

Latent diffusion (generation metrics: prompt accuracy, CLIP score, FID/KID against real shards):

    python scripts/evaluate.py ckpt=<ldm run>/checkpoints/last.ckpt prompt_set=shapes n_per_prompt=12 \
        sampler=dpmpp_2m steps=20 cfg_scale=4 clip_ckpt=<clip run>/checkpoints/last.ckpt \
        real_shards=data/shapes32/val-000000.tar

Autoencoder (reconstruction metrics: PSNR, SSIM, rFID/rKID on the shards):

    python scripts/evaluate.py ckpt=<autoencoder run>/checkpoints/last.ckpt real_shards=data/shapes32/val-000000.tar

A sampler x steps x cfg sweep (one sub-folder per job; plot it with scripts/plot_sweep.py):

    python scripts/evaluate.py -m ckpt=... sampler=ddim,dpmpp_2m steps=5,10,20 cfg_scale=2,4
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

import ldm.utils.resolvers  # noqa: E402,F401
from ldm.evaluation.features import build_feature_extractor, load_clip_module  # noqa: E402
from ldm.evaluation.generation import evaluate_prompts, markdown_table, prompt_set, write_report  # noqa: E402
from ldm.evaluation.image_metrics import (  # noqa: E402
    clip_score,
    extract_features,
    fid_kid,
    metric_keys,
    reconstruction_metrics,
)
from ldm.evaluation.kind import checkpoint_kind  # noqa: E402
from ldm.evaluation.shard_images import shard_images  # noqa: E402
from ldm.lora import apply_adapter  # noqa: E402
from ldm.models.clip import CLIPModule  # noqa: E402
from ldm.models.diffusion import load_latent_diffusion  # noqa: E402
from ldm.models.first_stage import FirstStage  # noqa: E402
from ldm.pipeline import SamplingConfig  # noqa: E402
from ldm.utils.grid import make_grid  # noqa: E402
from ldm.utils.run import check_missing_values  # noqa: E402
from ldm.utils.sampling_io import resolve_device  # noqa: E402

NO_FEATURES = ("FID/KID skipped: no feature network. Set clip_ckpt=<stage-0 CLIP checkpoint> (CLIP features) or "
               "inception_weights=<local InceptionV3 weights> (standard FID).")


def output_dir(cfg: DictConfig) -> Path:
    """The job's folder: ``out`` for a single run, ``out/<job number>`` in a multirun."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.out)


def evaluate_diffusion(cfg: DictConfig, device: torch.device, clip: CLIPModule | None,
                       feature: nn.Module | None, notes: list[str], out: Path) -> dict:
    model = load_latent_diffusion(cfg.ckpt)
    if cfg.get("lora"):  # a LoRA adapter merged into the base checkpoint's sampling U-Net
        apply_adapter(model, cfg.lora, scale=cfg.lora_scale, use_ema=cfg.use_ema)
    model = model.to(device)
    prompts = prompt_set(cfg.prompt_set, cfg.get("prompt_file"))
    config = SamplingConfig(sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg.cfg_scale, spacing=cfg.spacing,
                            eta=cfg.eta, seed=cfg.seed, batch_size=cfg.batch_size, use_ema=cfg.use_ema,
                            height=cfg.get("height"), width=cfg.get("width"))
    metrics, images, expanded = evaluate_prompts(model, prompts, cfg.n_per_prompt, config,
                                                 shape_aliases=dict(cfg.get("shape_aliases") or {}))
    del model
    if cfg.save_images:
        make_grid(images, captions=expanded, ncol=cfg.n_per_prompt).save(out / "samples.png")

    metrics["clip_score"] = clip_score(clip, images, expanded, cfg.batch_size) if clip is not None else None
    if clip is None:
        notes.append("clip_score skipped: set clip_ckpt=<stage-0 CLIP checkpoint>.")

    keys = metric_keys(feature.name if feature is not None else None)
    metrics.update(dict.fromkeys(keys.values()))
    if feature is None:
        notes.append(NO_FEATURES)
    elif not cfg.real_shards:
        notes.append("FID/KID skipped: set real_shards=<shard pattern of real images> (e.g. the val shards).")
    else:
        size = images.shape[-1]
        real = extract_features(feature, shard_images(cfg.real_shards, size, cfg.batch_size, cfg.max_real_images),
                                device, desc="real features")
        fake = extract_features(feature, images.split(cfg.batch_size), device, desc="generated features")
        dist = fid_kid(real, fake, cfg.kid_subsets, cfg.kid_subset_size, seed=cfg.seed)
        metrics.update({keys[k]: v for k, v in dist.items()})
        metrics["num_real_images"] = len(real)
    return metrics


def evaluate_autoencoder(cfg: DictConfig, device: torch.device, feature: nn.Module | None,
                         notes: list[str]) -> dict:
    if not cfg.real_shards:
        raise ValueError("Autoencoder metrics reconstruct real images: set real_shards=<shard pattern>, "
                         "e.g. real_shards=data/shapes32/val-000000.tar.")
    autoencoder = FirstStage.from_config({"ckpt_path": cfg.ckpt})
    size = cfg.image_size or autoencoder.config["ddconfig"].get("resolution", 256)
    batches = shard_images(cfg.real_shards, size, cfg.batch_size, cfg.max_real_images)
    metrics = reconstruction_metrics(autoencoder, batches, feature, device, cfg.kid_subsets, cfg.kid_subset_size)
    keys = metric_keys(feature.name if feature is not None else None, prefix="r")
    if feature is None:
        notes.append("r" + NO_FEATURES)
    return {**{k: v for k, v in metrics.items() if k not in keys}, **{keys[k]: metrics.get(k) for k in keys}}


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation described by ``cfg`` (configs/eval.yaml); returns the metrics written to JSON."""
    check_missing_values(cfg)
    device = resolve_device(cfg.device)
    kind = checkpoint_kind(cfg.ckpt, cfg.kind)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    clip = load_clip_module(cfg.clip_ckpt).to(device) if cfg.clip_ckpt and kind == "diffusion" else None
    feature, features = build_feature_extractor(cfg.inception_weights, clip, cfg.clip_ckpt)
    notes: list[str] = []
    metrics = {"kind": kind, "checkpoint": str(cfg.ckpt), "features": features}
    if cfg.get("lora"):
        metrics.update({"lora": str(cfg.lora), "lora_scale": cfg.lora_scale})
    if kind == "diffusion":
        metrics.update(evaluate_diffusion(cfg, device, clip, feature, notes, out))
    else:
        metrics.update(evaluate_autoencoder(cfg, device, feature, notes))
    metrics["notes"] = notes
    json_path, _ = write_report(metrics, out)
    print(markdown_table(metrics))
    print(f"Metrics: {json_path}")
    return metrics


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    with torch.no_grad():
        evaluate(cfg)


if __name__ == "__main__":
    main()
