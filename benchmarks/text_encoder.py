"""Frozen text encoder (``OpenCLIPTextEncoder.encode``) as we build it against open_clip's own towers, in fp32 and
under bf16 autocast.

Three variants of one encoder (random weights: the cost is what is measured), timed alternating, their outputs
checked against each other:

- ours: sequence-first, attention product in fp32 under CPU autocast (``ldm/modules/clip_attention.py``);
- sequence-first with torch's ``nn.MultiheadAttention`` (the product in bf16 under autocast);
- open_clip's batch-first layout with torch's attention, as open_clip builds it. Batch-first,
  ``nn.MultiheadAttention`` projects a transposed view of its input; with a weight that needs no gradient torch's
  ``matmul`` then runs ``bmm`` over the weight expanded once per token, which CPU bf16 copies
  (:func:`ldm.modules.clip_configs.run_sequence_first`).

A frozen text encoder under ``bf16-mixed`` (online text encoding in stage 2, ``scripts/encode_latents.py`` with
``precision=bf16``) runs what is timed here.

    python benchmarks/text_encoder.py --threads 2                       # ldm-tiny-clip (quickstart) and ViT-L/14
    python benchmarks/text_encoder.py --configs vit-h --iters 5         # SD 2.x's ViT-H/14
    python benchmarks/text_encoder.py --threads 2 --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import (add_alternating_cpu_flags, append_markdown, load_average, malloc_label,  # noqa: E402
                     start_alternating_cpu_run)
from ldm.modules.clip_attention import take_attention_products_in_fp32  # noqa: E402
from ldm.modules.clip_configs import run_sequence_first  # noqa: E402
from ldm.modules.conditioning import OpenCLIPTextEncoder  # noqa: E402

# name -> (open_clip architecture, quick_gelu, context length, prompts per batch)
CONFIGS = {
    "quickstart": ("ldm-tiny-clip", False, 32, 64),  # configs/experiment/quickstart_ldm.yaml's text encoder
    "vit-l": ("ViT-L-14", True, 77, 4),  # SD 1.x (configs/model/sd15.yaml), cached_latents.py's batch
    "vit-h": ("ViT-H-14", False, 77, 4),  # SD 2.x
}
PROMPTS = ["a red circle", "a small green square in the top left on a white background", "a blue triangle", ""]
OURS = "sequence-first, fp32 product (ours)"
# label -> (sequence-first, attention product in fp32 under CPU autocast)
VARIANTS = {OURS: (True, True), "sequence-first, torch attention": (True, False),
            "batch-first, torch attention (open_clip)": (False, False)}


def configure(encoder: OpenCLIPTextEncoder, label: str) -> None:
    sequence_first, fp32_product = VARIANTS[label]
    run_sequence_first(encoder, sequence_first)
    take_attention_products_in_fp32(encoder, fp32_product)


def median_ms(encoder: OpenCLIPTextEncoder, prompts: list[str], bf16: bool, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            encoder.encode(prompts)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench(name: str, iters: int, rounds: int) -> dict:
    arch, quick_gelu, context, batch = CONFIGS[name]
    torch.manual_seed(0)
    encoder = OpenCLIPTextEncoder(arch, quick_gelu=quick_gelu, context_length=context)  # frozen, sequence-first
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    outputs = {}
    for label in VARIANTS:
        configure(encoder, label)
        outputs[label] = encoder.encode(prompts)["context"]  # [B, L, D], fp32
    difference = max((outputs[label] - outputs[OURS]).abs().max().item() for label in VARIANTS)
    times = {(label, bf16): [] for label in VARIANTS for bf16 in (False, True)}
    for r in range(rounds):
        for label in (list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))):
            configure(encoder, label)
            for bf16 in (False, True):
                median_ms(encoder, prompts, bf16, 1)  # warm-up of this variant and precision
                times[label, bf16].append(median_ms(encoder, prompts, bf16, iters))
    params = sum(p.numel() for p in encoder.parameters()) / 1e6
    return {"name": name, "arch": arch, "batch": batch, "context": context, "params": params,
            "difference": difference, "ms": {key: statistics.median(v) for key, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["quickstart", "vit-l"])
    parser.add_argument("--iters", type=int, default=10, help="timed encodes per variant, precision and round")
    add_alternating_cpu_flags(parser)
    args = parser.parse_args()
    kept = start_alternating_cpu_run(args)

    lines = [f"Frozen `OpenCLIPTextEncoder.encode` (random weights, no_grad), cpu ({torch.get_num_threads()} threads), "
             f"median of {args.rounds} alternating rounds of {args.iters} encodes; "
             f"{malloc_label(kept)}; load average {load_average()}. "
             "Max |difference| of the context between the variants in fp32.", "",
             "| config | arch | prompts x tokens | params | variant | fp32 ms | bf16 autocast ms | max diff |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name in args.configs:
        r = bench(name, args.iters, args.rounds)
        for label in VARIANTS:
            row = (f"| {name} | {r['arch']} | {r['batch']} x {r['context']} | {r['params']:.1f}M | {label} | "
                   f"{r['ms'][label, False]:.1f} | {r['ms'][label, True]:.1f} | {r['difference']:.1e} |")
            lines.append(row)
            print(row, flush=True)
    if args.append:
        append_markdown(args.append, "Frozen text encoder: ours against open_clip's layout and attention", "\n".join(lines))


if __name__ == "__main__":
    main()
