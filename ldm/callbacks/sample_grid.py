"""Log a fixed-prompt, fixed-seed sample grid every N training steps (shows the model learning).

Sampling is bounded (few steps), uses EMA weights, runs under no_grad on rank 0 only, and never
touches the training RNG state, so it cannot stall or perturb the run.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ldm.pipeline import SamplingConfig, text_to_image
from ldm.utils.image_logging import log_image_grid

log = logging.getLogger(__name__)


class SampleGridCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training) log a labelled grid."""

    def __init__(
        self,
        prompts: Sequence[str],
        every_n_steps: int = 500,
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        cfg_scale: float = 4.0,
        seed: int = 0,
        use_ema: bool = True,
        at_train_end: bool = True,
        key: str = "samples",
    ):
        if not prompts:
            raise ValueError("SampleGridCallback needs at least one prompt (callbacks.sample_grid.prompts).")
        self.prompts = list(prompts)
        self.every_n_steps = int(every_n_steps)
        self.config = SamplingConfig(sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                                     use_ema=use_ema, batch_size=len(self.prompts), progress=False)
        self.at_train_end = at_train_end
        self.key = key
        self._last_step: Optional[int] = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._sample_and_log(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self._sample_and_log(trainer, pl_module)

    @rank_zero_only
    def _sample_and_log(self, trainer: L.Trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        cpu_state = torch.get_rng_state()
        try:
            images = text_to_image(pl_module, self.prompts, self.config)  # [N, 3, H, W] in [0, 1]
        finally:
            torch.set_rng_state(cpu_state)
            pl_module.train(was_training)
        log_image_grid(trainer, self.key, images, captions=self.prompts, step=trainer.global_step)
