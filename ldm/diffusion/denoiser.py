"""Wrap a discrete-time VP network as a continuous VE denoiser ``D(x, sigma) -> x0_hat`` (k-diffusion style).

The network ``model(x_in, t, **cond)`` was trained on ``x_t = sqrt(ac) x0 + sqrt(1 - ac) eps`` to predict eps, v or
x0. Samplers work on ``x = x_t / sqrt(ac) = x0 + sigma * eps``. With ``c_in = 1 / sqrt(sigma^2 + 1)`` (= sqrt(ac))
the network sees its training input, and ``D = c_skip * x + c_out * model(c_in * x, t(sigma))`` with (Karras et al.
2022, Table 1, "VP" column for eps; v as k-diffusion's ``DiscreteVDDPMDenoiser``):

    eps: c_skip = 1,                    c_out = -sigma
    v:   c_skip = 1 / (sigma^2 + 1),     c_out = -sigma / sqrt(sigma^2 + 1)
    x0:  c_skip = 0,                    c_out = 1
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from ldm.diffusion.schedule import NoiseSchedule, _check_parameterization, _expand


class DiscreteDenoiser(nn.Module):
    """``D(x, sigma, **cond) -> x0_hat`` for a network ``model(x_in, t, **cond)`` trained on ``schedule``.

    x: [B, ...] VE sample ``x0 + sigma * eps``; sigma: [B] or scalar. ``quantize`` rounds t to the nearest training
    timestep (the network is then only ever called on integer t). ``clip_x0`` optionally clamps x0_hat to
    ``[-clip_x0, clip_x0]``; leave it ``None`` for latents (normalised latents are not bounded by 1).
    """

    def __init__(
        self,
        model: Union[nn.Module, Callable[..., Tensor]],
        schedule: NoiseSchedule,
        parameterization: str = "eps",
        quantize: bool = False,
        clip_x0: Optional[float] = None,
    ):
        super().__init__()
        _check_parameterization(parameterization)
        if clip_x0 is not None and clip_x0 <= 0:
            raise ValueError(f"clip_x0 must be positive or None, got {clip_x0}.")
        self.model = model
        self.schedule = schedule
        self.parameterization = parameterization
        self.quantize = quantize
        self.clip_x0 = clip_x0

    def get_scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for sigma [B] (Karras et al. 2022, Table 1)."""
        c_in = (sigma**2 + 1).rsqrt()
        if self.parameterization == "eps":
            return torch.ones_like(sigma), -sigma, c_in
        if self.parameterization == "v":
            return c_in**2, -sigma * c_in, c_in
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in

    def _network_dtype(self, x: Tensor) -> torch.dtype:
        """dtype of the wrapped network's floating weights (x's dtype for a plain function)."""
        if isinstance(self.model, nn.Module):
            for p in self.model.parameters():
                if p.is_floating_point():
                    return p.dtype
        return x.dtype

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize)

    def forward(self, x: Tensor, sigma: Union[Tensor, float], **cond) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])  # [B]
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or [B]={x.shape[0]}, got shape {tuple(sigma.shape)}.")
        c_skip, c_out, c_in = (_expand(c, x) for c in self.get_scalings(sigma))
        x_in = (x * c_in).to(self._network_dtype(x))  # e.g. bf16 weights: the sampler's state stays fp32
        out = self.model(x_in, self.sigma_to_t(sigma), **cond).to(x.dtype)  # [B, ...]
        x0 = c_skip * x + c_out * out
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return x0
