"""NonFiniteGuard: a NaN batch skips its optimizer step (automatic and manual optimisation), is counted,
and too many in a row stop the run with the step and the last (finite) checkpoint named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from ldm.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from tests.probes import ParamTrace
from train import train

NAN_AT = 1  # global step whose batch is poisoned


def _compose(compose_train, experiment: str, extra: list[str]):
    cfg = compose_train([
        f"experiment={experiment}", "trainer.max_steps=4", "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1", "+callbacks.nan._target_=tests.probes.InjectNaN",
        "+callbacks.trace._target_=tests.probes.ParamTrace", *extra,
    ])
    with open_dict(cfg):
        cfg.callbacks.nan.from_step = NAN_AT
    return cfg


def _find(trainer, kind):
    return next(c for c in trainer.callbacks if isinstance(c, kind))


@pytest.mark.parametrize("experiment", ["quickstart_clip", "quickstart_autoencoder"])  # automatic, manual
def test_nan_batch_skips_its_step_and_is_counted(compose_train, experiment):
    cfg = _compose(compose_train, experiment, [])
    with open_dict(cfg):
        cfg.callbacks.nan.until_step = NAN_AT + 1
    with pytest.warns(UserWarning, match=f"non-finite loss at global step {NAN_AT + 1}"):
        metrics, objects = train(cfg)
    trainer, model = objects["trainer"], objects["model"]
    assert _find(trainer, ParamTrace).steps == [(0, True), (1, False), (2, True), (3, True)]
    assert _find(trainer, NonFiniteGuard).total == 1
    assert metrics["train/nonfinite_steps"].item() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimizer = trainer.optimizers[0]
    param = next(p for group in optimizer.param_groups for p in group["params"])
    assert int(optimizer.state[param]["step"]) == 3  # Adam's step counter skipped the NaN step too


def test_consecutive_nan_steps_stop_with_step_and_checkpoint(compose_train):
    cfg = _compose(compose_train, "quickstart_autoencoder", [
        "trainer.max_steps=20", "trainer.val_check_interval=100", "callbacks.nonfinite.max_consecutive=3",
        "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=0",
    ])
    with open_dict(cfg):
        cfg.callbacks.nan.from_step = 3
    last = Path(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    # steps 4, 5, 6 are skipped; the guard stops at 6, before the checkpoint callback saves that step
    with pytest.raises(NonFiniteTrainingError, match=rf"3 consecutive .* global step 6 .* checkpoint: {re.escape(str(last))}"):
        with pytest.warns(UserWarning, match="non-finite"):
            train(cfg)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    weights = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("latent_")}  # NaN until measured
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert ckpt["callbacks"]["NonFiniteGuard"] == {"total": 1, "consecutive": 1}


def test_guard_rejects_bad_setting():
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)
