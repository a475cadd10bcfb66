"""Data-loader throughput against the samples/s an autoencoder training step consumes.

Loader side: samples/s that ``WebDataModule`` delivers from shards (decode + transforms + collation), per
worker count, timed after a warm-up that absorbs worker start-up and the shuffle-buffer fill. Missing
embedded shards are built first.

Consumer side (``--consumer EXPERIMENT``): ``configs/train.yaml`` is composed with ``experiment=NAME``
through Hydra's compose API, ``cfg.model`` is instantiated, and full Lightning training steps (forward,
loss, backward, optimizer and scheduler step) are timed on one real batch of the experiment's data held in
memory, so no loading is timed. The loader is measured with the same composed data config (its batch
size and workers), so the ratio loader/consumer says how much head-room the loader has: aim for >= 3x,
because in training both share the same CPU cores.

    python benchmarks/loader_throughput.py                        # shapes32 + photos loaders; both AE consumers
    python benchmarks/loader_throughput.py --configs digits32 --workers 0 4 --batches 100 --no-consumer
    python benchmarks/loader_throughput.py --configs --consumer quickstart_autoencoder --steps 50
    python benchmarks/loader_throughput.py --append BENCHMARKS.md  # also append the tables there
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))  # paths.root_dir without a Hydra run

import ldm.utils.resolvers  # noqa: E402,F401  (registers the resolvers the configs use)
from _report import append_markdown  # noqa: E402  (benchmarks/_report.py)
from ldm.data.webdataset import WebDataModule  # noqa: E402
from ldm.data.workers import AUTO, auto_num_workers  # noqa: E402

DEFAULT_CONSUMERS = ["quickstart_autoencoder", "photos_autoencoder"]


# ---- loader ------------------------------------------------------------------------------------------------------


def data_config(config: str, data_dir: Path) -> dict[str, Any]:
    """``configs/data/<config>.yaml`` resolved with ``paths.data_dir`` (no Hydra)."""
    path = ROOT / "configs" / "data" / f"{config}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"No data config {path}; choose one of: {', '.join(names)}.")
    cfg = OmegaConf.merge({"paths": {"data_dir": str(data_dir)}}, {"data": OmegaConf.load(path)})
    return OmegaConf.to_container(cfg.data, resolve=True)


def build_datamodule(data: dict[str, Any], num_workers: int, batch_size: int | None = None) -> WebDataModule:
    """A ``WebDataModule`` from a resolved data config with ``num_workers``, its shards built and set up."""
    kwargs = {k: v for k, v in data.items() if not k.startswith("_")}
    kwargs.update(num_workers=num_workers, persistent_workers=False)
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    # An epoch long enough that the timed batches never cross an epoch boundary.
    kwargs.update(batches_per_epoch=10**9, samples_per_epoch=None)
    dm = WebDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


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


def loader_rates(data: dict[str, Any], workers: list[int], args: argparse.Namespace, label: str) -> dict[int, float]:
    """Loader samples/s per worker count (the data config's own batch size)."""
    rates = {}
    for n in workers:
        rates[n] = measure(build_datamodule(data, n), args.warmup, args.batches, args.repeats)["samples_per_s"]
        print(f"{label:>24} loader workers={n}: {rates[n]:8.0f} samples/s", file=sys.stderr)
    return rates


# ---- consumer ----------------------------------------------------------------------------------------------------


def compose_experiment(name: str, data_dir: Path) -> DictConfig:
    """``train.yaml`` composed with ``experiment=name`` as ``python train.py`` would (Hydra node included)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        try:
            return compose(
                "train", overrides=[f"experiment={name}", f"paths.data_dir={data_dir}"], return_hydra_config=True
            )
        except MissingConfigException as err:
            names = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
            raise SystemExit(f"No experiment {name!r}; choose one of: {', '.join(names)}.") from err


class RepeatedBatch(torch.utils.data.Dataset):
    """The same (already collated) batch ``length`` times: a loader that costs nothing."""

    def __init__(self, batch: dict, length: int):
        self.batch, self.length = batch, length

    def __getitem__(self, index: int) -> dict:
        return self.batch

    def __len__(self) -> int:
        return self.length


class StepTimer(Callback):
    """Wall time of each whole training step (optimizer included), after the first ``warmup`` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.durations = warmup, []
        self._start, self._seen = 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _synchronize(pl_module.device)
        self._seen += 1
        if self._seen > self.warmup:
            self.durations.append(time.perf_counter() - self._start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def consumer_rate(cfg: DictConfig, batch: dict, warmup: int, steps: int, accelerator: str) -> float:
    """Samples/s of ``steps`` training steps of ``cfg.model`` on ``batch`` (median step time) after ``warmup``."""
    torch.manual_seed(cfg.get("seed") or 0)
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    timer = StepTimer(warmup)
    loader = torch.utils.data.DataLoader(RepeatedBatch(batch, warmup + steps), batch_size=None)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator=accelerator, devices=1, precision=cfg.trainer.get("precision", "32-true"),
            max_steps=warmup + steps, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False, callbacks=[timer], default_root_dir=tmp,
        )
        trainer.fit(model, train_dataloaders=loader)
    if len(timer.durations) != steps:
        raise RuntimeError(f"Timed {len(timer.durations)} training steps instead of {steps}; the fit stopped early.")
    return len(batch["caption"]) / statistics.median(timer.durations)


def compare(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Loader (configured workers and each of ``--workers``) and consumer samples/s of one experiment."""
    cfg = compose_experiment(name, args.data_dir)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    configured = data.get("num_workers", 0)
    if configured == AUTO:  # what a training run of this consumer would start (ldm/data/workers.py)
        configured = auto_num_workers(on_cpu=args.accelerator == "cpu")
    rates = loader_rates(data, sorted({configured, *args.workers}), args, name)
    best_workers = max(rates, key=rates.get)
    batch = next(iter(build_datamodule(data, num_workers=0).train_dataloader()))  # one real batch
    consumer = consumer_rate(cfg, batch, args.warmup_steps, args.steps, args.accelerator)
    print(f"{name:>24} consumer: {consumer:8.1f} samples/s", file=sys.stderr)
    return {
        "experiment": name, "data": cfg.hydra.runtime.choices.data, "size": data["image_size"],
        "batch": data["batch_size"], "model": cfg.model._target_.rsplit(".", 1)[-1], "workers": configured,
        "loader": rates[configured], "best_workers": best_workers, "best_loader": rates[best_workers],
        "consumer": consumer,
    }


# ---- report ------------------------------------------------------------------------------------------------------


def loader_table(rows: list[tuple]) -> str:
    lines = ["| data config | image size | batch | workers | samples/s | batches/s | first batch (s) |",
             "|---|---|---|---|---|---|---|"]
    for config, size, batch, workers, r in rows:
        lines.append(f"| {config} | {size} | {batch} | {workers} | {r['samples_per_s']:.0f} | "
                     f"{r['samples_per_s'] / batch:.1f} | {r['first_batch_s']:.2f} |")
    return "\n".join(lines)


def consumer_table(rows: list[dict]) -> str:
    header = ("| experiment | data config | image size | batch | model | loader samples/s (configured workers) "
              "| loader samples/s (best of --workers) | consumer samples/s | loader / consumer |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio, best_ratio = r["loader"] / r["consumer"], r["best_loader"] / r["consumer"]
        flag = "" if ratio >= 3 else " (< 3x)"
        lines.append(
            f"| {r['experiment']} | {r['data']} | {r['size']} | {r['batch']} | {r['model']} "
            f"| {r['loader']:.0f} (workers={r['workers']}) | {r['best_loader']:.0f} (workers={r['best_workers']}) "
            f"| {r['consumer']:.1f} | {ratio:.1f}x{flag}; best {best_ratio:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=["shapes32", "photos"],
                        help="names under configs/data/ for the loader-only table (none: skip it)")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2], help="num_workers values to try")
    parser.add_argument("--batch-size", type=int, default=None, help="override the batch size of --configs")
    parser.add_argument("--batches", type=int, default=50, help="timed loader batches per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed loader batches after the first one")
    parser.add_argument("--repeats", type=int, default=3, help="loader runs per setting (median reported)")
    parser.add_argument("--consumer", action="append", metavar="EXPERIMENT",
                        help="experiment whose training step is timed (repeatable; default: "
                        f"{' '.join(DEFAULT_CONSUMERS)})")
    parser.add_argument("--no-consumer", action="store_true", help="only the loader-only table")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per experiment")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed training steps first")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator of the consumer (cpu, gpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice; the table records the value)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data",
                        help="paths.data_dir (shards are built here if missing)")
    parser.add_argument("--append", type=Path, default=None, metavar="PATH",
                        help="append the tables, command, machine and date to this Markdown file")
    args = parser.parse_args()
    for flag in ("batches", "repeats", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if min(args.workers) < 0 or args.warmup < 0 or args.warmup_steps < 0:
        parser.error("--workers, --warmup and --warmup-steps must be >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    consumers = [] if args.no_consumer else (args.consumer or DEFAULT_CONSUMERS)

    tables = []
    rows = []
    for config in args.configs:
        data = data_config(config, args.data_dir)
        for workers in args.workers:
            dm = build_datamodule(data, workers, args.batch_size)
            result = measure(dm, args.warmup, args.batches, args.repeats)
            rows.append((config, dm.hparams.image_size, dm.hparams.batch_size, workers, result))
            print(f"{config:>24} loader workers={workers}: {result['samples_per_s']:8.0f} samples/s", file=sys.stderr)
    if rows:
        tables.append(("Data-loader throughput", loader_table(rows)))
    if consumers:
        results = [compare(name, args) for name in consumers]
        tables.append(("Loader vs autoencoder training step (target loader / consumer >= 3x)",
                       consumer_table(results)))

    for title, table in tables:
        print(f"\n{title}\n\n{table}")
    if args.append is not None:
        append_markdown(args.append, "loader_throughput", "\n\n".join(f"{t}:\n\n{b}" for t, b in tables))


if __name__ == "__main__":
    main()
