"""Upscale PNG/JPEG images with a trained diffusion upscaler (docs/upscaler.md).

    python scripts/upscale.py --ckpt logs/shapes_upscaler_x4/runs/<date>/checkpoints/last.ckpt \
        --input low_res.png more_images/ --out outputs/upscaled
    python scripts/upscale.py --ckpt ... --input originals/ --ground-truth   # downsample first, compare

Writes ``<stem>_x<scale>.png`` per input and ``grid.png``: one row per image with the low-res input (nearest),
bicubic, ours and, with ``--ground-truth``, the original; PSNRs against the original in the captions. With
``--ground-truth`` the inputs are high-res originals: they are area-downsampled by the model's scale first, as in
training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.models.upscaler import load_upscaler, psnr_per_image  # noqa: E402
from ldm.upscale import area_downsample, bicubic_upsample, upscale  # noqa: E402
from ldm.utils.grid import make_grid, to_pil  # noqa: E402
from ldm.utils.sampling_io import resolve_device  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files(inputs: list[str]) -> list[Path]:
    """Files and folders (their PNG/JPEG files, sorted) -> image paths; missing paths are an error."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--input {item} does not exist (relative paths are resolved from {Path.cwd()}).")
    if not files:
        raise ValueError(f"No PNG/JPEG images found in --input {' '.join(inputs)}.")
    return files


def load_image(path: Path) -> torch.Tensor:
    """An image file -> [1, 3, H, W] in [-1, 1]."""
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image ({err}); give PNG or JPEG files.") from None
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)  # [H, W, 3]
    return array.permute(2, 0, 1)[None] * 2 - 1


def unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


def upscale_files(args: argparse.Namespace) -> dict:
    """Upscale every input; write the PNGs and the grid; return the written paths and PSNRs."""
    device = resolve_device(args.device)
    model = load_upscaler(args.ckpt).to(device)
    scale = model.scale
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, captions, psnrs, written = [], [], [], []
    for index, path in enumerate(image_files(args.input)):
        image = load_image(path).to(device)  # [1, 3, H, W]
        truth = image if args.ground_truth else None
        low = area_downsample(image, scale) if truth is not None else image  # [1, 3, h, w]
        generator = torch.Generator(device).manual_seed(args.seed + index)
        ours = upscale(model, low, sampler=args.sampler, steps=args.steps, noise_level=args.noise_level,
                       generator=generator, spacing=args.spacing)  # [1, 3, sh, sw]
        target = out / f"{path.stem}_x{scale}.png"
        to_pil(unit(ours)[0]).save(target)
        written.append(target)
        bicubic = bicubic_upsample(low, scale)
        nearest = torch.nn.functional.interpolate(low, scale_factor=scale, mode="nearest")
        row, names = [nearest, bicubic, ours], ["low-res (nearest)", "bicubic", "ours"]
        if truth is not None:
            scores = {"bicubic": float(psnr_per_image(bicubic, truth).mean()), "ours": float(psnr_per_image(ours, truth).mean())}
            psnrs.append(scores)
            names = [names[0], f"bicubic {scores['bicubic']:.1f} dB", f"ours {scores['ours']:.1f} dB", "original"]
            row.append(truth)
        rows.append(unit(torch.cat(row)))
        captions.extend(f"{path.stem}: {name}" if i == 0 else name for i, name in enumerate(names))
    grid_path = None
    if len({r.shape for r in rows}) == 1:
        grid_path = out / "grid.png"
        make_grid(torch.cat(rows), captions=captions, ncol=rows[0].shape[0]).save(grid_path)
    else:
        print("The inputs differ in size: no grid written.", file=sys.stderr)
    return {"images": written, "grid": grid_path, "psnr": psnrs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoints/last.ckpt of a *_upscaler_* run")
    parser.add_argument("--input", nargs="+", required=True, help="image files and/or folders of PNG/JPEG images")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "upscaled"))
    parser.add_argument("--ground-truth", action="store_true",
                        help="the inputs are high-res originals: downsample them first and report PSNRs")
    parser.add_argument("--sampler", default="ddpm", help="ddpm | ddim | euler | euler_a | heun | dpmpp_2m | dpmpp_2m_sde")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--spacing", default="karras", help="sigma spacing: karras | leading | trailing | linspace")
    parser.add_argument("--noise-level", type=int, default=0,
                        help="noise augmentation of the low-res input, in [0, the model's max_noise_level]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    torch.set_grad_enabled(False)
    result = upscale_files(parse_args(argv))
    print(f"Wrote {len(result['images'])} images" + (f"; grid: {result['grid']}" if result["grid"] else ""))
    for path, scores in zip(result["images"], result["psnr"]):
        print(f"{path.name}: PSNR bicubic {scores['bicubic']:.2f} dB, ours {scores['ours']:.2f} dB")
    return result


if __name__ == "__main__":
    main()
