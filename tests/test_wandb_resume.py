"""A resumed training continues the W&B run its checkpoint was logged to (offline W&B)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from ldm.callbacks.wandb_run_id import WandbRunId, read_wandb_run_id
from ldm.checkpoints import load_checkpoint
from ldm.evaluation.wandb_offline import find_offline_runs, read_offline_run
from ldm.utils.run import continue_wandb_run
from tests.hydra_helpers import compose_train_config
from train import train

STEPS = ["experiment=quickstart_autoencoder", "logger=wandb", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]


def _train_and_finish(overrides: list[str], out: Path, data_root: Path) -> dict:
    _, objects = train(compose_train_config(overrides, out, data_root))
    wandb.finish()  # flush the offline transaction log and let the next run start its own
    return objects


def _loss_steps(run_dir: Path) -> list[int]:
    history = read_offline_run(run_dir).history
    return [row["trainer/global_step"] for row in history if "train/rec_loss" in row]


def test_resume_continues_the_wandb_run(tiny_data_root, tmp_path):
    first = _train_and_finish([*STEPS, "trainer.max_steps=2"], tmp_path / "first", tiny_data_root)
    run_id = first["trainer"].logger.version
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert read_wandb_run_id(last) == run_id
    assert torch.load(last, weights_only=True)["wandb_run_id"] == run_id

    second = _train_and_finish([*STEPS, "trainer.max_steps=4", f"ckpt_path={last}"], tmp_path / "second",
                               tiny_data_root)
    assert second["cfg"].logger.wandb.id == run_id
    assert second["trainer"].logger.version == run_id
    (first_dir,) = find_offline_runs(tmp_path / "first")
    (second_dir,) = find_offline_runs(tmp_path / "second")
    assert second_dir.name.endswith(f"-{run_id}") and first_dir.name.endswith(f"-{run_id}")
    # the loss curve's x-axis goes on where the first run stopped (Lightning logs 0-based steps)
    assert _loss_steps(first_dir) == [0, 1]
    assert _loss_steps(second_dir) == [2, 3]
    assert read_wandb_run_id(tmp_path / "second" / "checkpoints" / "last.ckpt") == run_id


def test_an_explicit_wandb_id_wins_over_the_checkpoint(tmp_path):
    ckpt = str(tmp_path / "given.ckpt")
    torch.save({"wandb_run_id": "from-ckpt", "state_dict": {}}, ckpt)
    explicit = compose_train_config([*STEPS, "logger.wandb.id=chosen"], tmp_path, None)
    continue_wandb_run(explicit, load_checkpoint(ckpt, mmap=True), str(ckpt))
    assert explicit.logger.wandb.id == "chosen"
    with_null = compose_train_config(STEPS, tmp_path, None)
    continue_wandb_run(with_null, load_checkpoint(ckpt, mmap=True), str(ckpt))
    assert (with_null.logger.wandb.id, with_null.logger.wandb.resume) == ("from-ckpt", "allow")


def test_callback_stores_the_wandb_id_without_starting_a_run(tmp_path):
    def saved(*loggers) -> dict:
        checkpoint: dict = {}
        WandbRunId().on_save_checkpoint(SimpleNamespace(loggers=list(loggers)), None, checkpoint)
        return checkpoint

    def wandb_logger(run_id: str) -> WandbLogger:
        return WandbLogger(id=run_id, save_dir=tmp_path, offline=True)

    assert saved(CSVLogger(tmp_path)) == {}
    assert saved(CSVLogger(tmp_path), wandb_logger("abc123")) == {"wandb_run_id": "abc123"}
    with pytest.warns(UserWarning, match="Several W&B runs"):
        assert saved(wandb_logger("a"), wandb_logger("b")) == {}
    assert wandb.run is None  # reading the ids started no run


def test_multirun_jobs_share_one_group_per_sweep(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    def group(mode: RunMode) -> str:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parents[1] / "configs")):
            cfg = compose(config_name="train", overrides=["logger=wandb", "task_name=sweepy"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = mode
            cfg.hydra.sweep.dir = str(tmp_path / "2026-11-26_12-00-00")
        HydraConfig().set_config(cfg)
        return cfg.logger.wandb.group

    assert group(RunMode.MULTIRUN) == "sweepy-2026-11-26_12-00-00"  # every job of this sweep
    assert group(RunMode.RUN) == "sweepy"
