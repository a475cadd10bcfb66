"""Diffusion upscaler against bicubic on held-out images: PSNR, margin, edge sharpness and a comparison grid.

Every ``--eval DATA=CKPT`` reads the validation shards of ``configs/data/<DATA>.yaml`` (built first if missing),
area-downsamples the first ``--num-images`` images by the checkpoint's scale (as in training) and upscales them with
bicubic and with the upscaler (``ldm.upscale.upscale``) for every ``--runs SAMPLER:STEPS`` (``--spacing``,
``--noise-level``, seed 0). Per run it reports the mean per-image PSNR against the originals, the paired margin
(ours - bicubic) with a 95 % interval, the share of images where ours wins, the edge sharpness of both (gradient
magnitude on the originals' edges, relative to the originals') and seconds per image. A grid (low-res nearest |
bicubic | every run | original) of the first ``--grid-images`` images goes to ``--grid-dir`` as
``upscaler_<DATA>_x<scale>.png``.

    python benchmarks/upscaler_psnr.py --eval shapes64=logs/shapes_upscaler_x4/runs/<date>/checkpoints/last.ckpt
    python benchmarks/upscaler_psnr.py --eval shapes64=X2.ckpt shapes64=X4.ckpt digits32=D4.ckpt \
        --runs ddim:1 ddpm:20 --grid-dir docs/images --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import append_markdown  # noqa: E402  (benchmarks/_report.py)
from samplers import parse_run  # noqa: E402  (benchmarks/samplers.py: "SAMPLER:STEPS")
from ldm.data.webdataset import WebDataModule  # noqa: E402
from ldm.models.upscaler import load_upscaler, psnr_per_image  # noqa: E402
from ldm.upscale import area_downsample, bicubic_upsample, upscale  # noqa: E402
from ldm.utils.grid import make_grid  # noqa: E402
from ldm.utils.sampling_io import resolve_device  # noqa: E402


def parse_eval(spec: str) -> tuple[str, Path]:
    """``"shapes64=path.ckpt"`` -> ("shapes64", Path); unknown data configs and missing files are refused."""
    data, sep, ckpt = spec.partition("=")
    if not sep or not (ROOT / "configs" / "data" / f"{data}.yaml").exists():
        raise argparse.ArgumentTypeError(f"{spec!r} is not DATA=CKPT with DATA a configs/data/ name (e.g. shapes64).")
    if not Path(ckpt).is_file():
        raise argparse.ArgumentTypeError(f"checkpoint {ckpt} does not exist.")
    return data, Path(ckpt)


def edge_sharpness(images: torch.Tensor, originals: torch.Tensor, threshold: float = 0.25) -> float:
    """Gradient magnitude at the originals' edges relative to the originals' own (1 = as sharp; a blurred edge
    spreads its step over several pixels and scores lower). Pixels where the original's |dx| + |dy| (mean over
    colour channels, images in [-1, 1]) is below ``threshold`` are ignored, so noise in flat regions does not count.
    images, originals: [N, 3, H, W]."""

    def magnitude(x: torch.Tensor) -> torch.Tensor:  # [N, H-1, W-1]
        dx = (x[..., :-1, 1:] - x[..., :-1, :-1]).abs()
        dy = (x[..., 1:, :-1] - x[..., :-1, :-1]).abs()
        return (dx + dy).mean(dim=1)

    reference = magnitude(originals)
    edges = reference > threshold
    return float(magnitude(images)[edges].sum() / reference[edges].sum())


def validation_images(data: str, n: int) -> torch.Tensor:
    """The first ``n`` validation images of ``configs/data/<data>.yaml``, [n, 3, H, W] in [-1, 1]."""
    cfg = OmegaConf.merge({"paths": {"data_dir": str(ROOT / "data")}}, {"data": OmegaConf.load(
        ROOT / "configs" / "data" / f"{data}.yaml")})
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if not k.startswith("_")}
    kwargs.update(num_workers=0, val_batch_size=min(n, 256))
    dm = WebDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("validate")
    images = []
    for batch in dm.val_dataloader():
        images.append(batch["image"])
        if sum(len(b) for b in images) >= n:
            break
    return torch.cat(images)[:n].float()


@torch.no_grad()
def evaluate(data: str, ckpt: Path, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One result row per run of ``args.runs`` (and the bicubic numbers in each) for one checkpoint."""
    model = load_upscaler(str(ckpt)).to(device)
    scale = model.scale
    images = validation_images(data, args.num_images).to(device)  # [N, 3, H, W]
    low = area_downsample(images, scale)  # [N, 3, h, w]
    bicubic = bicubic_upsample(low, scale)
    psnr_bicubic = psnr_per_image(bicubic, images).tolist()
    rows, outputs = [], []
    for sampler, steps in args.runs:
        generator = torch.Generator(device).manual_seed(0)
        start = time.perf_counter()
        ours = torch.cat([upscale(model, chunk, sampler=sampler, steps=steps, noise_level=args.noise_level,
                                  generator=generator, spacing=args.spacing) for chunk in low.split(args.batch_size)])
        seconds = (time.perf_counter() - start) / len(images)
        psnr = psnr_per_image(ours, images).tolist()
        margin = torch.tensor(psnr) - torch.tensor(psnr_bicubic)
        outputs.append((f"{sampler} {steps}", ours, psnr))
        rows.append({"data": data, "scale": scale, "size": f"{low.shape[2]} -> {images.shape[2]} px",
                     "n": len(images), "run": f"{sampler}:{steps}", "psnr": sum(psnr) / len(psnr),
                     "psnr_bicubic": sum(psnr_bicubic) / len(psnr), "margin": float(margin.mean()),
                     "ci95": 1.96 * float(margin.std()) / math.sqrt(len(margin)),
                     "wins": float((margin > 0).float().mean()), "seconds": seconds, "ckpt": str(ckpt),
                     "sharpness": edge_sharpness(ours, images), "sharpness_bicubic": edge_sharpness(bicubic, images)})
        print(f"{data} x{scale} {sampler}:{steps}: {rows[-1]['psnr']:.2f} dB (bicubic {rows[-1]['psnr_bicubic']:.2f})",
              file=sys.stderr)
    if args.grid_dir:
        rows[0]["grid"] = str(write_grid(Path(args.grid_dir) / f"upscaler_{data}_x{scale}.png", images, low,
                                         bicubic, psnr_bicubic, outputs, args.grid_images))
    return rows


def write_grid(path: Path, images: torch.Tensor, low: torch.Tensor, bicubic: torch.Tensor, psnr_bicubic: list[float],
               outputs: list[tuple[str, torch.Tensor, list[float]]], k: int) -> Path:
    """One row per image: low-res (nearest) | bicubic | every run | original, PSNRs in the captions."""
    k = min(k, len(images))
    nearest = torch.nn.functional.interpolate(low[:k], size=images.shape[2:], mode="nearest")
    columns = [nearest, bicubic[:k], *(out[:k] for _, out, _ in outputs), images[:k]]
    cells = torch.stack(columns, dim=1).flatten(0, 1)  # [k * columns, 3, H, W]
    captions = []
    for i in range(k):
        captions += ["low-res", f"bicubic {psnr_bicubic[i]:.1f} dB",
                     *(f"{name}: {psnr[i]:.1f} dB" for name, _, psnr in outputs), "original"]
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(((cells + 1) / 2).clamp(0, 1).cpu(), captions=captions, ncol=len(columns)).save(path)
    return path


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Held-out validation images, area-downsampled; ours: SAMPLER:STEPS on {args.spacing} sigmas, noise level "
             f"{args.noise_level}, seed 0. Per-image PSNR averaged; margin = ours - bicubic (paired, 95 % interval). "
             f"Edge sharpness: gradient magnitude on the originals' edges relative to the originals' (100 % = as "
             f"sharp as the original; noise in flat regions does not count).", "",
             "| data | scale | size | images | ours | bicubic PSNR | ours PSNR | margin | ours better "
             "| edge sharpness bicubic | edge sharpness ours | s / image |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['data']} | x{r['scale']} | {r['size']} | {r['n']} | {r['run']} | "
                     f"{r['psnr_bicubic']:.2f} dB | {r['psnr']:.2f} dB | "
                     f"**{r['margin']:+.2f} ± {r['ci95']:.2f} dB** | "
                     f"{100 * r['wins']:.0f} % | "
                     f"{100 * r['sharpness_bicubic']:.0f} % | {100 * r['sharpness']:.0f} % | {r['seconds']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", nargs="+", type=parse_eval, required=True, metavar="DATA=CKPT")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[("ddpm", 20)], metavar="SAMPLER:STEPS",
                        help="upscaler settings to compare (default ddpm:20); samplers: ddpm ddim euler euler_a heun "
                             "dpmpp_2m")
    parser.add_argument("--spacing", default="karras", help="sigma spacing: karras | leading | trailing | linspace")
    parser.add_argument("--noise-level", type=int, default=0)
    parser.add_argument("--grid-dir", default=None, help="write upscaler_<DATA>_x<scale>.png grids here")
    parser.add_argument("--grid-images", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = [row for data, ckpt in args.eval for row in evaluate(data, ckpt, args, device)]
    body = table(results, args)
    print(body)
    for r in results:
        print(f"{r['data']} x{r['scale']}: {r['ckpt']}" + (f" -> grid {r['grid']}" if "grid" in r else ""),
              file=sys.stderr)
    if args.append:
        append_markdown(args.append, "Diffusion upscaler vs bicubic (benchmarks/upscaler_psnr.py)", body)


if __name__ == "__main__":
    main()
