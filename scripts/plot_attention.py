"""Figure of cross-attention: where in a generated image the U-Net reads each word of its prompt.

    python scripts/plot_attention.py --ckpt <ldm run>/checkpoints/last.ckpt \
        --prompt "a red circle in the top left corner" --prompt "a blue square" --out docs/images/cross_attention.png

Each prompt is sampled once; its latent is then noised again at ``--timesteps`` (fixed noise) and denoised once per
timestep with the prompt's context while ``ldm.modules.attention_maps.CrossAttentionRecorder`` records every
cross-attention layer. One row per prompt: the image, then one heat map per word (head, layer and timestep average,
each map scaled to its own maximum), titled with the share of all attention the word receives. The start and end
tokens take most of the rest (the "attention sink" of softmax attention) and are not drawn.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.models.diffusion import load_latent_diffusion  # noqa: E402
from ldm.modules.attention_maps import CrossAttentionRecorder  # noqa: E402
from ldm.pipeline import SamplingConfig, latent_size, prompt_batches, sample_latents, to_unit_range  # noqa: E402


def word_tokens(model, prompt: str) -> list[tuple[int, str]]:
    """(position, text) of the prompt's tokens between the start and end markers."""
    tokenizer = model.cond_stage.tokenizer
    ids = tokenizer([prompt])[0].tolist()
    end = ids.index(tokenizer.eot) if tokenizer.eot in ids[1:] else len(ids)
    decoder = tokenizer.tokenizer.decoder
    return [(i, decoder[ids[i]].replace("</w>", "")) for i in range(1, end)]


@torch.no_grad()
def attention_maps(model, prompts: Sequence[str], config: SamplingConfig,
                   timesteps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the prompts, then record cross-attention while denoising them again at ``timesteps``.

    -> images [B, 3, H, W] in [0, 1], token maps [B, M, h, w] (latent size, sum 1 over the M context tokens)."""
    h, w = latent_size(model, config.height, config.width)
    batch = next(prompt_batches(model, prompts, replace(config, batch_size=len(prompts)), h, w))
    z0 = sample_latents(model, batch.cond, batch.uncond, batch.noise, config, generator=batch.generator)
    unet = model.sampling_unet(config.use_ema)
    generator = torch.Generator().manual_seed(config.seed + 1)
    with CrossAttentionRecorder(unet) as recorder:
        for t in timesteps:
            noise = torch.randn(z0.shape, generator=generator).to(z0)
            t_batch = torch.full((z0.shape[0],), int(t), dtype=torch.long, device=z0.device)
            unet(model.schedule.q_sample(z0, t_batch, noise), t_batch, **batch.cond)
    return to_unit_range(model.decode_latents(z0)), recorder.token_maps().cpu()


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="latent-diffusion checkpoint")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700],
                        help="training timesteps at which the attention is recorded (averaged)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="cross_attention.png")
    args = parser.parse_args(argv)
    model = load_latent_diffusion(args.ckpt).eval()
    config = SamplingConfig(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                            progress=False)
    images, maps = attention_maps(model, args.prompt, config, args.timesteps)
    words = [word_tokens(model, prompt) for prompt in args.prompt]
    size = images.shape[-2:]
    cols = 1 + max(len(w) for w in words)
    fig, axes = plt.subplots(len(args.prompt), cols, figsize=(1.3 * cols, 1.45 * len(args.prompt)), squeeze=False)
    for row, (image, token_maps, prompt_words) in enumerate(zip(images, maps, words)):
        axes[row][0].imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[row][0].set_title("sample", fontsize=7)
        gray = image.mean(dim=0).numpy()  # [H, W]
        for col, (position, text) in enumerate(prompt_words, start=1):
            heat = F.interpolate(token_maps[position][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            share = float(token_maps[position].mean())  # of all attention, averaged over pixels
            axes[row][col].imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[row][col].imshow((heat / heat.max()).numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[row][col].set_title(f"{text} {share:.0%}", fontsize=7)
        for ax in axes[row]:
            ax.set_xticks([]), ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
    fig.suptitle(f"cross-attention per word ({args.sampler}, {args.steps} steps, guidance {args.cfg_scale}; "
                 f"timesteps {', '.join(map(str, args.timesteps))})", fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
