"""Denoising loss: timestep sampling, per-timestep weights (uniform / min-SNR-gamma) and weighted MSE."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion.schedule import NoiseSchedule, _check_parameterization

WEIGHTINGS = ("uniform", "min_snr")


def sample_timesteps(
    batch: int,
    num_timesteps: int,
    t_min: int = 0,
    t_max: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Tensor:
    """Uniform integer timesteps in ``[t_min, t_max)`` (``t_max`` defaults to ``num_timesteps``), LongTensor [B]."""
    t_max = num_timesteps if t_max is None else t_max
    if not 0 <= t_min < t_max <= num_timesteps:
        raise ValueError(f"Need 0 <= t_min < t_max <= num_timesteps={num_timesteps}, got t_min={t_min}, t_max={t_max}.")
    if device is None and generator is not None:
        device = generator.device
    return torch.randint(t_min, t_max, (batch,), generator=generator, device=device)


def loss_weights(
    schedule: NoiseSchedule,
    t: Tensor,
    parameterization: str,
    weighting: str = "uniform",
    gamma: float = 5.0,
) -> Tensor:
    """Per-sample loss weights, float32 [B].

    ``"min_snr"`` is Min-SNR-gamma (Hang et al. 2023): weight ``min(SNR, gamma)`` on the x0 error. Since
    ``|eps - eps_hat|^2 = SNR |x0 - x0_hat|^2`` and ``|v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2`` the same weighting
    is ``min(SNR, gamma) / SNR`` for eps targets (-> 1 as SNR -> 0) and ``min(SNR, gamma) / (SNR + 1)`` for v
    targets (0 at a zero-terminal-SNR step: x0 is unidentifiable from pure noise).
    """
    _check_parameterization(parameterization)
    if weighting == "uniform":
        return torch.ones(t.shape, device=t.device, dtype=torch.float32)
    if weighting != "min_snr":
        raise ValueError(f"Unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}.")
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be positive, got {gamma}.")
    snr = schedule.snr(t).double()  # [B]
    clipped = snr.clamp(max=gamma)
    if parameterization == "x0":
        weights = clipped
    elif parameterization == "v":
        weights = clipped / (snr + 1)
    else:
        weights = torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(torch.float64).tiny), torch.ones_like(snr))
    return weights.float().to(t.device)


def diffusion_loss(pred: Tensor, target: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Mean over the batch of ``weights * mean-squared-error per sample``; scalar, computed in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape.")
    squared_error = F.mse_loss(pred.float(), target.float(), reduction="none")  # [B, ...]
    per_sample = squared_error.reshape(pred.shape[0], -1).mean(dim=1)  # [B]
    if weights is None:
        return per_sample.mean()
    if weights.shape != per_sample.shape:
        raise ValueError(f"weights must be [B]={per_sample.shape[0]}, got shape {tuple(weights.shape)}.")
    return (weights.to(per_sample) * per_sample).mean()
