"""Build callbacks and loggers from their config groups."""

from __future__ import annotations

import logging

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _build_all(group: DictConfig | None, kind: str) -> list:
    objects = []
    if not group:
        log.info(f"No {kind} configured.")
        return objects
    if not isinstance(group, DictConfig):
        raise TypeError(f"The {kind} config must be a mapping of name -> {{_target_: ...}}, got {type(group)}.")
    for name, conf in group.items():
        if conf is None:  # disabled from the command line: callbacks.model_checkpoint=null
            continue
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            raise ValueError(f"{kind} '{name}' has no _target_; every entry needs `_target_: <class path>`.")
        log.info(f"Instantiating {kind} <{conf._target_}>")
        objects.append(hydra.utils.instantiate(conf))
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return _build_all(cfg, "callback")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return _build_all(cfg, "logger")
