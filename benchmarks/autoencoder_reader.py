"""Does a stage-1 autoencoder keep what the prompt-accuracy reader looks at, and does it survive stage 2's errors?

For each autoencoder checkpoint, the validation images of the shapes set are read (``ldm.data.reader``: palette
colour + shape from the fill ratio) three ways: as they are, reconstructed from the posterior mode, and decoded
from the mode plus Gaussian noise of ``s`` per-channel latent standard deviations, the kind of error a diffusion
model's latents carry. The reconstruction accuracy caps the prompt accuracy any stage 2 can reach on these latents;
the noisy columns show whether near-miss latents still decode to the right shape (squares bow into circles first).

    python benchmarks/autoencoder_reader.py --ckpt outputs/shapes/autoencoder/checkpoints/last.ckpt
    python benchmarks/autoencoder_reader.py --ckpt a.ckpt --ckpt b.ckpt --noise 0 0.1 0.2 0.3 --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import append_markdown  # noqa: E402

from ldm.data.palette import FOREGROUND_COLORS  # noqa: E402
from ldm.data.reader import read_shape_image  # noqa: E402
from ldm.data.webdataset import WebDataModule  # noqa: E402
from ldm.evaluation.prompt_accuracy import expected_shape_attributes  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402

SHAPES = ("circle", "square", "triangle")
COLORS = tuple(FOREGROUND_COLORS)


def read_batch(images: torch.Tensor, captions: list[str], hits: dict[str, list[bool]]) -> None:
    """Append, under the shape and under the colour the caption names, whether the reader finds both the caption's
    colour and shape. images: [B, 3, H, W] in [-1, 1]."""
    pixels = ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
    for image, caption in zip(pixels, captions):
        expected = expected_shape_attributes(caption)
        if expected is None:
            continue
        read = read_shape_image(image)
        hit = read["shape"] == expected["shape"] and read["color"] == expected["color"]
        hits[expected["shape"]].append(hit)
        hits[expected["color"]].append(hit)


def measure(ckpt: Path, shards: str, noise_levels: list[float], seed: int) -> dict[str, dict[str, list[bool]]]:
    """{"real" | "mode" | "noise s": {shape or colour: [hit per image]}} over every image of ``shards``."""
    model = AutoencoderKL.load_from_checkpoint(ckpt, map_location="cpu").eval()
    size = model.hparams.ddconfig["resolution"]
    data = WebDataModule(train_shards=None, val_shards=shards, image_size=size, batch_size=128, num_workers=0,
                         pin_memory=False)
    data.setup("validate")
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    with torch.no_grad():
        for batch in tqdm(data.val_dataloader(), desc=ckpt.parent.parent.name, unit="batch"):
            x, captions = batch["image"].float(), list(batch["caption"])  # x: [B, 3, H, W]
            read_batch(x, captions, results["real"])
            z = model.encode(x).mode()  # [B, C, h, w]
            channel_std = z.std(dim=(0, 2, 3), keepdim=True)  # [1, C, 1, 1]
            for s in noise_levels:
                noisy = z + s * channel_std * torch.randn(z.shape, generator=generator)
                read_batch(model.decode(noisy), captions, results["mode" if s == 0 else f"noise {s:g}"])
    return results


def table(rows: list[tuple[str, dict]]) -> str:
    """One row per checkpoint and reading: all images, then each shape, then each colour."""
    lines = ["| autoencoder | images | accuracy | " + " | ".join(SHAPES + COLORS) + " |",
             "|---|---|---:|" + "---:|" * (len(SHAPES) + len(COLORS))]
    for name, results in rows:
        for reading, per_key in results.items():
            every = [hit for shape in SHAPES for hit in per_key.get(shape, [])]
            cells = [f"{np.mean(per_key[k]):.3f}" if per_key.get(k) else "–" for k in SHAPES + COLORS]
            lines.append(f"| {name} | {reading} | {np.mean(every):.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, action="append", required=True, help="autoencoder checkpoint (repeat)")
    parser.add_argument("--shards", default="data/shapes32/val-000000.tar", help="captioned shapes shards")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3],
                        help="latent noise in per-channel standard deviations (0: the posterior mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--append", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    if any(s < 0 for s in args.noise):
        parser.error("--noise levels must be >= 0")
    for ckpt in args.ckpt:
        if not ckpt.is_file():
            parser.error(f"--ckpt {ckpt}: no such file (an autoencoder run's checkpoints/last.ckpt)")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [(str(ckpt), measure(ckpt, args.shards, args.noise, args.seed)) for ckpt in args.ckpt]
    body = ("Reader accuracy (colour and shape right) on the validation images as they are, on reconstructions "
            "from the posterior mode, and decoded from the mode plus noise of s per-channel latent standard "
            f"deviations; shards {args.shards}.\n\n" + table(rows))
    print(body)
    if args.append:
        append_markdown(args.append, "Autoencoder reconstructions through the prompt-accuracy reader", body)


if __name__ == "__main__":
    main()
