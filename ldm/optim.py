"""Optimisation helpers: AdamW parameter groups and per-step LR schedules.

Optimizers and schedulers arrive from Hydra as ``functools.partial`` objects (``_partial_: true``);
the LightningModules complete them here inside ``configure_optimizers``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# Modules whose weights are not matrices applied to activations: no weight decay (AdamW paper, sec. 3;
# common practice in GPT/CLIP/SD training code).
_NO_DECAY_MODULES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm2d,
    nn.Embedding,
)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed AdamW group.

    Not decayed: every bias, every parameter of a norm layer or embedding, and any parameter with
    fewer than two dimensions (scalars such as CLIP's logit scale, positional embeddings as 1-D).
    Positional / token embedding matrices registered as bare ``nn.Parameter`` are recognised by a name
    containing ``embedding``.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for module_name, sub in module.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            if (
                isinstance(sub, _NO_DECAY_MODULES)
                or name.endswith("bias")
                or param.ndim < 2
                or "embedding" in full
            ):
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    partial_optimizer: Callable[..., torch.optim.Optimizer],
    module_or_params: Union[nn.Module, Iterable],
    weight_decay: Optional[float] = None,
) -> torch.optim.Optimizer:
    """Complete a partial optimizer; with a module, use decay / no-decay groups.

    ``weight_decay`` defaults to the partial's own ``weight_decay`` keyword (0 if absent).
    """
    if weight_decay is None:
        weight_decay = getattr(partial_optimizer, "keywords", {}).get("weight_decay", 0.0)
    if isinstance(module_or_params, nn.Module):
        params = param_groups(module_or_params, weight_decay)
    else:
        params = list(module_or_params)
    return partial_optimizer(params=params)


def build_scheduler(
    partial_scheduler: Optional[Callable[..., torch.optim.lr_scheduler.LRScheduler]],
    optimizer: torch.optim.Optimizer,
    name: str = "lr",
) -> Optional[dict]:
    """Complete a partial scheduler into Lightning's dict, stepped after every optimizer step."""
    if partial_scheduler is None:
        return None
    return {
        "scheduler": partial_scheduler(optimizer=optimizer),
        "interval": "step",
        "frequency": 1,
        "name": name,
    }


class _WarmupThen:
    """Multiplicative LR factor: linear warm-up over ``warmup_steps`` then a decay shape.

    A plain class (not a closure) so LambdaLR's state_dict stays picklable-free and resumable.
    """

    def __init__(self, warmup_steps: int, total_steps: Optional[int], shape: str, min_ratio: float):
        if shape != "constant" and (not total_steps or total_steps < 0):
            raise ValueError(
                f"LR schedule '{shape}' needs total_steps > 0 (got {total_steps}). Its configs take "
                "total_steps from trainer.max_steps: set trainer.max_steps (not -1), or set "
                "model.scheduler.total_steps, or use ldm.optim.warmup_constant for runs that end by epochs."
            )
        if total_steps and warmup_steps > total_steps:
            warnings.warn(
                f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}: warming up over the whole run "
                f"instead. Lower model.scheduler.warmup_steps to silence this."
            )
            warmup_steps = total_steps
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps or 0)
        self.shape = shape
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.shape == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.shape == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # linear
            factor = 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * factor


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up from ~0 to the base LR, then constant (SD's recipe: 10k warm-up steps)."""
    return LambdaLR(optimizer, _WarmupThen(warmup_steps, None, "constant", 1.0))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * base_lr`` at ``total_steps``."""
    return LambdaLR(optimizer, _WarmupThen(warmup_steps, total_steps, "cosine", min_lr_ratio))


def warmup_linear(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up, then linear decay to ``min_lr_ratio * base_lr`` at ``total_steps``."""
    return LambdaLR(optimizer, _WarmupThen(warmup_steps, total_steps, "linear", min_lr_ratio))


def clip_gradients_(parameters: Iterable[torch.Tensor], max_norm: Optional[float]) -> torch.Tensor:
    """Clip by global norm (for manual optimisation); returns the pre-clip norm as a tensor (no sync)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm is None or max_norm <= 0:
        norms = torch.stack([p.grad.detach().norm(2) for p in params])
        return norms.norm(2)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
