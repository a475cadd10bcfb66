"""Test weights: SD zero-initialises its output layers, which hides every conditioning path at init."""

from __future__ import annotations

import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace SD's zero-initialised output layers so outputs and gradients are not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model
