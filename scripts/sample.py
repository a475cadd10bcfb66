"""Sample images from a latent-diffusion checkpoint.

    python scripts/sample.py ckpt=logs/quickstart_ldm/.../checkpoints/last.ckpt \
        prompt="a red circle" n=8 sampler=dpmpp_2m steps=20 cfg_scale=4 seed=0 out=outputs/red

Edit a picture instead (img2img), or repaint the white part of a mask (inpainting):

    python scripts/sample.py ckpt=... prompt="a red circle" init_image=in.png strength=0.6
    python scripts/sample.py ckpt=... prompt="a red circle" init_image=in.png mask=mask.png

Writes one PNG per image (prompt, seed, sampler, steps, cfg and checkpoint hash in the PNG text
metadata, plus init image, mask and strength when given) and a labelled grid `grid.png`.
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
from ldm.utils.run import check_missing_values  # noqa: E402
from ldm.utils.sampling_io import read_prompts, resolve_device, run_sampling  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    check_missing_values(cfg)
    prompts = read_prompts(cfg.get("prompt"), cfg.get("prompt_file"))
    device = resolve_device(cfg.device)
    paths = run_sampling(cfg, prompts, device)
    print(f"Wrote {len(paths['images'])} images to {paths['dir']}")
    print(f"Grid: {paths['grid']}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
