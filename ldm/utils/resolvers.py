"""OmegaConf resolvers available in every config (registered on import)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf

from ldm.utils.precision import cpu_precision


def wandb_has_credentials() -> bool:
    """True when W&B can authenticate: WANDB_API_KEY or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(str(netrc_path)).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def wandb_offline() -> bool:
    """Offline unless credentials exist; WANDB_MODE=offline|online|disabled wins when set."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in {"offline", "dryrun", "disabled"}:
        return True
    if mode == "online":
        return False
    return not wandb_has_credentials()


def wandb_group(task_name: str) -> str:
    """W&B run group: the task name for a single run; for a multirun job, the task name and the sweep's
    folder, so every job of one sweep (and only those) lands in one group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():  # configs composed outside a Hydra app
        return task_name
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"{task_name}-{Path(hydra_cfg.sweep.dir).name}"
    return task_name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("wandb_group"):
        OmegaConf.register_new_resolver("wandb_group", wandb_group)
    if not OmegaConf.has_resolver("cpu_precision"):
        # ${cpu_precision:${trainer.accelerator}}: bf16-mixed on AMX CPUs and GPUs, else 32-true
        OmegaConf.register_new_resolver("cpu_precision", cpu_precision)
    if not OmegaConf.has_resolver("eval"):
        # arithmetic in configs, e.g. ${eval:'${data.batch_size} * 2'}
        OmegaConf.register_new_resolver("eval", lambda expr: eval(expr, {"__builtins__": {}}, {}))


register_resolvers()
