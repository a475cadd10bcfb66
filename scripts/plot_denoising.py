"""Figure of the reverse process: what a trained LDM sees and predicts at each sampling step.

    python scripts/plot_denoising.py --ckpt <ldm run>/checkpoints/last.ckpt \
        --prompt "a red circle" --prompt "a blue square" --out docs/images/denoising.png

For each prompt, two rows over the sampler's steps: the current noisy latent x_t decoded (scaled by
1/sqrt(1 + sigma^2) so it stays in range; at high noise it is mostly noise) and the model's
prediction of the clean latent x0_hat decoded. Coarse layout and color settle first, edges last.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.models.diffusion import load_latent_diffusion  # noqa: E402
from ldm.pipeline import SamplingConfig, initial_noise, latent_size, sample_latents  # noqa: E402


def trajectory(model, prompts: list[str], config: SamplingConfig) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Run the sampler; return the sigmas and the decoded x_t and x0_hat per step ([S, B, 3, H, W] in [0, 1])."""
    h, w = latent_size(model, config.height, config.width)
    cond = model.encode_conditioning(prompts)
    uncond = model.encode_conditioning([config.negative_prompt] * len(prompts)) if config.cfg_scale != 1.0 else None
    noise = initial_noise((model.first_stage_model.z_channels, h, w), range(config.seed, config.seed + len(prompts)),
                          torch.device("cpu"))
    steps: list[dict] = []
    sample_latents(model, cond, uncond, noise, config, generator=torch.Generator().manual_seed(config.seed),
                   callback=lambda info: steps.append({k: v.clone() if torch.is_tensor(v) else v
                                                       for k, v in info.items()}))

    def decode(z: torch.Tensor) -> torch.Tensor:
        return ((model.decode_latents(z).float() + 1) / 2).clamp(0, 1)

    sigmas = [float(s["sigma"]) for s in steps]
    noisy = torch.stack([decode(s["x"] / (1 + s["sigma"] ** 2) ** 0.5) for s in steps])  # x_t, variance-normalised
    clean = torch.stack([decode(s["denoised"]) for s in steps])
    return sigmas, noisy, clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="latent-diffusion checkpoint")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="denoising.png")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_latent_diffusion(args.ckpt).eval()
    config = SamplingConfig(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                            progress=False)
    sigmas, noisy, clean = trajectory(model, args.prompt, config)
    rows, cols = 2 * len(args.prompt), len(sigmas)
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols + 1.2, 1.15 * rows), squeeze=False)
    for p, prompt in enumerate(args.prompt):
        for kind, images in (("x_t", noisy), ("x0_hat", clean)):
            r = 2 * p + (kind == "x0_hat")
            for c in range(cols):
                ax = axes[r][c]
                ax.imshow(images[c, p].permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"σ={sigmas[c]:.2g}", fontsize=7)
            axes[r][0].set_ylabel(f"{prompt}\n{kind}" if kind == "x_t" else kind, fontsize=7)
    fig.suptitle(f"{args.sampler}, {args.steps} steps, guidance {args.cfg_scale}", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"Reverse-process figure: {args.out}")


if __name__ == "__main__":
    main()
