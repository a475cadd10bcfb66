"""Evaluate a latent-diffusion checkpoint: generate images for a prompt set and score them.

    python scripts/evaluate.py ckpt=<run>/checkpoints/last.ckpt prompt_set=shapes n_per_prompt=12 \
        sampler=dpmpp_2m steps=20 cfg_scale=4

Writes metrics.json, metrics.md (a Markdown table) and, with save_images=true, a grid per prompt set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

import ldm.utils.resolvers  # noqa: E402,F401
from ldm.evaluation.generation import evaluate_prompts, markdown_table, prompt_set, write_report  # noqa: E402
from ldm.models.diffusion import load_latent_diffusion  # noqa: E402
from ldm.pipeline import SamplingConfig  # noqa: E402
from ldm.utils.grid import make_grid  # noqa: E402
from ldm.utils.run import check_missing_values  # noqa: E402
from ldm.utils.sampling_io import resolve_device  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    check_missing_values(cfg)
    device = resolve_device(cfg.device)
    model = load_latent_diffusion(cfg.ckpt).to(device)
    prompts = prompt_set(cfg.prompt_set, cfg.get("prompt_file"))
    config = SamplingConfig(sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg.cfg_scale, spacing=cfg.spacing,
                            eta=cfg.eta, seed=cfg.seed, batch_size=cfg.batch_size, use_ema=cfg.use_ema)
    metrics, images, expanded = evaluate_prompts(model, prompts, cfg.n_per_prompt, config)
    metrics["checkpoint"] = str(cfg.ckpt)
    out = Path(cfg.out)
    json_path, _ = write_report(metrics, out)
    if cfg.save_images:
        make_grid(images, captions=expanded, ncol=cfg.n_per_prompt).save(out / "samples.png")
    print(markdown_table(metrics))
    print(f"Metrics: {json_path}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
