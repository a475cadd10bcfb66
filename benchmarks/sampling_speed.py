"""Sampling speed of ``ldm.modules.unet.UNetModel`` against diffusers ``UNet2DConditionModel``, same weights, same loop.

Our U-Net gets seeded random weights (every parameter, so no zero-initialised output hides a path) and is exported
to the diffusers layout through ``ldm.convert.unet`` (``unet_sd_to_diffusers`` + ``diffusers_unet_config``). Both
networks are then driven by the very same sampler: ``ldm.diffusion.samplers.sample_dpmpp_2m`` over
``DiscreteDenoiser`` (eps) inside ``CFGDenoiser`` (classifier-free guidance: one batched U-Net call of 2 x images
per step), from the same noise and text context. The script checks that the two final latents agree, then times
whole sampling runs, alternating the two networks in one process, and prints the median iterations/s (sampler
steps, each one U-Net call on the CFG batch), images/s and the ratio (> 1: ours is faster).

    python benchmarks/sampling_speed.py                               # quickstart + sd15 (reduced width), CPU
    python benchmarks/sampling_speed.py --config sd15 --images 2 --steps 20 --threads 1 --clock cpu
    python benchmarks/sampling_speed.py --device cuda --bf16 --images 8 --append BENCHMARKS.md

Text encoding and decoding are left out: they are the same code on both sides. Topologies: ``CONFIGS`` of
``benchmarks/unet_step.py`` (the quickstart U-Net without its pooled-text MLP, SD-1.5 at reduced width).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import (add_speed_flags, append_markdown, apply_speed_flags, device_label,  # noqa: E402
                     enabled_speed_flags, load_average)  # (benchmarks/_report.py)
from unet_step import CONFIGS, full_fp32  # noqa: E402  (same topologies as the training-step benchmark)

from ldm.convert.unet import diffusers_unet_config, unet_sd_to_diffusers  # noqa: E402
from ldm.diffusion.denoiser import DiscreteDenoiser  # noqa: E402
from ldm.diffusion.guidance import CFGDenoiser  # noqa: E402
from ldm.diffusion.samplers import get_sigmas, sample_dpmpp_2m  # noqa: E402
from ldm.diffusion.schedule import NoiseSchedule  # noqa: E402
from ldm.modules.unet import UNetModel  # noqa: E402


def build_pair(params: dict, device: torch.device, channels_last: bool, seed: int = 0):
    """(ours, diffusers) in eval mode: ours with seeded random weights, diffusers loaded from its export."""
    from diffusers import UNet2DConditionModel

    ours = UNetModel(**params)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    theirs = UNet2DConditionModel(**diffusers_unet_config(params))
    theirs.load_state_dict(unet_sd_to_diffusers(ours.state_dict(), params))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return ours.to(device, memory_format=fmt).eval(), theirs.to(device, memory_format=fmt).eval()


def bench(name: str, args) -> dict:
    params, _, size = CONFIGS[name]
    device = torch.device(args.device)
    ours, theirs = build_pair(params, device, args.channels_last)
    run_ours, run_theirs = (torch.compile(ours), torch.compile(theirs)) if args.compile else (ours, theirs)
    networks = {
        "ours": lambda x, t, context: run_ours(x, t, context),
        "diffusers": lambda x, t, context: run_theirs(x, t, encoder_hidden_states=context).sample,
    }
    schedule = NoiseSchedule.from_config().to(device)
    sigmas = get_sigmas(schedule, args.steps).to(device)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(args.images, params["in_channels"], size, size, generator=generator).to(device)
    cond = {"context": torch.randn(args.images, 77, params["context_dim"], generator=generator).to(device)}
    uncond = {"context": torch.randn(args.images, 77, params["context_dim"], generator=generator).to(device)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def sample(key: str, precision=autocast) -> torch.Tensor:
        denoiser = CFGDenoiser(DiscreteDenoiser(networks[key], schedule, "eps"), args.cfg_scale)
        with precision, torch.inference_mode():
            return sample_dpmpp_2m(denoiser, noise * sigmas[0], sigmas, extra_args={"cond": cond, "uncond": uncond},
                                   progress=False)

    # Same function: compared in full fp32 (bf16 or TF32 rounding, compounded over the sampler's steps, would blur
    # a real mismatch), then one warm-up (and compilation) run each at the timed precision.
    with full_fp32():
        a, b = sample("ours", nullcontext()).float(), sample("diffusers", nullcontext()).float()
    rel_err = ((a - b).norm() / b.norm()).item()
    if rel_err > 1e-3:
        raise RuntimeError(f"{name}: the two samplings differ (relative error {rel_err:.2e}); the comparison is void.")
    sample("ours"), sample("diffusers")
    times = {k: [] for k in networks}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for i in range(args.repeats):
        for key in (list(networks) if i % 2 == 0 else list(reversed(networks))):  # alternate who goes first
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            sample(key)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append(clock() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"config": name, "images": args.images, "latent": size, "steps": args.steps, "rel_err": rel_err,
            "ours_its": args.steps / med["ours"], "diffusers_its": args.steps / med["diffusers"],
            "ours_ips": args.images / med["ours"], "diffusers_ips": args.images / med["diffusers"],
            "ratio": med["diffusers"] / med["ours"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=1, help="images per sampling run (the U-Net sees 2x: CFG)")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++(2M) steps")
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed sampling runs per network (alternating)")
    add_speed_flags(parser)
    args = parser.parse_args()
    apply_speed_flags(parser, args)

    names = [n for n in CONFIGS if n != "sd15-tiny"] if args.config == "all" else [args.config]
    lines = [
        f"device: {device_label(args.device)}; flags: {enabled_speed_flags(args)}; DPM-Solver++(2M), CFG scale {args.cfg_scale} "
        f"(U-Net batch 2 x images); {args.clock} clock, median of {args.repeats} alternating runs after one warm-up "
        f"run each; load average {load_average()}",
        "",
        "| config | images | latent | steps | rel. err | ours it/s | diffusers it/s | ours img/s | diffusers img/s "
        "| ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        r = bench(name, args)
        lines.append(f"| {r['config']} | {r['images']} | {r['latent']} | {r['steps']} | {r['rel_err']:.1e} | "
                     f"{r['ours_its']:.2f} | {r['diffusers_its']:.2f} | {r['ours_ips']:.3f} | "
                     f"{r['diffusers_ips']:.3f} | {r['ratio']:.2f}x |")
        print(lines[-1], file=sys.stderr, flush=True)
    body = "\n".join(lines)
    print(body)
    if args.append:
        append_markdown(args.append, "Sampling speed against diffusers", body)


if __name__ == "__main__":
    main()
