"""Plot a sampler sweep of scripts/evaluate.py: each metric against NFE, one line per sampler.

    python scripts/evaluate.py -m ckpt=... sampler=ddim,euler,heun,dpmpp_2m steps=5,10,20 cfg_scale=2,4 out=outputs/sweep
    python scripts/plot_sweep.py outputs/sweep [--metrics prompt_accuracy fid_clip] [--out sweep.png]

Reads every ``metrics.json`` below the sweep folder (one per Hydra job). The figure has one row per
metric and one column per CFG scale; NFE (network evaluations per image; ``ldm.diffusion.samplers.nfe``)
is on the x axis.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.diffusion.samplers import nfe  # noqa: E402

log = logging.getLogger("plot_sweep")

# numeric entries that describe the run rather than measure it
NOT_METRICS = {"steps", "nfe", "cfg_scale", "eta", "seed", "num_images", "num_real_images",
               "classifier_real_val_accuracy"}


def load_runs(sweep_dir: str | Path) -> list[dict]:
    """The metrics of every job under ``sweep_dir`` that recorded a sampler and step count."""
    runs = []
    for path in sorted(Path(sweep_dir).rglob("metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            log.warning("skipping %s: not valid JSON (%s)", path, err)
            continue
        if "sampler" not in metrics or "steps" not in metrics:
            log.warning("skipping %s: no sampler/steps (an autoencoder evaluation?)", path)
            continue
        metrics.setdefault("nfe", nfe(metrics["sampler"], int(metrics["steps"])))
        runs.append(metrics)
    if not runs:
        raise FileNotFoundError(f"No metrics.json of a generation run under {sweep_dir}: pass the folder of an "
                                f"`evaluate.py -m` sweep (its `out`).")
    return runs


def numeric_metrics(runs: Sequence[dict]) -> list[str]:
    """Keys that hold a finite number in at least one run (in first-seen order)."""
    keys: dict[str, None] = {}
    for run in runs:
        for key, value in run.items():
            if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                keys[key] = None
    return list(keys)


def series(runs: Sequence[dict], metric: str) -> dict[float, dict[str, list[tuple[int, float]]]]:
    """cfg scale -> sampler -> [(nfe, value)] sorted by NFE (runs without the metric are left out)."""
    table: dict[float, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        value = run.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            table[float(run.get("cfg_scale", float("nan")))][run["sampler"]].append((int(run["nfe"]), float(value)))
    return {cfg: {s: sorted(points) for s, points in sorted(by_sampler.items())}
            for cfg, by_sampler in sorted(table.items())}


def plot_sweep(runs: Sequence[dict], metrics: Sequence[str], out_path: str | Path) -> Path:
    """Write the figure (rows: metrics, columns: cfg scales, lines: samplers) to ``out_path``."""
    tables = {m: series(runs, m) for m in metrics}
    scales = sorted({cfg for table in tables.values() for cfg in table})
    if not scales:
        raise ValueError(f"None of {list(metrics)} has a value in the sweep.")
    fig, axes = plt.subplots(len(metrics), len(scales), figsize=(4.2 * len(scales), 3.0 * len(metrics)),
                             squeeze=False)
    for row, metric in enumerate(metrics):
        for col, cfg in enumerate(scales):
            ax = axes[row][col]
            for sampler, points in tables[metric].get(cfg, {}).items():
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=sampler)
            ax.set_title(f"{metric} (cfg {cfg:g})", fontsize=10)
            ax.set_xlabel("NFE")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the `out` folder of an `evaluate.py -m` sweep")
    parser.add_argument("--metrics", nargs="+", help="metric keys to plot (default: every numeric metric)")
    parser.add_argument("--out", help="PNG path (default: <sweep_dir>/sweep.png)")
    args = parser.parse_args(argv)
    runs = load_runs(args.sweep_dir)
    metrics = args.metrics or numeric_metrics(runs)
    unknown = [m for m in metrics if m not in numeric_metrics(runs)]
    if unknown:
        parser.error(f"no numeric values for {unknown}; available: {numeric_metrics(runs)}")
    path = plot_sweep(runs, metrics, args.out or Path(args.sweep_dir) / "sweep.png")
    print(f"{len(runs)} runs, {len(metrics)} metrics -> {path}")
    return path


if __name__ == "__main__":
    main()
