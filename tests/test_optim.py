"""Weight-decay groups and LR schedules (ldm/optim.py)."""

import functools
import math

import pytest
import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.optim import (
    build_optimizer,
    build_scheduler,
    clip_gradients_,
    param_groups,
    warmup_constant,
    warmup_cosine,
    warmup_linear,
)
from tests.script_loader import load_script


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.pos_embedding = nn.Parameter(torch.zeros(4, 8))  # matrix, but an embedding by name
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv2d(8, 8, 3)
        self.gn = nn.GroupNorm(2, 8)
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_weight_decay_groups_hold_exactly_the_intended_parameters():
    model = Tiny()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in decay["params"]} == {"linear.weight", "conv.weight"}
    assert {by_id[id(p)] for p in no_decay["params"]} == {
        "embed.weight", "pos_embedding", "linear.bias", "norm.weight", "norm.bias",
        "conv.bias", "gn.weight", "gn.bias", "scale",
    }


def test_groups_on_attention_block_decay_only_projection_matrices():
    block = SpatialTransformer(16, n_heads=2, d_head=8, context_dim=12)
    decay, no_decay = param_groups(block, 0.01)
    names = {id(p): n for n, p in block.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith("weight") for n in decayed)
    assert not any("norm" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(block.parameters()))


def test_build_optimizer_uses_partial_weight_decay_and_groups():
    partial = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    opt = build_optimizer(partial, Tiny())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["lr"] == 1e-3


def _lrs(scheduler_fn, steps, base_lr=1.0, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = scheduler_fn(opt, **kw)
    values = []
    for _ in range(steps):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return values


def test_warmup_constant_values():
    lrs = _lrs(warmup_constant, 8, base_lr=2.0, warmup_steps=4)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[4:] == pytest.approx([2.0] * 4)


def test_warmup_cosine_values():
    lrs = _lrs(warmup_cosine, 12, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)  # start of decay
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lrs[6] == pytest.approx(mid)
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)


def test_warmup_linear_values_and_bad_arguments():
    lrs = _lrs(warmup_linear, 7, warmup_steps=1, total_steps=5)
    assert lrs == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.warns(UserWarning, match="warmup_steps=20 exceeds total_steps=10"):
        sched = warmup_cosine(opt, total_steps=10, warmup_steps=20)
    assert sched.lr_lambdas[0].warmup_steps == 10
    with pytest.raises(ValueError, match="needs total_steps"):
        warmup_cosine(opt, total_steps=0)
    with pytest.raises(ValueError, match="trainer.max_steps"):
        warmup_linear(opt, total_steps=-1)  # trainer.max_steps=-1: runs that end by epoch count


def test_scheduler_state_dict_round_trip_continues_curve():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_steps=2)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = warmup_cosine(opt2, total_steps=10, warmup_steps=2)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    opt.step(); sched.step(); opt2.step(); sched2.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(opt2.param_groups[0]["lr"])


def test_build_scheduler_is_stepped_per_optimizer_step():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    out = build_scheduler(functools.partial(warmup_constant, warmup_steps=3), opt)
    assert out["interval"] == "step" and out["frequency"] == 1
    assert build_scheduler(None, opt) is None


def test_clip_gradients_returns_pre_clip_norm_and_clips():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    norm = clip_gradients_([p], max_norm=1.5)
    assert norm.item() == pytest.approx(6.0)
    assert p.grad.norm().item() == pytest.approx(1.5, rel=1e-4)


def test_plot_lr_reads_the_schedules_the_experiments_configure(tmp_path):
    script = load_script("plot_lr")
    lrs, schedule = script.lr_curve("quickstart_ldm")  # lr 2e-3, warm-up 50, cosine to 0 at max_steps 1,500
    assert len(lrs) == 1500 and schedule.startswith("warmup_cosine(")
    assert lrs[0] == pytest.approx(2e-3 / 50) and lrs[49] == pytest.approx(2e-3) and max(lrs) == pytest.approx(2e-3)
    assert lrs[-1] < 1e-8 and all(a >= b for a, b in zip(lrs[49:], lrs[50:]))  # decays without a bump
    lrs, _ = script.lr_curve("sd15_finetune", ["trainer.max_steps=12000"])  # SD: 10k warm-up steps, then flat
    assert lrs[4999] == pytest.approx(5e-5) and lrs[9999] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-4)
    out = script.main(["--experiment", "quickstart_clip", "--out", str(tmp_path / "lr.png")])
    assert out.stat().st_size > 0
