"""Stage-0 CLIP training step (contrastive loss, backward, optimizer) in fp32 and under bf16 autocast, with the
attention product in fp32 (``ldm/modules/clip_attention.py``, as ``create_clip_model`` builds every open_clip
tower) and with torch's ``nn.MultiheadAttention``, whose product runs on the CPU's bf16 flash-attention kernels.

The model and batches come from the experiment's config (``configs/train.yaml`` + ``experiment=...``, as
``train.py`` composes it); one model is stepped by the three variants in turn (alternating order, rounds), and the
table gives the median ms per step and the speed against fp32. bf16 autocast is what ``trainer.precision=bf16-mixed``
wraps the step in.

    python benchmarks/clip_step.py --threads 1                       # quickstart_clip, one core as make quickstart
    python benchmarks/clip_step.py --experiment digits_clip --threads 2
    python benchmarks/clip_step.py --threads 1 --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hydra
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import (add_alternating_cpu_flags, append_markdown, load_average, malloc_label,  # noqa: E402
                     start_alternating_cpu_run)
from loop_overhead import compose_config, preload_batches  # noqa: E402
from ldm.modules.clip_attention import take_attention_products_in_fp32  # noqa: E402

# label -> (bf16 autocast, attention product in fp32 under CPU autocast)
VARIANTS = {"fp32": (False, True), "bf16 autocast, fp32 product (ours)": (True, True),
            "bf16 autocast, torch attention": (True, False)}


def bench(experiment: str, steps: int, warmup: int, rounds: int) -> tuple[dict, int, int]:
    cfg = compose_config([f"experiment={experiment}"], Path(tempfile.mkdtemp(prefix="clip_step_")))
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model, _convert_="all").train()
    batches = preload_batches(cfg, 4)
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured

    def step(batch: dict, bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.contrastive_loss(batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {label: [] for label in VARIANTS}
    for r in range(rounds):
        for label in (list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))):
            bf16, fp32_product = VARIANTS[label]
            take_attention_products_in_fp32(module, fp32_product)
            per_step = []
            for i in range(warmup + steps):
                start = time.perf_counter()
                step(batches[i % len(batches)], bf16)
                if i >= warmup:
                    per_step.append(time.perf_counter() - start)
            times[label].append(statistics.median(per_step) * 1e3)
    return times, len(batches[0]["caption"]), sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="quickstart_clip")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each variant's timed ones")
    add_alternating_cpu_flags(parser)
    args = parser.parse_args()
    kept = start_alternating_cpu_run(args)

    times, batch, params = bench(args.experiment, args.steps, args.warmup, args.rounds)
    medians = {label: statistics.median(v) for label, v in times.items()}
    lines = [f"Stage-0 training step of `experiment={args.experiment}` (contrastive loss, backward, optimizer step; "
             f"batch {batch}, {params / 1e6:.1f}M parameters), cpu ({torch.get_num_threads()} threads), median of "
             f"{args.rounds} alternating rounds of {args.steps} steps after {args.warmup} warm-up; {malloc_label(kept)}; "
             f"load average {load_average()}.", "",
             "| variant | ms per step (rounds) | median | vs fp32 |", "|---|---|---:|---:|"]
    for label, median in medians.items():
        rounds = ", ".join(f"{t:.1f}" for t in times[label])
        lines.append(f"| {label} | {rounds} | {median:.1f} | {medians['fp32'] / median:.2f}x |")
    print("\n".join(lines), flush=True)
    if args.append:
        append_markdown(args.append, "Stage-0 CLIP step: fp32, bf16 with the attention product in fp32, bf16 with "
                                     "torch's attention", "\n".join(lines))


if __name__ == "__main__":
    main()
