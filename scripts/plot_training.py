"""Training curves of one or more runs from their CSV logs (``<run>/csv/version_*/metrics.csv``).

    python scripts/plot_training.py --run outputs/quickstart/clip --run outputs/quickstart/ldm \
        --out outputs/quickstart/training_curves.png

One panel per run: its training loss (raw and smoothed) against the step, and its main
validation metric on a second axis (PSNR, zero-shot accuracy or validation loss).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# the first validation metric found in a run's log is drawn next to its loss
VAL_METRICS = ("val/psnr", "val/zero_shot_top1", "val/loss")


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from the newest CSV log of a run."""
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv under {run_dir}: was it trained with logger=csv?")
    series: dict[str, list[tuple[int, float]]] = {}
    with files[-1].open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row["step"]))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing), taken of log(loss) because the
    axis is logarithmic: a geometric mean does not lag behind a loss that falls by orders of magnitude."""
    out, last = [], 0.0
    for n, value in enumerate(values, start=1):
        last = weight * last + (1 - weight) * math.log(max(value, 1e-12))
        out.append(math.exp(last / (1 - weight**n)))
    return out


def plot_run(ax: plt.Axes, name: str, series: dict[str, list[tuple[int, float]]]) -> None:
    loss_key = next((k for k in ("train/loss", "train/rec_loss", "train/total_loss") if k in series), None)
    if loss_key is None:
        loss_key = next(k for k in series if k.startswith("train/"))
    steps, values = zip(*series[loss_key])
    ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(steps, smooth(list(values)), color="tab:blue", label=loss_key)
    ax.set_xlabel("step")
    ax.set_ylabel(loss_key, color="tab:blue")
    ax.set_yscale("log")
    ax.set_title(name)
    val_key = next((k for k in VAL_METRICS if k in series), None)
    if val_key is not None:
        twin = ax.twinx()
        vsteps, vvalues = zip(*series[val_key])
        twin.plot(vsteps, vvalues, "o-", color="tab:orange", label=val_key)
        twin.set_ylabel(val_key, color="tab:orange")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="a run directory (repeatable)")
    parser.add_argument("--out", default="training_curves.png")
    args = parser.parse_args()
    runs = [Path(r) for r in args.run]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        plot_run(ax, run.name, read_metrics(run))
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"Training curves: {args.out}")


if __name__ == "__main__":
    main()
