"""Curriculum training as configuration: phases by optimizer step that change the training resolution, the
per-rank batch size, the learning rate (a multiplier) and the range of diffusion timesteps sampled.

    callbacks:
      curriculum:
        _target_: ldm.callbacks.curriculum.Curriculum
        phases:
          - {start_step: 0, resolution: 32, batch_size: 64}
          - {start_step: 1200, lr_scale: 0.5}          # unset keys: the configured data / model values

How the data switches exactly at a phase's first step. Lightning builds the training DataLoader at an epoch
start (``trainer.fit_loop.setup_data``) and the running epoch keeps iterating it: replacing it mid-epoch means
editing private loop state (the fetcher the epoch loop holds; Lightning issue #19286). So the callback makes
epochs end at phase boundaries instead. Before every epoch (``on_train_start``, ``on_train_epoch_end``) it
configures the datamodule for the epoch that starts at the current step
(:meth:`ldm.data.webdataset.WebDataModule.reconfigure_train`: the phase's image size and batch size, and the
epoch cut to end at the next phase's first step); when that differs from the loader in use it sets
``trainer.reload_dataloaders_every_n_epochs = 1`` (a public Trainer attribute, read at each epoch start), so
Lightning calls ``train_dataloader()`` again for the next epoch, and the user's value otherwise. Every training
batch is checked against its phase: a batch of the wrong size stops the run with an error, never silently.

- Resume: the checkpoint holds the phase whose LR multiplier the optimizer and scheduler state carry and the
  stream of the interrupted epoch (image size, batch size, epoch length). Loading it configures the datamodule
  before Lightning builds the resumed epoch's loader, so that epoch ends where it would have and the next one
  starts in the right phase; the scaled learning rates come back with the optimizer and scheduler state.
- DDP: everything follows from ``trainer.global_step``, identical on every rank, and every rank's datamodule
  is configured the same way (``batch_size`` is per rank), so all ranks switch at the same step without
  communication.
- Side effects of cut epochs: more, shorter epochs (``trainer.max_epochs`` counts them; epoch-interval LR
  schedulers step at the cuts). Validation must be scheduled by steps (``check_val_every_n_epoch: null``)
  when ``val_check_interval`` is an integer.
- ``lr_scale`` multiplies the scheduler's base learning rates and the current ones, so the schedule's shape
  continues, scaled: exact for schedules derived from ``base_lrs`` (``LambdaLR``: every ``ldm.optim`` schedule)
  or from the current LR (``StepLR``, ``ExponentialLR``); without a scheduler the optimizer's LR is scaled.
- ``timestep_range`` ``[t_min, t_max)`` sets ``LatentDiffusion.hparams.timestep_range`` (sampled uniformly in
  training); checkpoints keep the configured value in their hyper-parameters.
"""

from __future__ import annotations

import bisect
import math
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ldm.utils.step_logging import OnChangeLog

PHASE_KEYS = ("start_step", "resolution", "batch_size", "lr_scale", "timestep_range")


@dataclass(frozen=True)
class Phase:
    """One curriculum phase; None keeps the run's configured value (data config / model config)."""

    start_step: int
    resolution: Optional[int] = None
    batch_size: Optional[int] = None
    lr_scale: float = 1.0
    timestep_range: Optional[tuple[int, int]] = None


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def parse_phases(phases: Any) -> list[Phase]:
    """Validate a phase list (mappings with the keys of :class:`Phase`) and return it as Phases."""
    if isinstance(phases, Mapping) or not isinstance(phases, Sequence) or isinstance(phases, str) or not phases:
        raise ValueError(
            "curriculum phases must be a non-empty list of mappings, e.g. "
            f"[{{start_step: 0, resolution: 32}}, {{start_step: 1000, resolution: 64}}], got {phases!r}"
        )
    parsed = []
    for i, spec in enumerate(phases):
        where = f"curriculum phase {i}"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where} must be a mapping like {{start_step: 0, resolution: 32}}, got {spec!r}")
        unknown = sorted(set(spec) - set(PHASE_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; allowed: {', '.join(PHASE_KEYS)}")
        if "start_step" not in spec:
            raise ValueError(f"{where} has no start_step (the optimizer step at which it begins)")
        start = spec["start_step"]
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"{where}: start_step must be an integer >= 0, got {start!r}")
        resolution, batch_size = spec.get("resolution"), spec.get("batch_size")
        if resolution is not None:
            _positive_int(resolution, f"{where}: resolution")
        if batch_size is not None:
            _positive_int(batch_size, f"{where}: batch_size")
        lr_scale = spec.get("lr_scale", 1.0)
        lr_scale = 1.0 if lr_scale is None else lr_scale
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not (
                math.isfinite(lr_scale) and lr_scale > 0):
            raise ValueError(f"{where}: lr_scale must be a positive number, got {lr_scale!r}")
        timestep_range = spec.get("timestep_range")
        if timestep_range is not None:
            if (isinstance(timestep_range, (str, Mapping)) or not isinstance(timestep_range, Sequence)
                    or len(timestep_range) != 2
                    or not all(isinstance(t, int) and not isinstance(t, bool) for t in timestep_range)
                    or not 0 <= timestep_range[0] < timestep_range[1]):
                raise ValueError(f"{where}: timestep_range must be [t_min, t_max) with integers "
                                 f"0 <= t_min < t_max, got {timestep_range!r}")
            timestep_range = (int(timestep_range[0]), int(timestep_range[1]))
        parsed.append(Phase(start, resolution, batch_size, float(lr_scale), timestep_range))
    if parsed[0].start_step != 0:
        raise ValueError(f"the first curriculum phase must start at step 0, got start_step={parsed[0].start_step}: "
                         "every step of the run needs a phase")
    for i, (a, b) in enumerate(zip(parsed, parsed[1:])):
        if b.start_step <= a.start_step:
            raise ValueError(f"curriculum phases must be sorted by start_step without repeats: phase {i} starts at "
                             f"{a.start_step}, phase {i + 1} at {b.start_step}")
    return parsed


def scale_learning_rates(trainer: L.Trainer, factor: float) -> None:
    """Multiply every optimizer's current LR and every scheduler's base LRs by ``factor``."""
    for config in trainer.lr_scheduler_configs:
        if hasattr(config.scheduler, "base_lrs"):
            config.scheduler.base_lrs = [lr * factor for lr in config.scheduler.base_lrs]
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor


def _batch_geometry(batch: Any) -> tuple[Optional[int], Optional[int]]:
    """(image side or None, batch size or None) of a training batch dict."""
    if not isinstance(batch, Mapping):
        return None, None
    image = batch.get("image")
    if torch.is_tensor(image) and image.ndim == 4:  # [B, 3, H, W]
        return int(image.shape[-1]), int(image.shape[0])
    for value in batch.values():
        if torch.is_tensor(value) and value.ndim >= 1:  # e.g. cached latents [B, C, h, w]
            return None, int(value.shape[0])
    return None, None


class Curriculum(L.Callback):
    """Apply a list of phases by optimizer step (see the module docstring for the mechanism).

    Args:
        phases: mappings ``{start_step, resolution?, batch_size?, lr_scale?, timestep_range?}``, sorted, the first
            at step 0. ``resolution``/``batch_size`` reconfigure the training data (the datamodule must offer
            ``reconfigure_train``, as :class:`~ldm.data.webdataset.WebDataModule` does); ``lr_scale`` multiplies
            the learning rate (default 1); ``timestep_range`` restricts the sampled timesteps. Unset keys use the
            run's configured values.
    """

    def __init__(self, phases: Sequence[Mapping[str, Any]]):
        self.phases = parse_phases(phases)
        self._starts = [phase.start_step for phase in self.phases]
        self._changes_data = any(p.resolution is not None or p.batch_size is not None for p in self.phases)
        self._sets_timesteps = any(p.timestep_range is not None for p in self.phases)
        self._datamodule: Any = None
        self._configured: dict[str, Any] = {}  # the run's own image_size / batch_size / timestep_range
        self._user_reload = 0  # trainer.reload_dataloaders_every_n_epochs as configured
        self._lr_phase: Optional[int] = None  # the phase whose lr_scale the optimizer state carries (checkpointed)
        self._model_phase: Optional[int] = None  # the phase whose timestep range the model uses
        self._live: Optional[dict] = None  # the stream of the training loader in use (checkpointed)
        self._live_loader: Optional[weakref.ref] = None
        self._restored = False  # the datamodule was configured from a checkpoint's curriculum state
        self._lenient = False  # resumed from a checkpoint without curriculum state: no batch checks until a reload
        self._log = OnChangeLog()  # phase, resolution and batch size change at phase boundaries only

    def phase_index(self, step: int) -> int:
        """Index of the phase that contains optimizer step ``step``."""
        return bisect.bisect_right(self._starts, step) - 1

    def describe(self, index: int) -> str:
        phase, cfg = self.phases[index], self._configured
        resolution = phase.resolution or cfg.get("image_size")
        t_range = phase.timestep_range or cfg.get("timestep_range")
        parts = [f"{resolution} px" if resolution else None,
                 f"batch {phase.batch_size or cfg.get('batch_size')} per rank" if self._changes_data else None,
                 f"lr x{phase.lr_scale:g}",
                 f"timesteps [{t_range[0]}, {t_range[1]})" if t_range else None]
        return ", ".join(p for p in parts if p)

    # ------------------------------------------------------------------------------------------- set-up checks
    def _check_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ldm.utils.guards import check_resolution  # imports the models: only when a run starts

        if self._sets_timesteps:
            if "timestep_range" not in pl_module.hparams:
                raise TypeError(f"a curriculum phase sets timestep_range, but {type(pl_module).__name__} has no "
                                "timestep_range hyper-parameter (ldm.models.diffusion.LatentDiffusion has)")
            num_timesteps = getattr(getattr(pl_module, "schedule", None), "num_timesteps", None)
            for i, phase in enumerate(self.phases):
                if phase.timestep_range and num_timesteps and phase.timestep_range[1] > num_timesteps:
                    raise ValueError(f"curriculum phase {i}: timestep_range {list(phase.timestep_range)} exceeds "
                                     f"the schedule's {num_timesteps} timesteps; use t_max <= {num_timesteps}")
        if trainer.max_steps and trainer.max_steps > 0:
            for i, phase in enumerate(self.phases):
                if phase.start_step >= trainer.max_steps:
                    rank_zero_warn(f"curriculum phase {i} starts at step {phase.start_step}, at or after "
                                   f"trainer.max_steps={trainer.max_steps}: it never runs")
        if not self._changes_data:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "reconfigure_train"):
            raise TypeError(
                "curriculum phases with resolution or batch_size reconfigure the training data: train with a "
                "datamodule that has reconfigure_train (ldm.data.webdataset.WebDataModule, e.g. data=shapes64), "
                f"got {type(datamodule).__name__ if datamodule is not None else 'dataloaders without a datamodule'}"
            )
        for i, phase in enumerate(self.phases):
            if phase.resolution is not None:
                try:
                    check_resolution(phase.resolution, pl_module)
                except ValueError as exn:
                    raise ValueError(f"curriculum phase {i}: resolution {phase.resolution}: {exn}") from exn
        if (trainer.check_val_every_n_epoch is not None and isinstance(trainer.val_check_interval, int)
                and trainer.limit_val_batches != 0):
            raise ValueError(
                "the curriculum ends epochs at phase boundaries, so an integer val_check_interval must count "
                "steps over the whole run: set trainer.check_val_every_n_epoch=null"
            )

    # ------------------------------------------------------------------------------------------- data stream
    def _plan(self, trainer: L.Trainer, step: int) -> None:
        """Configure the datamodule for an epoch starting at ``step``: its phase's stream, cut at the next phase."""
        index = self.phase_index(step)
        phase = self.phases[index]
        cut = None
        if index + 1 < len(self.phases):
            cut = (self.phases[index + 1].start_step - step) * trainer.accumulate_grad_batches
        self._datamodule.reconfigure_train(image_size=phase.resolution, batch_size=phase.batch_size,
                                           max_batches_per_epoch=cut)
        stale = self._datamodule.train_stream() != self._live
        trainer.reload_dataloaders_every_n_epochs = 1 if stale else self._user_reload

    def _note_loader(self, trainer: L.Trainer) -> bool:
        """Record the stream of a training loader Lightning has just (re)built; returns whether one was."""
        loader = trainer.train_dataloader
        if loader is None or (self._live_loader is not None and self._live_loader() is loader):
            return False
        self._live_loader = weakref.ref(loader)
        self._live = self._datamodule.train_stream()
        side = f"{self._live['image_size']} px, " if self._live["image_size"] else ""
        rank_zero_info(f"curriculum: training data from step {trainer.global_step}: {side}batch "
                       f"{self._live['batch_size']} per rank, {self._live['batches_per_epoch']} batches per epoch")
        return True

    def _check_batch(self, batch: Any, index: int, step: int) -> None:
        side, size = _batch_geometry(batch)
        phase = self.phases[index]
        want_side = phase.resolution or self._configured.get("image_size")
        want_size = phase.batch_size or self._configured.get("batch_size")
        wrong_side = side is not None and want_side is not None and side != want_side
        if wrong_side or (size is not None and size != want_size):
            raise RuntimeError(
                f"curriculum: step {step} is in phase {index} ({want_side} px, batch {want_size}) but the training "
                f"batch is {side} px x {size}: the datamodule did not serve the stream the curriculum configured "
                "(see ldm/callbacks/curriculum.py for how data switches at epoch ends)"
            )

    # ------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_run(trainer, pl_module)
        self._configured = {"timestep_range": pl_module.hparams.get("timestep_range")}
        if self._changes_data:
            self._datamodule = trainer.datamodule
            self._configured.update(image_size=self._datamodule.hparams.get("image_size"),
                                    batch_size=self._datamodule.hparams.get("batch_size"))
            self._user_reload = trainer.reload_dataloaders_every_n_epochs
            self._plan(trainer, 0)  # a fresh run; a resume replaces this in load_state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._changes_data:
            return
        self._note_loader(trainer)
        if trainer.global_step > 0 and not self._restored:
            self._lenient = True
            rank_zero_warn("curriculum: the checkpoint holds no curriculum state; the interrupted epoch finishes "
                           "with the data it has, the phases apply to the data from the next epoch on")
        self._plan(trainer, trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log.reset()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._changes_data:
            self._plan(trainer, trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        index = self.phase_index(step)
        if self._changes_data:
            if self._note_loader(trainer):
                self._lenient = False
            if not self._lenient:
                self._check_batch(batch, index, step)
        if index != self._lr_phase:
            applied = 1.0 if self._lr_phase is None else self.phases[self._lr_phase].lr_scale
            if self.phases[index].lr_scale != applied:
                scale_learning_rates(trainer, self.phases[index].lr_scale / applied)
            self._lr_phase = index
        if index != self._model_phase:
            if self._sets_timesteps:
                t_range = self.phases[index].timestep_range
                pl_module.hparams.timestep_range = list(t_range) if t_range else self._configured["timestep_range"]
            self._model_phase = index
            rank_zero_info(f"curriculum: step {step}: phase {index} of {len(self.phases)} ({self.describe(index)})")
        side, size = _batch_geometry(batch)
        metrics = {"curriculum/phase": float(index)}
        if side is not None:
            metrics["curriculum/resolution"] = float(side)
        if size is not None:
            metrics["curriculum/batch_size"] = float(size)
        for name, value in metrics.items():
            self._log.log(pl_module, name, value)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        hparams = checkpoint.get("hyper_parameters")
        if self._sets_timesteps and isinstance(hparams, Mapping) and "timestep_range" in hparams:
            checkpoint["hyper_parameters"] = {**hparams, "timestep_range": self._configured.get("timestep_range")}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._changes_data:
            trainer.reload_dataloaders_every_n_epochs = self._user_reload
        if self._sets_timesteps:
            pl_module.hparams.timestep_range = self._configured.get("timestep_range")

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"lr_phase": self._lr_phase, "stream": self._live, "phases": [asdict(p) for p in self.phases]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_phases = state_dict.get("phases")
        if saved_phases is not None and saved_phases != [asdict(p) for p in self.phases]:
            rank_zero_warn("curriculum: resuming with other phases than the checkpoint's; the new phases apply "
                           "from the checkpoint's step on")
        self._lr_phase = state_dict.get("lr_phase")
        stream = state_dict.get("stream")
        if self._changes_data and self._datamodule is not None and stream is not None:
            self._datamodule.reconfigure_train(image_size=stream["image_size"], batch_size=stream["batch_size"],
                                               max_batches_per_epoch=stream["batches_per_epoch"])
            self._restored = True
