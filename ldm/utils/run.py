"""Pre-flight checks and conveniences for a run: config validation, extras, metric lookup."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.utils.host_memory import keep_freed_memory

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem found before training starts."""


def check_missing_values(cfg: DictConfig) -> None:
    """Refuse to start when a mandatory value (``???``) was not given; name every such key."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        keys = ", ".join(missing)
        raise ConfigError(
            f"Missing required config value(s): {keys}. Set them on the command line, "
            f"e.g. `python train.py {missing[0]}=...`, or in your experiment config."
        )


def apply_extras(cfg: DictConfig) -> None:
    """Warnings filter, tag enforcement, host memory kept for reuse and a printed config tree (configs/extras/)."""
    extras = cfg.get("extras")
    if not extras:
        return
    if extras.get("host_malloc"):
        keep_freed_memory(**extras.host_malloc)
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("enforce_tags") and not cfg.get("tags"):
        raise ConfigError("No tags given: pass `tags=[\"my_tag\"]` or set extras.enforce_tags=false.")
    if extras.get("print_config"):
        print_config_tree(cfg)


def print_config_tree(cfg: DictConfig, save_to: Optional[Path] = None) -> None:
    """Print the resolved config as a rich tree (and save it as text in the run directory)."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    order = ["data", "model", "callbacks", "logger", "trainer", "paths", "extras"]
    fields = order + [k for k in cfg if k not in order]
    for field in fields:
        if field not in cfg:
            continue
        branch = tree.add(field, style="dim", guide_style="dim")
        value = cfg[field]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        with open(save_to, "w") as f:
            rich.print(tree, file=f)


def resolve_ckpt_path(ckpt_path: Optional[str], log_dir: str, task_name: str) -> Optional[str]:
    """``ckpt_path=last`` -> the newest ``checkpoints/last.ckpt`` among this task's runs."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).exists():
            raise ConfigError(f"ckpt_path={ckpt_path} does not exist.")
        return str(ckpt_path)
    candidates = sorted(
        Path(log_dir, task_name).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
    )
    if not candidates:
        raise ConfigError(
            f"ckpt_path=last but no checkpoints/last.ckpt exists under {Path(log_dir, task_name)}; "
            f"start without ckpt_path or give a checkpoint path."
        )
    log.info(f"Resuming from {candidates[-1]}")
    return str(candidates[-1])


def continue_wandb_run(cfg: DictConfig, checkpoint: Optional[dict], ckpt_path: Optional[str]) -> None:
    """Point ``logger.wandb`` at the W&B run a resumed checkpoint (loaded from ``ckpt_path``) was logged to.

    Applies when ``checkpoint`` holds a ``wandb_run_id`` (see :mod:`ldm.callbacks.wandb_run_id`) and
    ``logger.wandb.id`` is unset; an id given in the config or on the command line is kept.
    """
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if checkpoint is None or wandb_cfg is None or wandb_cfg.get("id") is not None:
        return
    from ldm.callbacks.wandb_run_id import wandb_run_id_in

    run_id = wandb_run_id_in(checkpoint)
    if run_id is None:
        log.info(f"{ckpt_path} holds no W&B run id: the resumed training logs to a new W&B run.")
        return
    with open_dict(wandb_cfg):
        wandb_cfg.id = run_id
        wandb_cfg.resume = wandb_cfg.get("resume") or "allow"  # wandb.init: continue the run if it exists
    log.info(f"Continuing W&B run {run_id} (from {ckpt_path}); set logger.wandb.id to log elsewhere.")


def get_metric_value(metrics: dict[str, Any], name: Optional[str], required: bool = True) -> Optional[float]:
    """The value a sweeper optimises. A metric that was never logged is a clear error when a sweeper
    needs it (``required``); otherwise (e.g. a run shorter than its validation interval) a warning."""
    if not name:
        return None
    if name not in metrics:
        message = f"optimized_metric={name} was not logged. Logged metrics: {sorted(metrics)}."
        if required:
            raise ConfigError(f"{message} Fix `optimized_metric` in the hparams_search config.")
        log.warning(f"{message} Returning no value (no sweeper needs one).")
        return None
    value = metrics[name]
    return float(value.item() if hasattr(value, "item") else value)
