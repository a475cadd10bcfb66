"""AtomicCheckpointIO: a failed save never touches the existing file; every run uses it.

(A save killed with SIGKILL half-way is exercised end to end in test_fault_resume.py.)
"""

from __future__ import annotations

import hydra
import pytest
import torch

from ldm.utils.checkpoint_io import AtomicCheckpointIO, atomic_torch_save, temporary_path


def test_save_round_trip_and_overwrite(tmp_path):
    path = tmp_path / "sub" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.arange(4.0)}, path)
    io.save_checkpoint({"global_step": 2, "w": torch.ones(3)}, path)
    loaded = io.load_checkpoint(path, weights_only=True)
    assert loaded["global_step"] == 2 and torch.equal(loaded["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 7}, path)
    before = path.read_bytes()

    def disk_full_half_way(obj, f):
        f.write(b"\x00" * 100)  # part of a new checkpoint is on disk ...
        raise OSError(28, "No space left on device")  # ... when the write fails

    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"global_step": 8}, path, write=disk_full_half_way)
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 7
    assert not temporary_path(path).exists()


def test_storage_options_are_refused(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"a": 1})


def test_every_trainer_config_saves_atomically(compose_train):
    cfg = compose_train(["experiment=quickstart_autoencoder"], tiny_data=False)
    trainer = hydra.utils.instantiate(cfg.trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
