"""Files in and out of `scripts/sample.py`: prompts, devices, PNGs with metadata, the grid."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from PIL.PngImagePlugin import PngInfo

from ldm.utils.grid import make_grid, to_pil


def read_prompts(prompt: Optional[str], prompt_file: Optional[str]) -> list[str]:
    """A prompt file (one prompt per line, blank lines skipped) or a single prompt."""
    if prompt_file:
        path = Path(prompt_file)
        if not path.exists():
            raise FileNotFoundError(f"prompt_file={prompt_file} does not exist.")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt_file={prompt_file} contains no prompts.")
        return prompts
    if prompt is None:
        raise ValueError('Give a prompt (prompt="a red circle") or a prompt_file=PATH. '
                         'For unconditional samples pass prompt="".')
    return [str(prompt)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} requested but CUDA is not available; use device=cpu.")
    return device


def file_hash(path: str | Path, length: int = 10) -> str:
    """Short SHA-256 of a checkpoint file (identifies the weights in image metadata)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def run_sampling(cfg: DictConfig, prompts: list[str], device: torch.device) -> dict:
    """Load the checkpoint, sample ``cfg.n`` images per prompt, write PNGs + grid; return the paths."""
    from ldm.models.diffusion import load_latent_diffusion
    from ldm.pipeline import SamplingConfig, image_size, text_to_image
    from ldm.pipeline_img2img import image_to_image
    from ldm.utils.image_inputs import image_request

    ckpt = Path(cfg.ckpt)
    model = load_latent_diffusion(str(ckpt))
    lora_meta = {}
    if cfg.get("lora"):  # merge a LoRA adapter into the base's sampling U-Net (ldm/lora.py)
        from ldm.lora import apply_adapter

        apply_adapter(model, cfg.lora, scale=cfg.lora_scale, use_ema=cfg.use_ema)
        lora_meta = {"lora": Path(cfg.lora).name, "lora_sha256": file_hash(cfg.lora), "lora_scale": cfg.lora_scale}
    model = model.to(device)
    if cfg.precision == "bf16":
        model = model.to(torch.bfloat16)
    elif cfg.precision != "fp32":
        raise ValueError(f"precision must be fp32 or bf16, got {cfg.precision}.")
    config = SamplingConfig(
        sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg.cfg_scale, negative_prompt=cfg.negative_prompt,
        spacing=cfg.spacing, height=cfg.height, width=cfg.width, seed=cfg.seed, batch_size=cfg.batch_size,
        use_ema=cfg.use_ema, eta=cfg.eta,
    )
    expanded = [p for p in prompts for _ in range(cfg.n)]
    request = image_request(cfg, *image_size(model, cfg.height, cfg.width), file_hash)  # None: text-to-image
    if request is None:
        images = text_to_image(model, expanded, config)  # [N, 3, H, W] in [0, 1]
    else:
        images = image_to_image(model, expanded, config=config, **request.kwargs)
    upscaled = upscale_samples(cfg, images, device) if cfg.get("upscale") else None  # (images, metadata)
    if upscaled is not None:
        images = upscaled[0]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_hash = file_hash(ckpt)
    written = []
    for i, (image, prompt) in enumerate(zip(images, expanded)):
        meta = {
            "prompt": prompt, "negative_prompt": cfg.negative_prompt, "seed": cfg.seed + i,
            "sampler": cfg.sampler, "steps": cfg.steps, "cfg_scale": cfg.cfg_scale, "spacing": cfg.spacing,
            "use_ema": cfg.use_ema, "checkpoint": ckpt.name, "checkpoint_sha256": ckpt_hash,
            **lora_meta, **(request.metadata if request is not None else {}),
            **(upscaled[1] if upscaled is not None else {}),
        }
        info = PngInfo()
        for key, value in meta.items():
            info.add_text(key, str(value))
        info.add_text("parameters", json.dumps(meta))
        path = out / f"{i:05d}-seed{cfg.seed + i}.png"
        to_pil(image).save(path, pnginfo=info)
        written.append(path)
    grid = make_grid(images, captions=expanded, ncol=cfg.grid_columns or cfg.n)
    grid_path = out / "grid.png"
    grid.save(grid_path)
    return {"dir": out, "images": written, "grid": grid_path}


def upscale_samples(cfg: DictConfig, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict]:
    """The super-resolution stage of ``upscale=true``: images [N, 3, H, W] in [0, 1] -> [N, 3, sH, sW] in [0, 1]
    with ``upscaler_ckpt`` (``ldm.upscale.upscale``'s sampler, ``upscale_steps``, ``upscale_noise_level``) and their
    PNG metadata."""
    from ldm.models.upscaler import load_upscaler
    from ldm.upscale import upscale

    path = cfg.get("upscaler_ckpt")
    if not path:
        raise ValueError("upscale=true needs upscaler_ckpt=PATH (checkpoints/last.ckpt of a *_upscaler_* run, "
                         "e.g. `python train.py experiment=shapes_upscaler_x2`).")
    upscaler = load_upscaler(str(path)).to(device)
    out = []
    for start in range(0, images.shape[0], cfg.batch_size):
        low = images[start:start + cfg.batch_size].to(device) * 2 - 1  # [b, 3, H, W] in [-1, 1]
        generator = torch.Generator(device).manual_seed(cfg.seed + start)
        high = upscale(upscaler, low, steps=cfg.upscale_steps, noise_level=cfg.upscale_noise_level, generator=generator)
        out.append(((high.float() + 1) / 2).clamp(0, 1).cpu())
    meta = {"upscaler": Path(path).name, "upscaler_sha256": file_hash(path), "upscale_factor": upscaler.scale,
            "upscale_steps": cfg.upscale_steps, "upscale_noise_level": cfg.upscale_noise_level}
    return torch.cat(out), meta
