"""open_clip's attention with the product in fp32 under CPU autocast (ldm/modules/clip_attention.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.modules.clip_attention import FP32ProductMultiheadAttention, take_attention_products_in_fp32
from ldm.modules.clip_configs import create_clip_model
from tests.probes import DispatchedOps

WIDTH, HEADS, TOKENS, BATCH = 64, 4, 7, 3


def pair(batch_first: bool) -> tuple[nn.MultiheadAttention, FP32ProductMultiheadAttention]:
    torch.manual_seed(0)
    torch_mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=batch_first)
    ours = FP32ProductMultiheadAttention(WIDTH, HEADS, batch_first=batch_first)
    ours.load_state_dict(torch_mha.state_dict())
    return torch_mha, ours


def tokens(batch_first: bool) -> torch.Tensor:
    shape = (BATCH, TOKENS, WIDTH) if batch_first else (TOKENS, BATCH, WIDTH)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), requires_grad=True)


def causal_mask(kind: str):
    """torch MHA's conventions: bool True = may not attend; float added to the scores."""
    above = torch.triu(torch.ones(TOKENS, TOKENS, dtype=torch.bool), diagonal=1)
    return {"none": None, "bool": above, "float": torch.zeros(TOKENS, TOKENS).masked_fill(above, float("-inf")),
            "per-head bool": above.expand(BATCH * HEADS, TOKENS, TOKENS)}[kind]


def self_attention(module, x, mask, **kwargs):
    return module(x, x, x, need_weights=False, attn_mask=mask, **kwargs)[0]


def product_dtypes(ops: DispatchedOps) -> list[torch.dtype]:
    """The query dtype of every attention product (any SDPA kernel's forward) among the recorded ops."""
    return [dtype for name, dtype in ops.ops if name.startswith("_scaled_dot_product") and "backward" not in name]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "per-head bool"])
def test_same_attention_as_torch_in_fp32_and_a_closer_one_under_bf16_autocast(batch_first, mask):
    torch_mha, ours = pair(batch_first)
    x, m = tokens(batch_first), causal_mask(mask)
    exact = self_attention(torch_mha, x, m)
    assert torch.equal(self_attention(ours, x, m), exact)  # outside autocast: torch's module, unchanged
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_bf16, torch_bf16 = self_attention(ours, x, m), self_attention(torch_mha, x, m)
    assert ours_bf16.dtype == torch_bf16.dtype == torch.bfloat16 and ours_bf16.shape == exact.shape
    # bf16 projections on both sides: the same answer to bf16 rounding, the masked scores as masked
    torch.testing.assert_close(ours_bf16.float(), exact, atol=2e-2, rtol=2e-2)
    assert (ours_bf16.float() - exact).abs().max() <= 2 * (torch_bf16.float() - exact).abs().max()
    grad_ours, = torch.autograd.grad(ours_bf16.float().square().sum(), x)
    grad_exact, = torch.autograd.grad(exact.square().sum(), x)
    torch.testing.assert_close(grad_ours, grad_exact, atol=5e-2, rtol=5e-2)


def test_masked_tokens_cannot_reach_earlier_ones_under_autocast():
    _, ours = pair(batch_first=False)
    x = tokens(batch_first=False).detach()
    changed = x.clone()
    changed[-1] += 5.0  # the last token only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before, after = (self_attention(ours, t, causal_mask("bool")) for t in (x, changed))
    assert torch.equal(before[:-1], after[:-1]) and not torch.equal(before[-1], after[-1])


def test_the_product_runs_in_fp32_under_cpu_autocast_and_nowhere_else():
    torch_mha, ours = pair(batch_first=False)
    x = tokens(batch_first=False)
    with DispatchedOps() as torch_ops, torch.autocast("cpu", dtype=torch.bfloat16):
        self_attention(torch_mha, x, causal_mask("float"))
    with DispatchedOps() as our_ops, torch.autocast("cpu", dtype=torch.bfloat16):
        self_attention(ours, x, causal_mask("float"))
    with DispatchedOps() as fp32_ops:
        self_attention(ours, x, causal_mask("float"))
    assert product_dtypes(torch_ops) == [torch.bfloat16]  # what the class avoids: the CPU's slow bf16 kernels
    assert product_dtypes(our_ops) == [torch.float32]
    assert product_dtypes(fp32_ops) == [torch.float32]


def test_options_open_clip_does_not_use_stay_torchs():
    torch_mha, ours = pair(batch_first=True)
    x = tokens(batch_first=True)
    padding = torch.zeros(BATCH, TOKENS, dtype=torch.bool)
    padding[:, -2:] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for kwargs in ({"need_weights": True}, {"need_weights": False, "key_padding_mask": padding}):
            expected, ours_out = torch_mha(x, x, x, **kwargs), ours(x, x, x, **kwargs)
            assert torch.equal(ours_out[0], expected[0])
            assert (ours_out[1] is None) == (expected[1] is None)
        cross = torch.randn(BATCH, TOKENS + 2, WIDTH)  # keys and values from another sequence
        assert torch.equal(ours(x, cross, cross, need_weights=False)[0],
                           torch_mha(x, cross, cross, need_weights=False)[0])


def test_clip_models_attend_in_fp32_with_unchanged_weight_names():
    torch.manual_seed(0)
    clip = create_clip_model("ldm-tiny-clip")
    attentions = [m for m in clip.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attentions and all(type(m) is FP32ProductMultiheadAttention for m in attentions)
    assert take_attention_products_in_fp32(clip) == 0  # idempotent
    plain = nn.Sequential(nn.MultiheadAttention(WIDTH, HEADS))
    keys = list(plain.state_dict())
    assert take_attention_products_in_fp32(plain) == 1 and list(plain.state_dict()) == keys
    assert take_attention_products_in_fp32(plain, False) == 1 and type(plain[0]) is nn.MultiheadAttention
