"""Exponential moving average of a network's weights (Polyak averaging, as in DDPM / SD training).

The shadow copy is a registered sub-module, so it travels in the state dict (``model_ema.*``),
is restored on resume, and is ignored by DDP (no gradients).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import nn


_module_tree_changes = 0  # parameters, buffers and sub-modules registered anywhere in this process, so far


def _count_registration(*_args) -> None:
    global _module_tree_changes
    _module_tree_changes += 1


# Assigning a parameter, buffer or sub-module (``module.weight = nn.Parameter(...)``,
# ``load_state_dict(assign=True)``, swapping in a new layer) runs torch's global registration hooks.
for _register_hook in (nn.modules.module.register_module_parameter_registration_hook,
                       nn.modules.module.register_module_buffer_registration_hook,
                       nn.modules.module.register_module_module_registration_hook):
    _register_hook(_count_registration)


class _Pairs(NamedTuple):
    model: nn.Module  # the live model the lists were taken from
    tree_changes: int  # _module_tree_changes when they were taken
    shadow: list[torch.Tensor]  # the shadow's floating parameters
    live: list[torch.Tensor]  # the model's parameters at the same positions
    buffers: list[tuple[torch.Tensor, torch.Tensor]]  # (shadow buffer, model buffer), copied as they are


class EMA(nn.Module):
    """EMA with warm-up: ``decay_t = min(decay, (1 + n) / (10 + n))`` (as CompVis LitEma).

    ``shadow``: the averaged copy of the model (eval mode, no grads).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}.")
        self.decay = decay
        self.use_warmup = use_warmup
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._host_updates: int | None = None  # host mirror of num_updates: no device sync per step
        self._pairs: _Pairs | None = None  # the tensors update() pairs up, found once per live model

    def _load_from_state_dict(self, *args, **kwargs):
        self._host_updates = None  # re-read the restored counter on the next update
        self._pairs = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._pairs = None  # .to() / .half() may replace tensors: pair them up again
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_pairs": None}  # deepcopy / pickle never carry references to the live model

    def _paired_tensors(self, model: nn.Module) -> _Pairs:
        """The shadow's floating parameters and buffers beside the model's.

        Both module trees are walked again only when a parameter, buffer or sub-module was assigned anywhere
        since the last walk, or the EMA was converted or loaded. Walking them on every update made the
        quickstart U-Net's update 2.5 ms instead of 0.8 ms."""
        pairs = self._pairs
        if pairs is None or pairs.model is not model or pairs.tree_changes != _module_tree_changes:
            shadow, live = list(self.shadow.parameters()), list(model.parameters())
            if len(shadow) != len(live):
                raise RuntimeError("EMA shadow and model have different parameter lists; rebuild the EMA.")
            floats = [(s, p) for s, p in zip(shadow, live) if s.dtype.is_floating_point]
            self._pairs = _Pairs(model, _module_tree_changes, [s for s, _ in floats], [p for _, p in floats],
                                 list(zip(self.shadow.buffers(), model.buffers())))
        return self._pairs

    def current_decay(self) -> float:
        """Decay used for the next update."""
        if self._host_updates is None:
            self._host_updates = int(self.num_updates)
        if not self.use_warmup:
            return self.decay
        n = self._host_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * model for every floating parameter; buffers are copied."""
        weight = 1.0 - self.current_decay()
        self.num_updates.add_(1)  # in place: assigning the buffer would count as a module-tree change
        self._host_updates += 1
        pairs = self._paired_tensors(model)
        if pairs.shadow:
            live = [p if p.dtype == s.dtype else p.to(s.dtype) for s, p in zip(pairs.shadow, pairs.live)]
            torch._foreach_lerp_(pairs.shadow, live, weight)
        for s_buf, buf in pairs.buffers:
            s_buf.copy_(buf)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            p.copy_(s)

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (e.g. for validation samples)."""
        backup = [p.detach().clone() for p in model.parameters()]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(model.parameters(), backup):
                    p.copy_(b)
