"""Compose the real configs through Hydra's API (as `python train.py` does) with tiny shards."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")

# tiny split sizes per embedded source (digits has a fixed split and ignores these)
TINY_SPLITS = {"shapes": {"train": 128, "val": 32}, "photos": {"train": 64, "val": 16}, "digits": {"train": None, "val": None}}


def tiny_shards(build: dict, root: Path) -> tuple[str, str]:
    """Write (once per session) a tiny version of an embedded data set; return (train, val) patterns."""
    from ldm.data.shards import build_embedded_shards, existing_shards, brace_pattern

    kwargs = dict(build.get("kwargs") or {})
    name = f"{build['source']}_" + "_".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
    name = re.sub(r"[^A-Za-z0-9_.-]", "", name)  # list / dict kwargs: no glob or brace characters in the folder
    out = root / name
    if not existing_shards(out, "train"):
        spec = {"source": build["source"], "splits": TINY_SPLITS[build["source"]], "kwargs": kwargs,
                "samples_per_shard": 32 if build["source"] != "digits" else 512}
        build_embedded_shards(spec, out)
    patterns = []
    for split in ("train", "val"):
        shards = existing_shards(out, split)
        patterns.append(brace_pattern(out, split, len(shards)))
    return patterns[0], patterns[1]


def compose_train_config(overrides: list[str], output_dir: Path, data_root: Optional[Path]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.extras.print_config = False
        cfg.trainer.enable_model_summary = False
        if "rich_progress_bar" in (cfg.get("callbacks") or {}):
            cfg.callbacks.rich_progress_bar = None
        cfg.trainer.enable_progress_bar = False
        if data_root is not None and cfg.data.get("build"):
            train, val = tiny_shards(dict(cfg.data.build), data_root)
            cfg.data.train_shards = train
            cfg.data.val_shards = val
            cfg.data.build = None
            cfg.data.num_workers = 0
            if cfg.data.get("samples_per_epoch"):
                cfg.data.samples_per_epoch = 4 * cfg.data.batch_size
    HydraConfig().set_config(cfg)
    return cfg
