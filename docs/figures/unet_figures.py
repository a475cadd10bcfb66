"""Draw the figures of docs/unet.md from the code itself (nothing here is hand-entered).

    python docs/figures/unet_figures.py            # writes docs/figures/unet_*.png

- unet_topology.png: every block of the SD 1.5 U-Net (built on the meta device from the released
  config) with its output channels and resolution; blocks with attention are marked.
- unet_timestep_embedding.png: the sinusoidal timestep features fed to ``time_embed``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ldm.modules.attention import SpatialTransformer  # noqa: E402
from ldm.modules.unet import Downsample, ResBlock, Upsample, UNetModel, timestep_embedding  # noqa: E402

OUT = Path(__file__).resolve().parent
SD15 = dict(image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=768, legacy=False)


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
        model = UNetModel(**SD15)
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


if __name__ == "__main__":
    draw_topology(OUT / "unet_topology.png")
    draw_timestep_embedding(OUT / "unet_timestep_embedding.png")
    print(f"wrote {OUT / 'unet_topology.png'} and {OUT / 'unet_timestep_embedding.png'}")
