"""Save the LoRA adapter of a ``model.lora`` run as a small file at the end of training.

``<dirpath>/lora_adapter.safetensors`` (the adapter tensors, peft names) and ``lora_adapter.json`` (rank, alpha,
target modules, base checkpoint path + SHA-256, the step). Sample with it on top of the base checkpoint:

    python scripts/sample.py ckpt=<base> lora=<dirpath>/lora_adapter.safetensors prompt="a red wedge"

A run without LoRA adapters saves nothing (the full checkpoint is the result).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from ldm.lora import has_lora, save_adapter

log = logging.getLogger(__name__)


class LoraAdapterSaver(L.Callback):
    def __init__(self, dirpath: Optional[str] = None, filename: str = "lora_adapter"):
        self.dirpath = dirpath
        self.filename = filename

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not has_lora(pl_module.unet):
            log.info("No LoRA adapters in the model (model.lora=null): no adapter file written.")
            return
        dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        path, meta = save_adapter(pl_module.unet, dirpath / f"{self.filename}.safetensors", pl_module.hparams["lora"],
                                  base=getattr(pl_module, "lora_base", None), extra={"global_step": trainer.global_step})
        log.info(f"LoRA adapter written to {path} (+ {meta.name}).")
