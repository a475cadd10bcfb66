"""Build the shards a data config needs (its ``build:`` spec) without training.

    python scripts/prepare_data.py data=shapes32
    python scripts/prepare_data.py data=digits32

Runs the data module's ``prepare_data`` (the same code ``train.py`` runs on first use), so the
shards are identical to the ones training would write. Existing shards are kept.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

import ldm.utils.resolvers  # noqa: E402,F401


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    print(f"train shards: {cfg.data.train_shards}")
    print(f"val shards:   {cfg.data.val_shards}")


if __name__ == "__main__":
    main()
