"""Train any stage from a Hydra config.

    python train.py experiment=quickstart_autoencoder
    python train.py experiment=quickstart_ldm trainer=gpu data.batch_size=128
    python train.py -m experiment=quickstart_autoencoder model.optimizer.lr=1e-3,3e-3
    python train.py experiment=quickstart_ldm ckpt_path=last        # resume

compose -> seed -> instantiate datamodule, model, callbacks, loggers, trainer -> fit -> (test)
-> return the configured metric (for multirun sweeps and Optuna).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from ldm.utils.cpu_threads import widen_on_signal

if __name__ == "__main__":  # first, before the slow imports: `kill -USR2` widens a CPU run's torch threads
    widen_on_signal()

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import ldm.utils.resolvers  # noqa: E402,F401  (registers ${wandb_offline:} and ${eval:...})
from ldm.checkpoints import load_checkpoint  # noqa: E402
from ldm.utils.guards import check_run  # noqa: E402
from ldm.utils.instantiate import instantiate_callbacks, instantiate_loggers  # noqa: E402
from ldm.utils.run import (  # noqa: E402
    apply_extras,
    check_missing_values,
    continue_wandb_run,
    get_metric_value,
    resolve_ckpt_path,
)

log = logging.getLogger("train")


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit (and optionally test) the configured model; returns (metrics, objects)."""
    check_missing_values(cfg)
    apply_extras(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    log.info(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    log.info(f"Instantiating model <{cfg.model._target_}>")
    model: L.LightningModule = hydra.utils.instantiate(cfg.model, _convert_="all")
    check_run(datamodule, model)  # data-vs-model mismatches fail here, before any step
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    # one memory-mapped read: refuses a pickled payload clearly before Lightning reads the file, and gives
    # the W&B run id so a resume keeps logging to the checkpoint's run
    checkpoint = load_checkpoint(ckpt_path, mmap=True) if ckpt_path else None
    continue_wandb_run(cfg, checkpoint, ckpt_path)
    loggers = instantiate_loggers(cfg.get("logger"))
    log.info(f"Instantiating trainer <{cfg.trainer._target_}>")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    _log_run_facts(cfg, trainer, loggers)
    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = dict(trainer.callback_metrics)
    if cfg.get("test"):
        best = _best_checkpoint(trainer)
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update(trainer.callback_metrics)
    objects = dict(cfg=cfg, datamodule=datamodule, model=model, trainer=trainer)
    return metrics, objects


def _best_checkpoint(trainer: L.Trainer) -> Optional[str]:
    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
    if not best:
        log.warning("No best checkpoint found: testing the current weights.")
        return None
    return best


def _log_run_facts(cfg: DictConfig, trainer: L.Trainer, loggers: list) -> None:
    """State the global batch (no silent LR scaling) and hand the resolved config to every logger."""
    per_device = cfg.data.get("batch_size")
    if per_device is not None:
        global_batch = per_device * trainer.num_devices * trainer.num_nodes * trainer.accumulate_grad_batches
        log.info(
            f"Global batch size {global_batch} = {per_device} per device x {trainer.num_devices} devices x "
            f"{trainer.num_nodes} nodes x {trainer.accumulate_grad_batches} accumulation "
            f"(the learning rate is used as configured, not rescaled)."
        )
    hparams = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for logger in loggers:
        logger.log_hyperparams(hparams)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    metrics, _ = train(cfg)
    sweeping = HydraConfig.get().runtime.choices.get("hparams_search") not in (None, "null")
    return get_metric_value(metrics, cfg.get("optimized_metric"), required=sweeping)


if __name__ == "__main__":
    main()
