"""Soak test: does a long diffusion run leak memory? RSS sampled every N steps of a real training run.

    python benchmarks/soak.py --ae-ckpt outputs/quickstart/autoencoder/checkpoints/last.ckpt \
        --clip-ckpt outputs/quickstart/clip/checkpoints/last.ckpt --steps 2000 --every 100

Runs ``train.py experiment=quickstart_ldm`` (validation, sample grids and checkpointing included, as in
a normal run) for ``--steps`` steps; the ``TrainingStats`` callback logs ``perf/cpu_rss_gb`` every
``--every`` steps to the CSV logger. Growth is measured from the first sample at or after ``--warmup``
(allocator pools, caches and the data pipeline fill up first) to the last. Target: <= 5 %.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from _report import append_markdown  # noqa: E402  (benchmarks/_report.py)


def rss_series(run_dir: Path) -> list[tuple[int, float]]:
    """[(step, GiB)] of perf/cpu_rss_gb from the run's CSV log."""
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv under {run_dir}")
    with files[-1].open(newline="") as handle:
        return [(int(float(r["step"])), float(r["perf/cpu_rss_gb"]))
                for r in csv.DictReader(handle) if r.get("perf/cpu_rss_gb")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ae-ckpt", required=True, help="stage-1 checkpoint")
    parser.add_argument("--clip-ckpt", required=True, help="stage-0 checkpoint (text tower)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100, help="RSS sampling interval in steps")
    parser.add_argument("--warmup", type=int, default=200, help="steps before the reference sample")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "soak")
    parser.add_argument("--append", type=Path, default=None, help="append the result to this Markdown file")
    args = parser.parse_args()

    overrides = [
        "experiment=quickstart_ldm", f"model.first_stage_config.ckpt_path={args.ae_ckpt}",
        f"model.cond_stage_config.pretrained={args.clip_ckpt}", f"trainer.max_steps={args.steps}",
        f"trainer.log_every_n_steps={args.every}", f"callbacks.training_stats.log_every_n_steps={args.every}",
        "logger=csv", "extras.print_config=false", f"hydra.run.dir={args.out}",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=env, check=True)

    series = rss_series(args.out)
    reference = next(((s, v) for s, v in series if s >= args.warmup), None)
    if reference is None:
        raise SystemExit(f"no RSS sample at or after step {args.warmup}: run more --steps")
    peak = max(v for s, v in series if s >= reference[0])
    growth = (series[-1][1] - reference[1]) / reference[1]
    rows = ["| step | RSS (GiB) |", "|---|---|"] + [f"| {s} | {v:.3f} |" for s, v in series]
    summary = (f"RSS at step {reference[0]}: {reference[1]:.3f} GiB; at step {series[-1][0]}: {series[-1][1]:.3f} GiB; "
               f"peak after warm-up {peak:.3f} GiB; growth **{growth * 100:+.1f} %** (target <= 5 %).")
    body = summary + "\n\n" + "\n".join(rows)
    print(body)
    if args.append:
        append_markdown(args.append, "soak", body)


if __name__ == "__main__":
    main()
