"""One experiment's training steps under several sets of config overrides: which switch is faster, measured.

Each variant is the experiment (``configs/train.yaml`` + ``experiment=...``, as ``train.py`` composes it) with
its own overrides; every round builds each variant's model afresh at the same seed and runs ``Trainer.fit`` with
the configured callbacks and logger on the same batches held in memory (no loading, no validation), alternating
the variants' order from round to round in one process. The table gives the median seconds per step of each
variant and its speed against the first.

    python benchmarks/config_ab.py --experiment quickstart_autoencoder --threads 1 \\
        --variant "for-loop AdamW" model.optimizer.fused=false --variant "fused AdamW" model.optimizer.fused=true
    python benchmarks/config_ab.py --experiment quickstart_clip --threads 1 \\
        --variant fp32 trainer.precision=32-true --variant bf16 trainer.precision=bf16-mixed --append BENCHMARKS.md

Overrides that change the data (``data.*``) apply to the model and loop only: the batches are read once, from the
first variant's data config. A latent diffusion experiment without ``model.first_stage_config.ckpt_path`` gets
its autoencoder experiment's architecture at a seeded init (``--autoencoder-experiment``), as in
``loop_overhead.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import (add_alternating_cpu_flags, append_markdown, load_average, malloc_label,  # noqa: E402
                     start_alternating_cpu_run)
from loop_overhead import (InMemoryData, build_model, compose_config, fit_seconds_per_step,  # noqa: E402
                           preload_batches, throughput_overrides)


def batch_size_of(batch: dict) -> int:
    return next(len(v) for v in batch.values() if hasattr(v, "__len__"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("LABEL", "OVERRIDE"),
                        help="a label and its train.py overrides (key=value ...); give --variant at least twice")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per variant and round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of every fit")
    parser.add_argument("--autoencoder-experiment", default="quickstart_autoencoder",
                        help="stage-1 architecture of a latent diffusion experiment without a first-stage checkpoint")
    add_alternating_cpu_flags(parser)
    args = parser.parse_args()
    if len(args.variant) < 2:
        parser.error("give --variant at least twice: the first is the baseline the others are compared with")
    variants = {label: overrides for label, *overrides in args.variant}
    if len(variants) != len(args.variant):
        parser.error("each --variant needs its own label")
    kept = start_alternating_cpu_run(args)

    times = {label: [] for label in variants}
    with tempfile.TemporaryDirectory() as tmp:
        def config(label: str):
            return compose_config([*throughput_overrides(args.experiment), *variants[label]], Path(tmp))

        batches = preload_batches(config(next(iter(variants))), 4)
        for r in range(args.rounds):
            for label in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                cfg = config(label)
                model = build_model(cfg, args.autoencoder_experiment)  # seeded: the same init for every variant
                data = InMemoryData(batches, args.warmup + args.steps)
                wall, _ = fit_seconds_per_step(cfg, model, data, args.steps, args.warmup)
                times[label].append(wall)
                print(f"round {r + 1}, {label}: {wall * 1e3:.1f} ms per step", flush=True)

    batch = batch_size_of(batches[0])
    baseline = statistics.median(times[next(iter(variants))])
    lines = [f"`Trainer.fit` of `experiment={args.experiment}` (configured callbacks and logger, batch {batch} held in "
             f"memory, no validation), median of {args.rounds} alternating rounds of {args.steps} steps after "
             f"{args.warmup} warm-up, a fresh model at the same seed per fit; torch threads {args.threads or 'default'}; "
             f"{malloc_label(kept)}; load average {load_average()}.", "",
             "| variant | overrides | s per step (rounds) | median | samples/s | vs first |",
             "|---|---|---|---:|---:|---:|"]
    for label, overrides in variants.items():
        median = statistics.median(times[label])
        rounds = ", ".join(f"{t:.4f}" for t in times[label])
        lines.append(f"| {label} | `{' '.join(overrides) or '-'}` | {rounds} | {median:.4f} | {batch / median:.1f} | "
                     f"{baseline / median:.2f}x |")
    print("\n".join(lines), flush=True)
    if args.append:
        append_markdown(args.append, f"Config variants of `{args.experiment}`, training step", "\n".join(lines))


if __name__ == "__main__":
    main()
