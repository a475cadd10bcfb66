"""Data-loader throughput: samples/s that ``WebDataModule`` delivers from shards, per worker count.

Reads the data configs under ``configs/data/`` (no Hydra: the YAML is resolved with OmegaConf and
``WebDataModule`` is built directly), builds missing embedded shards first, then times training
batches (decode + transforms + collation) after a warm-up that absorbs worker start-up and the
shuffle-buffer fill. Compare the numbers with the samples/s a training step consumes.

    python benchmarks/loader_throughput.py                                   # shapes32 and photos, 0/1/2 workers
    python benchmarks/loader_throughput.py --configs digits32 --workers 0 4 --batches 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.data.webdataset import WebDataModule  # noqa: E402


def build_datamodule(config: str, data_dir: Path, num_workers: int, batch_size: int | None) -> WebDataModule:
    data_cfg = OmegaConf.load(ROOT / "configs" / "data" / f"{config}.yaml")
    cfg = OmegaConf.merge({"paths": {"data_dir": str(data_dir)}}, {"data": data_cfg})
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if not k.startswith("_")}
    kwargs.update(num_workers=num_workers, persistent_workers=False)
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    # An epoch long enough that the timed batches never cross an epoch boundary.
    kwargs.update(batches_per_epoch=10**9, samples_per_epoch=None)
    return WebDataModule(**kwargs)


def measure(dm: WebDataModule, warmup: int, batches: int, repeats: int) -> dict[str, float]:
    """Median samples/s over ``repeats`` runs of ``batches`` batches, after ``warmup`` batches."""
    rates, first_batch = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        iterator = iter(dm.train_dataloader())
        next(iterator)
        first_batch.append(time.perf_counter() - start)
        for _ in range(warmup):
            next(iterator)
        start, samples = time.perf_counter(), 0
        for _ in range(batches):
            samples += len(next(iterator)["caption"])
        rates.append(samples / (time.perf_counter() - start))
        del iterator  # shuts the workers down now
    return {"samples_per_s": statistics.median(rates), "first_batch_s": statistics.median(first_batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["shapes32", "photos"], help="names under configs/data/")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2], help="num_workers values to try")
    parser.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches after the first one")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (median reported)")
    parser.add_argument(
        "--data-dir", type=Path, default=ROOT / "data", help="paths.data_dir (shards are built here if missing)"
    )
    args = parser.parse_args()

    rows = []
    for config in args.configs:
        for workers in args.workers:
            dm = build_datamodule(config, args.data_dir, workers, args.batch_size)
            dm.prepare_data()
            dm.setup("fit")
            result = measure(dm, args.warmup, args.batches, args.repeats)
            rows.append((config, dm.hparams.image_size, dm.hparams.batch_size, workers, result))
            print(f"{config:>10} workers={workers}: {result['samples_per_s']:8.0f} samples/s", file=sys.stderr)

    print("\n| config | image size | batch | workers | samples/s | batches/s | first batch (s) |")
    print("|---|---|---|---|---|---|---|")
    for config, size, batch, workers, r in rows:
        print(
            f"| {config} | {size} | {batch} | {workers} | {r['samples_per_s']:.0f} | "
            f"{r['samples_per_s'] / batch:.1f} | {r['first_batch_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
