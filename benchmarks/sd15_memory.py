"""SD-1.5 U-Net training step: time, activation memory and MFU, with and without gradient checkpointing.

Builds the SD-1.5 U-Net (``configs/model/unet/sd15.yaml``: 320 channels, 859.5M parameters) as
``ldm.modules.unet.UNetModel`` twice, without and with ``use_checkpoint``, and, when diffusers is installed,
diffusers' ``UNet2DConditionModel`` at the identical topology (``unet_step.build_pair``), toggled with
``enable_gradient_checkpointing()``. All of them share one set of Parameters (and so of ``.grad``), so
the weights are held once; their outputs are checked to agree. Each variant then runs forward + MSE loss
+ backward on the same batch (noisy latents [B, 4, 32, 32] = 256 px, timesteps, text context
[B, 77, 768]), alternating variants, and the table gives the median step time, images/s, achieved
TFLOP/s, MFU (CUDA) and the activation memory.

    python benchmarks/sd15_memory.py                                   # CPU: batch 1, fp32, with diffusers
    python benchmarks/sd15_memory.py --device cuda                     # batch 32, bf16 autocast, SDPA
    python benchmarks/sd15_memory.py --device cuda --compile --channels-last --no-checkpointing --no-diffusers
    python benchmarks/sd15_memory.py --batch 2 --width 32 --dtype bf16 --no-diffusers   # the CUDA path, small
    python benchmarks/sd15_memory.py --append BENCHMARKS.md

Activation memory = the peak, during one forward + backward, of the memory allocated in that step, i.e.
peak minus the memory held before the forward. Weights, their ``.grad`` (allocated by an earlier step and
zeroed in place, ``zero_grad(set_to_none=False)``) and the inputs are excluded.
  - CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus ``memory_allocated()`` before it.
  - CPU has no allocator statistics, so ``LiveTensorBytes`` (a ``TorchDispatchMode``; on the eager model,
    also under ``--compile``, whose kernels allocate outside the dispatcher) counts it: every
    storage an aten op creates (outputs that share no storage with the op's inputs) is added when created
    and subtracted when it dies (a weakref finalizer on the storage); the peak of that sum is the
    activation memory. It sees every op of the forward, of the backward and of checkpoint recomputation,
    is exact and deterministic (unlike process RSS, which the malloc cache and first-call code paging
    blur), and misses only scratch buffers that a kernel allocates and frees internally. Cross-check at
    width 128, batch 1: 184 / 46 MiB (without / with checkpointing) against 185 / 54 MiB of peak-RSS
    growth in a fresh process after a warm-up step (VmHWM reset, malloc forced to mmap and unmap).

FLOPs per training image: ``torch.utils.flop_counter.FlopCounterMode`` on one forward + backward at batch 1
of the model without checkpointing (model FLOPs: recomputation is not counted, as MFU requires), with
the CPU flash-attention kernels added to its table. MFU = FLOPs per image x images/s / ``--peak-tflops``
(989 TFLOP/s: H100 SXM dense bf16).

Only torch and ldm.modules.unet (with ldm.convert, which imports nothing more) are needed, plus
PyYAML (a Lightning dependency) to read the config; diffusers is optional and skipped when absent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import append_markdown  # noqa: E402  (benchmarks/_report.py)
from ldm.modules.unet import UNetModel  # noqa: E402
from unet_step import build_pair, check_outputs, shared_weights_copy, step  # noqa: E402  (benchmarks/unet_step.py)

SD15_UNET = ROOT / "configs" / "model" / "unet" / "sd15.yaml"
aten = torch.ops.aten
# SDPA on CPU runs these kernels, which FlopCounterMode's table lacks (it has the CUDA ones); the
# formulas get tensor shapes: q, k, v [B, heads, N, D] (backward: grad_out first)
CPU_SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v),
}


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages that aten ops create while the mode is active and that are still
    alive (``live``), and the largest value that sum reached (``peak``)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}  # data_ptr of a tracked storage -> its bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size and ptr not in inputs and ptr not in self._sizes:  # new: not a view / in-place result
                self._sizes[ptr] = size
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, ptr)
        return out

    def _free(self, ptr: int) -> None:
        self.live -= self._sizes.pop(ptr)


@dataclass
class Variant:
    impl: str                                  # "ours" | "diffusers"
    checkpointing: bool
    module: torch.nn.Module                    # holds the (shared) parameters
    eager: Callable                            # (x, t, ctx) -> [B, 4, H, W]
    forward: Callable                          # the same, compiled with --compile
    prepare: Callable[[], None] = lambda: None  # switches diffusers' checkpointing for this variant


def unet_params(width: int) -> dict:
    params = yaml.safe_load(SD15_UNET.read_text())
    return dict(params, model_channels=width, use_checkpoint=False)


def build_variants(params: dict, device: torch.device, args) -> list[Variant]:
    """Our U-Net without / with checkpointing (only without when ``args.checkpointing`` is off) and, with
    ``args.diffusers``, diffusers' at the same topology likewise; all share one set of Parameters."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    theirs = None
    if args.diffusers:
        plain, theirs = build_pair(params, device, args.channels_last, share_weights=True)
    else:
        with torch.device(device):
            plain = UNetModel(**params).to(memory_format=fmt)
    compile_ = torch.compile if args.compile else (lambda m: m)
    variants = [Variant("ours", False, plain, plain, compile_(plain))]
    if args.checkpointing:
        ckpt = shared_weights_copy(plain, dict(params, use_checkpoint=True))
        variants.append(Variant("ours", True, ckpt, ckpt, compile_(ckpt)))
    if theirs is None:
        return variants
    run_theirs = compile_(theirs)
    eager = lambda x, t, ctx: theirs(x, t, encoder_hidden_states=ctx).sample  # noqa: E731
    call = lambda x, t, ctx: run_theirs(x, t, encoder_hidden_states=ctx).sample  # noqa: E731
    variants.append(Variant("diffusers", False, theirs, eager, call, theirs.disable_gradient_checkpointing))
    if args.checkpointing:
        variants.append(Variant("diffusers", True, theirs, eager, call, theirs.enable_gradient_checkpointing))
    return variants


def make_inputs(batch: int, size: int, context_dim: int, device: torch.device, channels_last: bool):
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 4, size, size, generator=gen).to(device, memory_format=fmt)  # [B, 4, H, W]
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)                     # [B]
    ctx = torch.randn(batch, 77, context_dim, generator=gen).to(device)                # [B, 77, D]
    target = torch.randn(batch, 4, size, size, generator=gen).to(device)               # [B, 4, H, W]
    return x, t, ctx, target


def run_step(v: Variant, inputs, autocast) -> None:
    x, t, ctx, target = inputs
    step(v.module, lambda: v.forward(x, t, ctx), target, autocast, set_to_none=False)


def flops_per_image(v: Variant, inputs, autocast) -> int:
    """FLOPs of forward + backward for one image (batch 1), counted by FlopCounterMode; also allocates
    the ``.grad`` tensors, so that later steps only zero them."""
    v.prepare()
    x, t, ctx, target = (tensor[:1] for tensor in inputs)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        step(v.module, lambda: v.eager(x, t, ctx), target, autocast, set_to_none=False)
    return counter.get_total_flops()


def activation_bytes(v: Variant, inputs, autocast, device: torch.device) -> tuple[int, int]:
    """(peak bytes allocated during one step, bytes still allocated after it) beyond what was held before."""
    v.prepare()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_step(v, inputs, autocast)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before
    x, t, ctx, target = inputs
    with LiveTensorBytes() as tracker:  # eager: compiled code allocates its buffers outside the dispatcher
        step(v.module, lambda: v.eager(x, t, ctx), target, autocast, set_to_none=False)
    return tracker.peak, tracker.live


def timed_steps(variants: list[Variant], inputs, autocast, device: torch.device, repeats: int) -> dict:
    """Median seconds per step of each variant; the order alternates from one repeat to the next."""
    times: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    for r in range(repeats):
        order = range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))
        for i in order:
            variants[i].prepare()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run_step(variants[i], inputs, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - start)
    return {i: statistics.median(ts) for i, ts in times.items()}


def report(args, device, params, variants, flops, rel_err, seconds, memory) -> str:
    n_params = sum(p.numel() for p in variants[0].module.parameters())
    on_cuda = device.type == "cuda"
    devname = torch.cuda.get_device_name(device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    flags = [f for f, on in (("channels_last", args.channels_last), ("torch.compile", args.compile)) if on]
    flop_text = ", ".join(f"{impl} {f / 1e9:.1f}" for impl, f in flops.items())
    precision = "bf16 autocast" if args.dtype == "bf16" else "fp32"
    parity = (f"output difference ours vs diffusers (relative L2) {rel_err:.1e}" if rel_err is not None
              else "diffusers not compared (not installed, or --no-diffusers)")
    lines = [
        f"SD-1.5 U-Net topology, width {params['model_channels']} ({n_params / 1e6:.2f}M parameters); {devname}; "
        f"batch {args.batch}, latents {args.latent}x{args.latent} ({args.latent * 8} px), "
        f"context 77x{params['context_dim']}; {precision}, SDPA{''.join(', ' + f for f in flags)}; {parity}.",
        f"Forward + backward: median of {args.repeats} alternating repeats after {args.warmup + 1} untimed "
        f"step(s) per variant. FLOPs per training image (FlopCounterMode, fwd+bwd at batch 1, recomputation "
        f"not counted): {flop_text} GFLOP. Activation memory: peak allocated during the step minus memory "
        f"before it ({'CUDA allocator' if on_cuda else 'live tensor storages, LiveTensorBytes, eager model'}).",
        "",
        "| U-Net | checkpointing | step ms | images/s | TFLOP/s | MFU | activation MiB | memory vs plain "
        "| time vs plain | time ours/diffusers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    key = {(v.impl, v.checkpointing): i for i, v in enumerate(variants)}
    for i, v in enumerate(variants):
        plain = key[(v.impl, False)]
        ips = args.batch / seconds[i]
        tflops = flops[v.impl] * ips / 1e12
        mfu = f"{100 * tflops / args.peak_tflops:.1f}%" if on_cuda else "–"
        other = key.get(("diffusers", v.checkpointing))
        vs_diffusers = f"{seconds[i] / seconds[other]:.2f}" if v.impl == "ours" and other is not None else "–"
        lines.append(
            f"| {v.impl} | {'on' if v.checkpointing else 'off'} | {seconds[i] * 1e3:.1f} | {ips:.3g} | {tflops:.3g} | "
            f"{mfu} | {memory[i][0] / 2**20:.0f} | {memory[i][0] / memory[plain][0]:.2f} | "
            f"{seconds[i] / seconds[plain]:.2f} | {vs_diffusers} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 32 on CUDA")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="fp32, or bf16 autocast with fp32 weights (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--width", type=int, default=320, help="model_channels (320 = SD-1.5; 32 for a smoke run)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 3 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="extra untimed steps per variant before the memory step (default 0 CPU, 2 CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="only our U-Net")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="time the U-Nets without gradient checkpointing only (half the compilations)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="MFU denominator (H100 SXM dense bf16)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--append", type=Path, default=None, metavar="PATH",
                        help="append the table, command, machine and date to this Markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    args.batch = args.batch or (32 if on_cuda else 1)
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.repeats = args.repeats or (20 if on_cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (2 if on_cuda else 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not installed: timing our U-Net only.", file=sys.stderr)
            args.diffusers = False

    params = unet_params(args.width)
    torch.manual_seed(0)
    variants = build_variants(params, device, args)
    inputs = make_inputs(args.batch, args.latent, params["context_dim"], device, args.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    rel_err = None
    if args.diffusers:
        theirs = next(v.module for v in variants if v.impl == "diffusers")
        rel_err = check_outputs(variants[0].module, theirs, *inputs[:3])
        if rel_err > 1e-4:
            raise RuntimeError(f"ours and diffusers disagree (relative error {rel_err:.2e}): the comparison is void.")

    flops = {v.impl: flops_per_image(v, inputs, autocast) for v in variants if not v.checkpointing}
    for v in variants:
        for _ in range(args.warmup):
            v.prepare()
            run_step(v, inputs, autocast)
    memory = [activation_bytes(v, inputs, autocast, device) for v in variants]
    for v, (peak, left) in zip(variants, memory):
        if left > 0.05 * peak:
            print(f"warning: {v.impl} (checkpointing {v.checkpointing}) still holds {left / 2**20:.0f} MiB after "
                  f"the step: the activation figure may be off.", file=sys.stderr)
    seconds = timed_steps(variants, inputs, autocast, device, args.repeats)
    table = report(args, device, params, variants, flops, rel_err, seconds, memory)
    print(table)
    if args.append:
        append_markdown(args.append, "SD-1.5 U-Net step: gradient checkpointing, memory and MFU", table)


if __name__ == "__main__":
    main()
