"""Shared test fixtures: offline environment, Hydra composition exactly as users run it, tiny shards."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """A session-wide folder where tiny versions of the embedded data sets are written on demand."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def compose_train(tiny_data_root, tmp_path):
    """compose_train(overrides) -> resolved train config with tiny data, outputs in tmp_path."""
    from tests.hydra_helpers import compose_train_config

    def _compose(overrides: Iterable[str] = (), tiny_data: bool = True):
        return compose_train_config(list(overrides), tmp_path, tiny_data_root if tiny_data else None)

    return _compose


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    """Tests use tiny tensors: one intra-op thread is as fast and avoids oversubscribing the CPU when
    data-loader workers or subprocesses run beside the test (set LDM_TEST_THREADS to change)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LDM_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)
