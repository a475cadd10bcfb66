"""Figure of what a trained autoencoder keeps and what its latents look like.

    python scripts/plot_reconstructions.py --ckpt logs/quickstart_autoencoder/runs/<run>/checkpoints/last.ckpt \
        --shards "data/shapes32/val-000000.tar" --out docs/images/autoencoder_reconstructions.png

Rows: validation inputs, reconstructions (posterior mode), absolute error (x4), and each latent channel
normalised with the checkpoint's ``latent_mean`` / ``latent_std``. A second panel shows the histogram of
the normalised latents per channel. The title carries the PSNR of the plotted images.
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

from ldm.data.webdataset import WebDataModule  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="stage-1 checkpoint (AutoencoderKL)")
    parser.add_argument("--shards", required=True, help="WebDataset shard pattern with validation images")
    parser.add_argument("--out", default="reconstructions.png", help="output PNG")
    parser.add_argument("--num", type=int, default=8, help="images to show")
    return parser.parse_args()


def load_images(shards: str, size: int, num: int) -> torch.Tensor:
    """First ``num`` validation images from the shards: [N, 3, size, size] in [-1, 1]."""
    data = WebDataModule(train_shards=None, val_shards=shards, image_size=size, batch_size=num)
    data.setup("validate")
    return next(iter(data.val_dataloader()))["image"][:num]


@torch.no_grad()
def main() -> None:
    args = parse_args()
    model = AutoencoderKL.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True, loss=None).eval()
    x = load_images(args.shards, model.hparams.ddconfig["resolution"], args.num)  # [N, 3, H, W]
    z = model.encode(x).mode()  # [N, C, h, w]
    rec = model.decode(z).clamp(-1, 1)
    x01, rec01 = (x + 1) / 2, (rec + 1) / 2
    psnr = 10 * torch.log10(1.0 / (x01 - rec01).pow(2).mean())
    if model.has_latent_stats:
        z = (z - model.latent_mean[None, :, None, None]) / model.latent_std[None, :, None, None]

    n, channels = x.shape[0], z.shape[1]
    rows = [("input", x01), ("reconstruction", rec01), ("|error| x4", ((x01 - rec01).abs() * 4).clamp(0, 1))]
    fig = plt.figure(figsize=(1.3 * n + 3.2, 1.3 * (len(rows) + channels)))
    grid = fig.add_gridspec(len(rows) + channels, n + 3)
    for r, (label, images) in enumerate(rows):
        for i in range(n):
            ax = fig.add_subplot(grid[r, i])
            ax.imshow(images[i].permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize=8)
    for c in range(channels):
        for i in range(n):
            ax = fig.add_subplot(grid[len(rows) + c, i])
            ax.imshow(z[i, c].numpy(), cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(f"latent {c}", fontsize=8)
    hist = fig.add_subplot(grid[:, n:])
    for c in range(channels):
        hist.hist(z[:, c].flatten().numpy(), bins=40, histtype="step", label=f"channel {c}")
    hist.set_xlabel("normalised latent value" if model.has_latent_stats else "latent value")
    hist.legend(fontsize=7)
    f = x.shape[-1] // z.shape[-1]
    fig.suptitle(f"{Path(args.ckpt).name}: f={f}, {channels} latent channels, PSNR {psnr:.1f} dB", fontsize=10)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"Wrote {out} (PSNR {psnr:.2f} dB over {n} images)")


if __name__ == "__main__":
    main()
