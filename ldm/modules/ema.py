"""Exponential moving average of a network's weights (Polyak averaging, as in DDPM / SD training).

The shadow copy is a registered sub-module, so it travels in the state dict (``model_ema.*``),
is restored on resume, and is ignored by DDP (no gradients).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


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

    def _load_from_state_dict(self, *args, **kwargs):
        self._host_updates = None  # re-read the restored counter on the next update
        super()._load_from_state_dict(*args, **kwargs)

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
        """shadow <- decay * shadow + (1 - decay) * model, for every floating parameter and buffer."""
        weight = 1.0 - self.current_decay()
        self.num_updates += 1
        self._host_updates += 1
        shadow = [p for p in self.shadow.parameters()]
        live = [p.detach() for p in model.parameters()]
        if len(shadow) != len(live):
            raise RuntimeError("EMA shadow and model have different parameter lists; rebuild the EMA.")
        pairs = [(s, p) for s, p in zip(shadow, live) if s.dtype.is_floating_point]
        if pairs:
            s_list, p_list = zip(*pairs)
            torch._foreach_lerp_(list(s_list), [p.to(s.dtype) for s, p in pairs], weight)
        for s_buf, buf in zip(self.shadow.buffers(), model.buffers()):
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
