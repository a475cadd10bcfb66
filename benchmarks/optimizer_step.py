"""AdamW implementations (for-loop, ``foreach=True``, ``fused=True``) and the EMA update on a model's parameters.

Builds the U-Net of a ``benchmarks/unet_step.py`` config (or, ``--config clip-tiny``, stage 0's open_clip model
``ldm-tiny-clip``, whose 6.3M-parameter token embedding is most of it), gives every parameter a seeded random gradient and times
``optimizer.step()`` of the three AdamW implementations (the decay / no-decay groups of ``ldm.optim.build_optimizer``,
as ``configure_optimizers`` makes them), alternating in one process, plus ``ldm.modules.ema.EMA.update``; then checks
that the three updates agree. The switch is ``model.optimizer.fused=true`` (or ``foreach=true``) in the model config.

    python benchmarks/optimizer_step.py --threads 1 --clock cpu
    python benchmarks/optimizer_step.py --config clip-tiny --threads 1 --clock cpu
    python benchmarks/optimizer_step.py --config sd15 --device cuda --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: ldm without an install

from _report import append_markdown, device_label, load_average  # noqa: E402  (benchmarks/_report.py)
from unet_step import CONFIGS  # noqa: E402

from ldm.modules.ema import EMA  # noqa: E402
from ldm.modules.unet import UNetModel  # noqa: E402
from ldm.optim import build_optimizer  # noqa: E402

IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
CLIP_CONFIGS = {"clip-tiny": "ldm-tiny-clip"}  # name -> open_clip architecture (configs/model/clip_tiny.yaml)


def build_network(config: str) -> torch.nn.Module:
    """The U-Net of a ``unet_step.py`` config, or the open_clip CLIP model of a ``CLIP_CONFIGS`` one."""
    if config in CLIP_CONFIGS:
        from ldm.modules.clip_configs import create_clip_model

        return create_clip_model(CLIP_CONFIGS[config])
    return UNetModel(**CONFIGS[config][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=[*CONFIGS, *CLIP_CONFIGS], default="quickstart")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a shared machine)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock, or this process's CPU time (robust to other jobs on a shared CPU)")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work; time a GPU with the wall clock")
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    torch.manual_seed(0)
    start = build_network(args.config).state_dict()
    runs = {}
    for name, kwargs in IMPLEMENTATIONS.items():
        net = build_network(args.config).to(device)
        net.load_state_dict(start)
        generator = torch.Generator().manual_seed(1)
        for p in net.parameters():  # the same gradients for every implementation
            p.grad = (torch.randn(p.shape, generator=generator) * 1e-2).to(device)
        optimizer = build_optimizer(partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01, **kwargs), net)
        runs[name] = (net, optimizer.step)
    ema = EMA(runs["fused"][0], decay=0.999)
    runs["EMA update"] = (None, partial(ema.update, runs["fused"][0]))

    times = {k: [] for k in runs}
    for i in range(args.iters + 2):
        for key in (list(runs) if i % 2 == 0 else list(reversed(runs))):  # alternate who goes first
            if device.type == "cuda":
                torch.cuda.synchronize()
            begin = clock()
            runs[key][1]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[key].append(clock() - begin)
    flat = {k: torch.cat([p.detach().flatten() for p in net.parameters()]) for k, (net, _) in runs.items() if net}
    max_diff = {k: (v - flat["for-loop"]).abs().max().item() for k, v in flat.items()}

    net = runs["for-loop"][0]
    med = {k: statistics.median(v) for k, v in times.items()}
    kind = "CLIP" if args.config in CLIP_CONFIGS else "U-Net"
    lines = [f"{args.config} {kind}: {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters in "
             f"{len(list(net.parameters()))} tensors; {device_label(device.type)}; {args.clock} clock, median of {args.iters} alternating "
             f"steps after 2 warm-up; load average {load_average()}",
             "",
             "| update | ms | vs for-loop AdamW | max abs. difference to for-loop after all steps |",
             "|---|---:|---:|---:|"]
    for key, seconds in med.items():
        diff = f"{max_diff[key]:.1e}" if key in max_diff else "-"
        lines.append(f"| {key} | {seconds * 1e3:.1f} | {med['for-loop'] / seconds:.2f}x | {diff} |")
    body = "\n".join(lines)
    print(body)
    if args.append:
        append_markdown(args.append, "Optimizer step and EMA update", body)


if __name__ == "__main__":
    main()
