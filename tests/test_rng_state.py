"""RNG states travel with checkpoints: a resumed run draws the numbers the interrupted one would have."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from ldm.callbacks.rng_state import CHECKPOINT_KEY, RNGState


def _draw() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_states_round_trip_through_a_weights_only_checkpoint():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    _draw()
    checkpoint: dict = {}
    RNGState().on_save_checkpoint(None, None, checkpoint)
    expected = _draw()  # what the run would have drawn next
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # plain tensors and containers only
    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # a fresh process would start elsewhere
    RNGState().on_load_checkpoint(None, None, loaded)
    assert _draw() == expected
    assert CHECKPOINT_KEY in loaded


def test_resumed_training_checkpoint_carries_the_states(compose_train):
    from train import train

    cfg = compose_train(["experiment=quickstart_autoencoder", "trainer.max_steps=2", "trainer.val_check_interval=2",
                         "trainer.limit_val_batches=1"])
    train(cfg)
    ckpt = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=True)
    assert set(ckpt[CHECKPOINT_KEY]) >= {"torch", "numpy", "python"}
