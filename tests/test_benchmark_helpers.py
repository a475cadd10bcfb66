"""The benchmark scripts' shared pieces that decide whether a comparison is valid: the full-fp32 parity check and the
variants the SD-1.5 benchmark times."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sd15_memory  # noqa: E402  (benchmarks/sd15_memory.py)
from unet_step import full_fp32  # noqa: E402  (benchmarks/unet_step.py)


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_full_fp32_turns_tf32_off_inside_and_restores_it(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with full_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32

    with pytest.raises(RuntimeError, match="inside"):
        with full_fp32():
            raise RuntimeError("inside")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("checkpointing", [True, False])
def test_sd15_variants_follow_the_checkpointing_switch(checkpointing):
    pytest.importorskip("diffusers")
    args = argparse.Namespace(diffusers=True, channels_last=False, compile=False, checkpointing=checkpointing)
    params = dict(sd15_memory.unet_params(32), context_dim=32)
    variants = sd15_memory.build_variants(params, torch.device("cpu"), args)

    expected = [("ours", False), ("ours", True), ("diffusers", False), ("diffusers", True)]
    if not checkpointing:
        expected = [v for v in expected if not v[1]]
    assert sorted((v.impl, v.checkpointing) for v in variants) == sorted(expected)
    # one set of weights: every variant trains the very same Parameters
    ours = next(v.module for v in variants if v.impl == "ours")
    theirs = next(v.module for v in variants if v.impl == "diffusers")
    assert {id(p) for p in ours.parameters()} == {id(p) for p in theirs.parameters()}
