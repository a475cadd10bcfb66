"""Training-step speed of ``ldm.modules.unet.UNetModel`` against diffusers ``UNet2DConditionModel``.

Both networks get the same topology (through ``ldm.convert.unet.diffusers_unet_config``) and the same
weights (converted from the diffusers model); the script checks that their outputs agree, then times
forward + backward of both, alternating runs in one process, and prints the medians and their ratio.

    python benchmarks/unet_step.py                       # CPU, both configs
    python benchmarks/unet_step.py --device cuda --bf16 --channels-last
    python benchmarks/unet_step.py --config sd15 --compile --iters 30
    python benchmarks/unet_step.py --threads 1 --clock cpu --append BENCHMARKS.md    # on a CPU shared with other jobs

Ratio = diffusers time / ours (> 1: ours is faster). Flags apply to both networks (``--compile`` compiles both, so
the ratio stays apples-to-apples). ``--clock cpu`` times with this process's CPU time instead of the wall clock:
on a busy machine the wall clock mostly measures the other jobs, CPU time the step (CPU only; with one thread it
is the step's compute). Freed host memory is kept for reuse, as ``train.py`` keeps it (``--malloc-defaults``: glibc's
defaults, under which a process may page-fault its activations in afresh every step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: ldm without an install

from _report import (add_speed_flags, append_markdown, apply_speed_flags, device_label,  # noqa: E402
                     enabled_speed_flags, load_average)  # (benchmarks/_report.py)
from ldm.convert.unet import diffusers_unet_config, unet_diffusers_to_sd  # noqa: E402
from ldm.modules.unet import UNetModel  # noqa: E402

# name -> (U-Net params in SD naming, batch size, latent size)
CONFIGS = {
    # the quickstart LDM's U-Net (configs/model/ldm_tiny.yaml, without its pooled-text MLP, which diffusers
    # spells differently): 8x8 latents, batch 64, 128-wide tiny CLIP context
    "quickstart": (
        dict(image_size=8, in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[1, 2],
             num_res_blocks=1, channel_mult=[1, 2], num_head_channels=32, use_spatial_transformer=True,
             transformer_depth=1, context_dim=128, use_linear_in_transformer=True, legacy=False),
        64, 8,
    ),
    # SD-1.5 topology (attention at 3 of 4 levels, 2 ResBlocks, 8 heads, conv projections), reduced width
    "sd15": (
        dict(image_size=32, in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[4, 2, 1],
             num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
             transformer_depth=1, context_dim=256, legacy=False),
        2, 32,
    ),
    # the same topology at tiny width and size: per-op overhead dominates, as for small models on a GPU
    "sd15-tiny": (
        dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
             num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
             transformer_depth=1, context_dim=32, legacy=False),
        1, 8,
    ),
}


def build_pair(params: dict, device: torch.device, channels_last: bool, share_weights: bool = False):
    """(ours, diffusers) with the same weights: copies, or with ``share_weights`` the very same
    Parameter objects (and so the same ``.grad``), which halves the memory of a full-size pair."""
    from diffusers import UNet2DConditionModel

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    theirs = UNet2DConditionModel(**diffusers_unet_config(params)).to(device, memory_format=fmt)
    if share_weights:
        return shared_weights_copy(theirs, params, unet_diffusers_to_sd), theirs
    ours = UNetModel(**params)
    ours.load_state_dict(unet_diffusers_to_sd(theirs.state_dict(), params))
    return ours.to(device, memory_format=fmt), theirs


def shared_weights_copy(source: torch.nn.Module, params: dict, rename=lambda sd, params: sd) -> UNetModel:
    """``UNetModel(**params)`` built on the meta device that uses the Parameters of ``source`` (renamed by
    ``rename(state_dict, params)``) instead of its own: no memory, one set of weights and grads."""
    with torch.device("meta"):
        ours = UNetModel(**params)
    ours.load_state_dict(rename(source.state_dict(keep_vars=True), params), assign=True)
    return ours


@contextmanager
def full_fp32():
    """TF32 off inside (CUDA matmuls and cuDNN convolutions round their inputs to 10 mantissa bits with it, a
    relative error near 1e-3 that would hide a real mismatch); the previous settings are restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_outputs(ours, theirs, x, t, ctx) -> float:
    """Relative L2 difference of the two networks' outputs on one batch, in full fp32."""
    ours.eval(), theirs.eval()
    with torch.no_grad(), full_fp32():
        a = ours(x, t, ctx).float()
        b = theirs(x, t, encoder_hidden_states=ctx).sample.float()
    ours.train(), theirs.train()
    return ((a - b).norm() / b.norm()).item()


def step(model, call, target, autocast, set_to_none: bool = True) -> None:
    """One forward + backward; ``set_to_none=False`` keeps the ``.grad`` tensors (zeroed) instead of
    allocating them again in the backward pass."""
    model.zero_grad(set_to_none=set_to_none)
    with autocast:
        out = call()
    torch.nn.functional.mse_loss(out.float(), target).backward()


def bench(name: str, args) -> dict:
    params, batch, size = CONFIGS[name]
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours, theirs = build_pair(params, device, args.channels_last)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(batch, params["in_channels"], size, size, device=device).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), device=device)
    ctx = torch.randn(batch, 77, params["context_dim"], device=device)
    target = torch.randn(batch, params["out_channels"], size, size, device=device)
    rel_err = check_outputs(ours, theirs, x, t, ctx)
    if rel_err > 1e-4:
        raise RuntimeError(f"{name}: outputs differ (relative error {rel_err:.2e}); the comparison is void.")

    run_ours, run_theirs = ours, theirs
    if args.compile:
        run_ours, run_theirs = torch.compile(ours), torch.compile(theirs)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    calls = {
        "ours": (ours, lambda: run_ours(x, t, ctx)),
        "diffusers": (theirs, lambda: run_theirs(x, t, encoder_hidden_states=ctx).sample),
    }
    times = {k: [] for k in calls}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for i in range(args.warmup + args.iters):
        order = list(calls) if i % 2 == 0 else list(reversed(calls))  # alternate who goes first
        for key in order:
            model, call = calls[key]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            step(model, call, target, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[key].append(clock() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    params_m = sum(p.numel() for p in ours.parameters()) / 1e6
    return {"config": name, "batch": batch, "latent": size, "params_M": params_m, "rel_err": rel_err,
            "ours_ms": med["ours"] * 1e3, "diffusers_ms": med["diffusers"] * 1e3,
            "ratio": med["diffusers"] / med["ours"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    add_speed_flags(parser)
    args = parser.parse_args()
    apply_speed_flags(parser, args)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True

    names = list(CONFIGS) if args.config == "all" else [args.config]
    lines = [f"device: {device_label(args.device)}; torch {torch.__version__}; flags: {enabled_speed_flags(args)}; "
             f"{args.clock} clock, median of {args.iters} alternating forward+backward steps after {args.warmup} "
             f"warm-up; load average {load_average()}",
             "",
             "| config | batch | latent | params | rel. err | ours ms | diffusers ms | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name in names:
        r = bench(name, args)
        lines.append(f"| {r['config']} | {r['batch']} | {r['latent']} | {r['params_M']:.1f}M | {r['rel_err']:.1e} | "
                     f"{r['ours_ms']:.1f} | {r['diffusers_ms']:.1f} | {r['ratio']:.2f}x |")
        print(lines[-1], flush=True)
    if args.append:
        append_markdown(args.append, "U-Net training step against diffusers", "\n".join(lines))


if __name__ == "__main__":
    main()
