"""Draw the figures of docs/unet.md from the code itself (nothing here is hand-entered).

    python scripts/plot_unet.py [--out-dir docs/img]

- unet_topology.png: every block of the SD 1.5 U-Net (built on the meta device from
  configs/model/unet/sd15.yaml) with its output channels and resolution; attention is marked.
- unet_timestep_embedding.png: the sinusoidal timestep features fed to ``time_embed``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.modules.attention import SpatialTransformer  # noqa: E402
from ldm.modules.unet import Downsample, ResBlock, Upsample, UNetModel, timestep_embedding  # noqa: E402

SD15_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "unet" / "sd15.yaml"


def block_table(model: UNetModel, latent: int) -> list[tuple[str, int, int, bool, str]]:
    """(name, out channels, resolution, has attention, kind) for every block, in execution order."""
    rows, res = [], latent
    stages = [("input_blocks", b) for b in model.input_blocks] + [("middle_block", model.middle_block)] + \
             [("output_blocks", b) for b in model.output_blocks]
    counters = {"input_blocks": 0, "output_blocks": 0}
    for group, block in stages:
        name = group if group == "middle_block" else f"{group}.{counters[group]}"
        if group in counters:
            counters[group] += 1
        channels, attn, kind = None, False, "conv"
        for layer in block:
            if isinstance(layer, ResBlock):
                channels, kind = layer.out_channels, "res"
            elif isinstance(layer, SpatialTransformer):
                attn = True
            elif isinstance(layer, Downsample):
                res, channels, kind = res // 2, layer.out_channels, "down"
            elif isinstance(layer, Upsample):
                res, kind = res * 2, "res+up"
            elif isinstance(layer, torch.nn.Conv2d):
                channels = layer.out_channels
        rows.append((name, channels, res if kind != "res+up" else res // 2, attn, kind))
    return rows


def draw_topology(path: Path) -> None:
    with torch.device("meta"):
        model = UNetModel(**OmegaConf.to_container(OmegaConf.load(SD15_CONFIG)))
    rows = block_table(model, latent=64)
    fig, ax = plt.subplots(figsize=(13, 4.2))
    colors = {"conv": "#999999", "res": "#4C72B0", "down": "#DD8452", "res+up": "#55A868"}
    for i, (name, ch, res, attn, kind) in enumerate(rows):
        ax.bar(i, ch, color=colors[kind], edgecolor="black" if attn else "none", linewidth=1.5, hatch="//" if attn else None)
        ax.text(i, ch + 25, f"{res}", ha="center", fontsize=7)
    ax.set_xticks(range(len(rows)), [r[0].replace("_blocks", "") for r in rows], rotation=70, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title("SD 1.5 U-Net, 64x64 latent: blocks in execution order (numbers: feature-map side)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//"))
    ax.legend(handles, ["conv_in", "ResBlock", "Downsample", "ResBlock (+Upsample)", "+ SpatialTransformer"],
              fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_ylim(0, 1500)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_timestep_embedding(path: Path) -> None:
    t = torch.arange(0, 1000)
    emb = timestep_embedding(t, 320)  # [1000, 320]: cos for dims 0..159, sin for 160..319
    fig, ax = plt.subplots(figsize=(8, 3.5))
    im = ax.imshow(emb.T, aspect="auto", cmap="RdBu", interpolation="nearest")
    ax.axhline(159.5, color="black", linewidth=0.8)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("feature (cos | sin)")
    ax.set_title("timestep_embedding(t, 320): frequencies 10000^(-i/160), cosines first")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in (("unet_topology.png", draw_topology), ("unet_timestep_embedding.png", draw_timestep_embedding)):
        draw(args.out_dir / name)
        print(f"wrote {args.out_dir / name}")


if __name__ == "__main__":
    main()
