"""Frozen text encoder (``OpenCLIPTextEncoder.encode``) in the sequence-first layout we build it in against
open_clip's own batch-first layout, in fp32 and under bf16 autocast.

Batch-first, ``nn.MultiheadAttention`` projects a transposed view of its input; with a weight that needs no
gradient torch's ``matmul`` then runs ``bmm`` over the weight expanded once per token, which CPU bf16 copies
(:func:`ldm.modules.clip_configs.run_sequence_first`). A frozen text encoder under ``bf16-mixed`` (online text
encoding in stage 2, ``scripts/encode_latents.py`` with ``precision=bf16``) runs exactly that. The script times
both layouts on one encoder (random weights: the cost is what is measured), alternating, and checks that their
outputs agree.

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

from _report import add_malloc_flag, append_markdown, keep_host_memory, load_average, malloc_label  # noqa: E402
from ldm.modules.clip_configs import run_sequence_first  # noqa: E402
from ldm.modules.conditioning import OpenCLIPTextEncoder  # noqa: E402

# name -> (open_clip architecture, quick_gelu, context length, prompts per batch)
CONFIGS = {
    "quickstart": ("ldm-tiny-clip", False, 32, 64),  # configs/experiment/quickstart_ldm.yaml's text encoder
    "vit-l": ("ViT-L-14", True, 77, 4),  # SD 1.x (configs/model/sd15.yaml), cached_latents.py's batch
    "vit-h": ("ViT-H-14", False, 77, 4),  # SD 2.x
}
PROMPTS = ["a red circle", "a small green square in the top left on a white background", "a blue triangle", ""]


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
    layouts = {"sequence-first (ours)": True, "batch-first (open_clip)": False}
    outputs = {}
    for label, sequence_first in layouts.items():
        run_sequence_first(encoder, sequence_first)
        outputs[label] = encoder.encode(prompts)["context"]  # [B, L, D]
    difference = (outputs["sequence-first (ours)"] - outputs["batch-first (open_clip)"]).abs().max().item()
    times = {(label, bf16): [] for label in layouts for bf16 in (False, True)}
    for r in range(rounds):
        for label in (list(layouts) if r % 2 == 0 else list(reversed(layouts))):
            run_sequence_first(encoder, layouts[label])
            for bf16 in (False, True):
                median_ms(encoder, prompts, bf16, 1)  # warm-up of this layout and precision
                times[label, bf16].append(median_ms(encoder, prompts, bf16, iters))
    params = sum(p.numel() for p in encoder.parameters()) / 1e6
    return {"name": name, "arch": arch, "batch": batch, "context": context, "params": params,
            "difference": difference, "ms": {key: statistics.median(v) for key, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["quickstart", "vit-l"])
    parser.add_argument("--iters", type=int, default=10, help="timed encodes per layout, precision and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median over them)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_malloc_flag(parser)
    parser.add_argument("--append", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_host_memory(args)

    lines = [f"Frozen `OpenCLIPTextEncoder.encode` (random weights, no_grad), cpu ({torch.get_num_threads()} threads), "
             f"median of {args.rounds} alternating rounds of {args.iters} encodes; "
             f"{malloc_label(kept)}; load average {load_average()}. "
             "Max |difference| of the context between layouts in fp32.", "",
             "| config | arch | prompts x tokens | params | layout | fp32 ms | bf16 autocast ms | max diff |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name in args.configs:
        r = bench(name, args.iters, args.rounds)
        for label in ("sequence-first (ours)", "batch-first (open_clip)"):
            row = (f"| {name} | {r['arch']} | {r['batch']} x {r['context']} | {r['params']:.1f}M | {label} | "
                   f"{r['ms'][label, False]:.1f} | {r['ms'][label, True]:.1f} | {r['difference']:.1e} |")
            lines.append(row)
            print(row, flush=True)
    if args.append:
        append_markdown(args.append, "Frozen text encoder: sequence-first against batch-first", "\n".join(lines))


if __name__ == "__main__":
    main()
