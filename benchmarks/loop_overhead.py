"""Whole training loop (Lightning ``Trainer.fit`` as ``train.py`` composes it) against the bare training step.

The model, callbacks, logger and trainer come from ``configs/train.yaml`` through Hydra's compose API with the
experiment's overrides, exactly as ``python train.py experiment=...`` builds them (default callbacks including
``training_stats``, the CSV logger, checkpointing at the end of the fit, outside the timed window). One model
is trained, in one process, by three drivers in turn (alternating order, rounds):

- ``bare step``: a plain Python loop on batches held in memory: ``zero_grad``, ``diffusion_step``, backward,
  optimizer and LR-scheduler step, EMA update (what Lightning runs per batch, without its bookkeeping);
- ``fit, batches in memory``: ``Trainer.fit`` on the same batches (Lightning + callbacks + logger overhead);
- ``fit, shard loader``: ``Trainer.fit`` on the experiment's own data module (adds loading, with the
  configured ``data.num_workers``).

Each fit times the steps after ``--warmup`` (from the start of the first timed batch to the end of the last, so
data loading between batches counts; setup and the final checkpoint do not; validation is off). The default
warm-up, 3 steps plus the batches in which webdataset's shuffle buffer fills (it reads two samples per sample
until full), times the loader as it runs for the rest of a long fit; ``--warmup 3`` times the fill as well.
The table gives the median seconds per step, samples/s and each driver's throughput relative to the bare step,
in wall time and in CPU time of this process (all its threads, not the loader's worker processes): on a CPU
shared with other jobs the CPU column still shows the loop's own overhead when the wall clock mostly shows the
neighbours.
Aim: the loop keeps >= 90% of the bare step's samples/s.

    python benchmarks/loop_overhead.py --threads 1                    # quickstart_ldm, CPU
    python benchmarks/loop_overhead.py --threads 1 --steps 10 --rounds 2 --batch-size 16
    python benchmarks/loop_overhead.py --overrides trainer.log_every_n_steps=1 --append BENCHMARKS.md

The first stage is the experiment's autoencoder architecture (``--autoencoder-experiment``) at a seeded random
init unless ``model.first_stage_config.ckpt_path=...`` is passed: weights do not change the cost.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import cycle, islice
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ldm.utils.resolvers  # noqa: E402,F401  (registers the resolvers the configs use)
from ldm.data.latent_memory import InMemoryLatents  # noqa: E402
from _report import append_markdown, host_malloc_label, load_average  # noqa: E402  (benchmarks/_report.py)
from ldm.utils.instantiate import instantiate_callbacks, instantiate_loggers  # noqa: E402
from ldm.utils.run import apply_extras  # noqa: E402

DRIVERS = ("bare step", "fit, batches in memory", "fit, shard loader")


def throughput_overrides(experiment: str) -> list[str]:
    """``train.py`` overrides of a fit timed for training throughput: the experiment, quiet, no validation (not
    training throughput; TrainingStats agrees) and no sample grid at the end of training."""
    overrides = [f"experiment={experiment}", "extras.print_config=false", "trainer.limit_val_batches=0"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        callbacks = compose("train", overrides=overrides).get("callbacks") or {}
    if "sample_grid" in callbacks:  # only where the experiment has one (an override would create a bare entry)
        overrides.append("++callbacks.sample_grid.at_train_end=false")
    return overrides


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """``configs/train.yaml`` with ``overrides``, outputs under ``output_dir`` (as a Hydra run would set them)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def build_model(cfg: DictConfig, autoencoder_experiment: str) -> L.LightningModule:
    """``cfg.model`` at a seeded init; for a latent diffusion model without a first-stage checkpoint, the autoencoder
    experiment's architecture at a seeded init as its first stage."""
    model_cfg = cfg.model
    first = model_cfg.get("first_stage_config")
    if first is not None and OmegaConf.is_missing(first, "ckpt_path"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
            ae = compose("train", overrides=[f"experiment={autoencoder_experiment}"]).model
        model_cfg = model_cfg.copy()
        with open_dict(model_cfg):
            model_cfg.first_stage_config = {"ddconfig": OmegaConf.to_container(ae.ddconfig), "embed_dim": ae.embed_dim}
    torch.manual_seed(0)
    model = hydra.utils.instantiate(model_cfg, _convert_="all")
    if first is not None:
        model.first_stage_model.weights_loaded = True  # random weights on purpose: the cost is what is measured
    return model


def clocks(device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads, not the loader's worker processes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


class StepWindow(L.Callback):
    """``read(device)`` (default :func:`clocks`: wall and process CPU time) at the start of batch ``warmup`` and
    at the end of the last batch of the fit."""

    def __init__(self, warmup: int, last: int, read: Callable[[torch.device], tuple[float, ...]] = clocks):
        self.warmup, self.last, self.read = warmup, last, read
        self.start = self.end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self.start = self.read(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.last:
            self.end = self.read(pl_module.device)


class InMemoryData(L.LightningDataModule):
    """The pre-loaded batches, cycled to ``steps`` batches per epoch (no loading cost)."""

    def __init__(self, batches: list[dict], steps: int):
        super().__init__()
        self.batches, self.steps = batches, steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(islice(cycle(self.batches), self.steps)), batch_size=None)  # each item is a batch


def fit_seconds_per_step(cfg: DictConfig, model, datamodule, steps: int, warmup: int,
                         read: Callable[[torch.device], tuple[float, ...]] = clocks) -> tuple[float, ...]:
    """``Trainer.fit`` for ``warmup + steps`` optimizer steps with the configured callbacks and loggers; what
    ``read`` measures (default: wall and CPU seconds) per timed step."""
    window = StepWindow(warmup, warmup + steps, read)
    callbacks = instantiate_callbacks(cfg.get("callbacks")) + [window]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_loggers(cfg.get("logger")),
                                      max_steps=warmup + steps)
    trainer.fit(model=model, datamodule=datamodule)
    if window.start is None or window.end is None:
        raise RuntimeError(f"the fit stopped at step {trainer.global_step}, before step {warmup + steps}: no timing")
    return tuple((end - start) / steps for start, end in zip(window.start, window.end))


def bare_seconds_per_step(model, batches: list[dict], steps: int, warmup: int, trainer_cfg: DictConfig
                          ) -> tuple[float, float]:
    """What Lightning runs per batch for this model (automatic optimisation), as a plain loop: the trainer's
    bf16 autocast and gradient clipping included."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    if precision.startswith("16"):
        raise ValueError(f"the bare loop has no fp16 grad scaling: time trainer.precision={precision} with bf16-mixed")
    clip = trainer_cfg.get("gradient_clip_val")
    configured = model.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured.get("lr_scheduler", {}).get("scheduler") if isinstance(configured, dict) else None
    model.train()
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    start = None
    for i, batch in enumerate(islice(cycle(batches), warmup + steps)):
        if i == warmup:
            start = clocks(device)
        batch = move_data_to_device(batch, device)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model.diffusion_step(batch)["loss"]
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        model.on_train_batch_end(None, batch, i)  # the EMA update
    return tuple((end - begin) / steps for begin, end in zip(start, clocks(device)))


def loader_in_use(datamodule: L.LightningDataModule) -> str:
    """How a fitted data module read its training data: "cache held in memory" (a small latent cache,
    ``data.in_memory``) or its loader worker count (``auto`` resolved)."""
    if isinstance(datamodule.train_dataset, InMemoryLatents):
        return "cache held in memory"
    return str(datamodule.num_workers)


def shard_loader_fit(cfg: DictConfig, model: L.LightningModule, steps: int, warmup: int,
                     loaders: list[str]) -> tuple[float, float]:
    """``fit_seconds_per_step`` on the experiment's data module; appends :func:`loader_in_use`."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    seconds = fit_seconds_per_step(cfg, model, datamodule, steps, warmup)
    loaders.append(loader_in_use(datamodule))
    return seconds


def steady_state_warmup(data_cfg: DictConfig, batch_size: int) -> int:
    """Untimed steps until the shard loader runs as it does for the rest of a long fit: 3, plus the batches in
    which webdataset's shuffle buffer fills (``wds.shuffle`` reads two samples per sample it yields until it
    holds ``shuffle_buffer``; a fit of thousands of steps pays that once, a 20-step window every batch)."""
    return 3 + math.ceil(int(data_cfg.get("shuffle_buffer") or 0) / batch_size)


def preload_batches(cfg: DictConfig, n: int) -> list[dict]:
    """``n`` batches from the experiment's own training loader (the same data the loop reads)."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all", num_workers=0)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return list(islice(iter(datamodule.train_dataloader()), n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="quickstart_ldm")
    parser.add_argument("--autoencoder-experiment", default="quickstart_autoencoder",
                        help="stage-1 architecture used when no model.first_stage_config.ckpt_path is given")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra train.py overrides (key=value)")
    parser.add_argument("--batch-size", type=int, default=None, help="data.batch_size (default: the experiment's)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per driver and round")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps at the start of every run (default: 3 + the shuffle buffer's fill)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median over them)")
    parser.add_argument("--drivers", nargs="+", choices=DRIVERS, default=list(DRIVERS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*throughput_overrides(args.experiment), *args.overrides]
        if args.batch_size:
            overrides.append(f"data.batch_size={args.batch_size}")
        cfg = compose_config(overrides, Path(tmp))
        apply_extras(cfg)  # as train.py: e.g. host memory kept for reuse (extras.host_malloc)
        model = build_model(cfg, args.autoencoder_experiment)
        device = "cuda" if cfg.trainer.get("accelerator") in ("gpu", "cuda") else "cpu"
        model.to(device)
        batches = preload_batches(cfg, 4)
        loader_workers: list[str] = []  # loader_in_use of each shard-loader fit
        batch_size = len(batches[0]["caption"])
        if args.warmup is None:
            args.warmup = steady_state_warmup(cfg.data, batch_size)
        # the bare loop reads batches already on the device; the in-memory fit gets CPU ones (Lightning moves them)
        on_device = [move_data_to_device(b, device) for b in batches]
        runs = {
            "bare step": lambda: bare_seconds_per_step(model, on_device, args.steps, args.warmup, cfg.trainer),
            "fit, batches in memory": lambda: fit_seconds_per_step(
                cfg, model, InMemoryData(batches, args.warmup + args.steps), args.steps, args.warmup),
            "fit, shard loader": lambda: shard_loader_fit(cfg, model, args.steps, args.warmup, loader_workers),
        }
        runs = {k: v for k, v in runs.items() if k in args.drivers}
        times = {k: [] for k in runs}
        for r in range(args.rounds):
            order = list(runs)[r % len(runs):] + list(runs)[: r % len(runs)]  # rotate who goes first
            for key in order:
                times[key].append(runs[key]())
                wall, cpu = times[key][-1]
                print(f"round {r + 1}: {key}: {wall * 1e3:.0f} ms/step (CPU {cpu * 1e3:.0f} ms)", file=sys.stderr,
                      flush=True)

    configured = cfg.data.get("num_workers", 0)
    resolved = sorted(set(loader_workers))
    workers = f"{configured} ({', '.join(resolved)})" if resolved and resolved != [str(configured)] else configured
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    med_cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    ref, ref_cpu = med.get("bare step"), med_cpu.get("bare step")
    lines = [
        f"{args.experiment}, batch {batch_size}, {device} ({torch.get_num_threads()} threads), shard loader "
        f"num_workers={workers}; median of {args.rounds} alternating rounds of {args.steps} steps after "
        f"{args.warmup} warm-up; {host_malloc_label(cfg)}; load average {load_average()}",
        "",
        "| driver | s/step | samples/s | vs bare step | CPU s/step | vs bare step (CPU) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, seconds in med.items():
        rel = f"{ref / seconds:.1%}" if ref else "-"
        rel_cpu = f"{ref_cpu / med_cpu[key]:.1%}" if ref_cpu else "-"
        lines.append(f"| {key} | {seconds:.3f} | {batch_size / seconds:.1f} | {rel} | {med_cpu[key]:.3f} | {rel_cpu} |")
    body = "\n".join(lines)
    print(body)
    if args.append:
        append_markdown(args.append, "Training loop overhead", body)


if __name__ == "__main__":
    main()
