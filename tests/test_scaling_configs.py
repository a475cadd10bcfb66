"""Scale-out configs compose and build: FSDP strategy, SLURM launcher, sbatch script syntax."""

from __future__ import annotations

import shutil
import subprocess

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.strategies import FSDPStrategy

from ldm.modules.attention import SpatialTransformer
from ldm.modules.unet import ResBlock
from tests.hydra_helpers import CONFIG_DIR, ROOT


def _compose(overrides, hydra_config=False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


def test_fsdp_strategy_shards_unet_blocks():
    cfg = _compose(["experiment=quickstart_ldm", "trainer=fsdp"])
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {ResBlock, SpatialTransformer}
    assert strategy.kwargs["use_orig_params"] is True and cfg.trainer.precision == "bf16-mixed"


def test_slurm_launcher_takes_tasks_and_nodes_from_the_trainer():
    cfg = _compose(["experiment=quickstart_ldm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=3",
                    "hydra/launcher=slurm"], hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (3, 8, 8)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sbatch_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm_train.sbatch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
