"""EMA: the closed-form update with warm-up, and the tensor pairing it keeps between updates (so each step does not
walk both module trees) follows every way the live model's tensors can be replaced."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ldm.modules.ema import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _expected_after(ema_start: dict, values: list[dict], decay: float) -> dict:
    """shadow_n = d_n * shadow_{n-1} + (1 - d_n) * live_n with d_n = min(decay, (1 + n) / (10 + n)), n from 0."""
    shadow = {k: v.clone() for k, v in ema_start.items()}
    for n, live in enumerate(values):
        d = min(decay, (1 + n) / (10 + n))
        shadow = {k: d * shadow[k] + (1 - d) * live[k] for k in shadow}
    return shadow


def test_update_matches_the_closed_form_and_copies_buffers():
    model = _model()
    ema = EMA(model, decay=0.5)
    start = {k: v.clone() for k, v in model.named_parameters()}
    seen = []
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (step + 1))
            model[1].running_mean.fill_(float(step))
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        ema.update(model)
    want = _expected_after(start, seen, decay=0.5)
    for name, value in ema.shadow.named_parameters():
        torch.testing.assert_close(value, want[name])
    assert torch.equal(ema.shadow[1].running_mean, torch.full((4,), 3.0))  # buffers are copied, not averaged
    assert int(ema.num_updates) == 4


def _replace_weight_by_assignment(model: nn.Module) -> None:
    model[0].weight = nn.Parameter(torch.full_like(model[0].weight, 7.0))


def _replace_weight_by_assign_load(model: nn.Module) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"] = torch.full_like(state["0.weight"], 7.0)
    model.load_state_dict(state, assign=True)


def _replace_layer(model: nn.Module) -> None:
    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight.fill_(7.0)
        layer.bias.copy_(model[0].bias)
    model[0] = layer


@pytest.mark.parametrize("replace", [_replace_weight_by_assignment, _replace_weight_by_assign_load, _replace_layer])
def test_update_follows_tensors_replaced_after_the_first_update(replace):
    model = _model()
    ema = EMA(model, decay=0.0, use_warmup=False)  # decay 0: the shadow becomes the live weights at once
    ema.update(model)
    replace(model)
    ema.update(model)
    assert torch.equal(ema.shadow[0].weight, torch.full((4, 3), 7.0))


def test_update_follows_a_second_live_model_and_a_converted_shadow():
    model, other = _model(), _model()
    with torch.no_grad():
        other[2].weight.fill_(3.0)
    ema = EMA(model, decay=0.0, use_warmup=False)
    ema.update(model)
    ema.update(other)
    assert torch.equal(ema.shadow[2].weight, torch.full((2, 4), 3.0))
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # .double() then makes new Parameters
    try:
        ema.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    with torch.no_grad():
        other[2].weight.fill_(5.0)
    ema.update(other)
    assert ema.shadow[2].weight.dtype == torch.float64
    assert torch.equal(ema.shadow[2].weight, torch.full((2, 4), 5.0, dtype=torch.float64))


def test_copies_and_pickles_carry_no_reference_to_the_live_model():
    model = _model()
    ema = EMA(model, decay=0.9)
    ema.update(model)
    assert ema._pairs is not None
    assert copy.deepcopy(ema)._pairs is None  # deepcopy and pickle both go through __getstate__


def test_a_model_with_other_parameters_is_refused():
    ema = EMA(_model(), decay=0.9)
    with pytest.raises(RuntimeError, match="different parameter lists"):
        ema.update(nn.Linear(3, 4))
