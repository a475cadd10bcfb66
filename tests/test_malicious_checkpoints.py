"""Every path that reads a checkpoint refuses a pickle payload with a clear error, and the payload never runs.

(Sampling / ``load_latent_diffusion``, ``init_from`` and the convert script: tests/test_parity.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm.checkpoints import UnsafeCheckpointError
from tests.payloads import write_malicious_ckpt
from train import train


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A Lightning-looking checkpoint whose unpickling would create ``marker``."""
    marker = tmp_path / "payload_ran"
    path = write_malicious_ckpt(tmp_path / "evil.ckpt", marker, global_step=3, hyper_parameters={})
    return path, marker


def test_training_resume_refuses_it(evil, compose_train):
    path, marker = evil
    cfg = compose_train(["experiment=quickstart_autoencoder", "trainer.max_steps=2", f"ckpt_path={path}"])
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load .*evil.ckpt"):
        train(cfg)
    assert not marker.exists()


def test_stage_inputs_of_the_diffusion_model_refuse_it(evil):
    from ldm.models.first_stage import FirstStage
    from ldm.modules.conditioning import OpenCLIPTextEncoder

    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match="execute code"):
        FirstStage.from_config({"ckpt_path": str(path)})  # model.first_stage_config.ckpt_path
    with pytest.raises(UnsafeCheckpointError, match="execute code"):
        OpenCLIPTextEncoder(arch="ldm-tiny-clip", pretrained=str(path))  # model.cond_stage_config.pretrained
    assert not marker.exists()


def test_evaluation_and_wandb_resume_readers_refuse_it(evil):
    from ldm.callbacks.wandb_run_id import read_wandb_run_id
    from ldm.evaluation.features import load_clip_module
    from ldm.evaluation.kind import checkpoint_kind

    path, marker = evil
    for read in (load_clip_module, checkpoint_kind, read_wandb_run_id):  # clip_ckpt=, ckpt= (kind=auto), resume
        with pytest.raises(UnsafeCheckpointError, match="Refusing to load"):
            read(path)
    assert not marker.exists()
