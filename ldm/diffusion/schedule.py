"""Discrete-time variance-preserving noise schedules (DDPM) and their VE (sigma) view.

Notation (Ho et al. 2020): ``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` and the forward process

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)            (Ho et al. eq. 4)

The same process in variance-exploding coordinates (Karras et al. 2022) is ``x = x_t / sqrt(alpha_bar_t)
= x_0 + sigma_t * eps`` with ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``; samplers work there.
``SNR(t) = alpha_bar_t / (1 - alpha_bar_t) = 1 / sigma_t^2``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PARAMETERIZATIONS = ("eps", "v", "x0")

# Zero terminal SNR makes alpha_bar_T = 0 and sigma_T infinite. Like diffusers' EulerDiscreteScheduler we
# floor alpha_bar at 2**-24 *only* for the sigma view (sigma_max ~ 4096), so VE samplers stay finite;
# q_sample / target / snr keep the exact alpha_bar (= 0 at T).
_MIN_ALPHA_BAR_FOR_SIGMA = 2.0**-24

TimeLike = Union[Tensor, int, float]


def make_betas(
    kind: str,
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> Tensor:
    """Beta schedule, float64 [num_timesteps].

    - ``"linear"``: DDPM, ``linspace(beta_start, beta_end)`` (Ho et al. 2020 used 1e-4 .. 0.02).
    - ``"scaled_linear"``: Stable Diffusion, ``linspace(sqrt(beta_start), sqrt(beta_end)) ** 2``. CompVis'
      ``make_beta_schedule`` calls this one ``"linear"``; diffusers calls it ``"scaled_linear"`` as here.
    - ``"cosine"``: Nichol & Dhariwal 2021 eq. 17, ``alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)``, s = 0.008,
      betas capped at 0.999 (``beta_start`` / ``beta_end`` are unused).
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}.")
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    elif kind == "cosine":
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"Unknown beta schedule {kind!r}; choose one of {BETA_SCHEDULES}.")
    if kind != "cosine" and not (0.0 < beta_start <= beta_end < 1.0):
        raise ValueError(f"Need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}.")
    return betas


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that SNR(T) = 0 while keeping alpha_bar_0 (Lin et al. 2023, Algorithm 1). float64."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)  # shift to 0 at T, keep value at 0
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def sample_noise(
    shape: Sequence[int],
    offset_noise: float = 0.0,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise ``[B, C, ...]`` plus optional offset noise ``offset * N(0, 1)`` per ``[B, C, 1, 1]``.

    Offset noise (Guttenberg 2023, "Diffusion with Offset Noise") lets the model change the per-channel mean,
    i.e. produce very dark / bright images. ``device`` defaults to the generator's device.
    """
    shape = tuple(int(s) for s in shape)
    if device is None and generator is not None:
        device = generator.device
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if offset_noise:
        if len(shape) < 2:
            raise ValueError(f"Offset noise needs a [B, C, ...] shape, got {shape}.")
        offset_shape = shape[:2] + (1,) * (len(shape) - 2)
        noise = noise + offset_noise * torch.randn(offset_shape, generator=generator, device=device, dtype=dtype)
    return noise


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"Unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}.")


def _expand(coef: Tensor, like: Tensor) -> Tensor:
    """[B] (or scalar) coefficient -> [B, 1, ..., 1] broadcastable against ``like``, in ``like``'s dtype."""
    coef = coef.to(device=like.device, dtype=like.dtype)
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


class NoiseSchedule(nn.Module):
    """A discrete VP schedule with T steps and its continuous sigma view (k-diffusion style).

    Buffers (float32, [T], non-persistent: they are derived from the betas so they stay out of state dicts):
    ``betas``, ``alphas_cumprod``, ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``sigmas``
    (``sqrt((1 - ac) / ac)``, increasing in t) and ``log_sigmas``.

    Timesteps ``t`` are ``[B]`` (or scalar) tensors. Integer tensors index the table exactly; floating tensors
    are continuous times, interpolated linearly in log-sigma (as ``t_to_sigma``); so with zero terminal SNR a
    float ``t = T - 1`` sees the floored alpha_bar 2**-24 while the integer one sees exactly 0.
    """

    def __init__(self, betas: Union[Tensor, Sequence[float]]):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with >= 2 entries, got shape {tuple(betas.shape)}.")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1].")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if not bool((alphas_cumprod[:-1] > 0).all()):
            raise ValueError("alphas_cumprod reaches 0 before the last step; only the final step may have SNR 0.")
        sigma_ac = alphas_cumprod.clamp(min=_MIN_ALPHA_BAR_FOR_SIGMA)
        sigmas = ((1 - sigma_ac) / sigma_ac).sqrt()
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        # square roots from float64: 1 - alpha_bar near t = 0 would lose digits if taken from the float32 buffer
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float(), persistent=False)
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)

    @classmethod
    def from_config(
        cls,
        kind: str = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        """Build from plain values (Hydra: ``_target_: ldm.diffusion.schedule.NoiseSchedule.from_config``)."""
        betas = make_betas(kind, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # ---- time <-> sigma -------------------------------------------------------------------------------------

    def _as_time(self, t: TimeLike) -> Tensor:
        t = torch.as_tensor(t, device=self.betas.device)
        if t.device.type in ("cuda", "meta"):  # checked on the device: no host sync per call (fails at the next one)
            in_range = ((t >= 0) & (t <= self.num_timesteps - 1)).all()
            torch._assert_async(in_range, f"Timesteps must lie in [0, {self.num_timesteps - 1}].")
            return t
        lo, hi = t.min().item(), t.max().item()  # catches off-by-one T and 1-based indexing
        if lo < 0 or hi > self.num_timesteps - 1:
            raise ValueError(f"Timesteps must lie in [0, {self.num_timesteps - 1}], got range [{lo}, {hi}].")
        return t

    def t_to_sigma(self, t: TimeLike) -> Tensor:
        """sigma(t), float32; continuous t interpolates linearly in log-sigma (k-diffusion)."""
        return self._sigma_at(self._as_time(t))

    def _sigma_at(self, t: Tensor) -> Tensor:
        """sigma at an already validated t."""
        if not t.is_floating_point():
            return self.sigmas[t]
        t = t.float()
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]
        return log_sigma.exp()

    def sigma_to_t(self, sigma: Union[Tensor, float], quantize: bool = False) -> Tensor:
        """Inverse of ``t_to_sigma``: continuous float t (clamped to [0, T-1]); ``quantize`` rounds to the
        nearest training timestep in log-sigma and returns a LongTensor (CompVis ``DiscreteEpsDDPMDenoiser``)."""
        sigma = torch.as_tensor(sigma, device=self.log_sigmas.device, dtype=torch.float32)
        log_sigma = sigma.log()
        if quantize:
            return (log_sigma.reshape(-1, 1) - self.log_sigmas).abs().argmin(dim=1).reshape(sigma.shape)
        high = torch.searchsorted(self.log_sigmas, log_sigma.reshape(-1)).clamp(1, self.num_timesteps - 1)
        low = high - 1
        lo_val, hi_val = self.log_sigmas[low], self.log_sigmas[high]
        w = ((log_sigma.reshape(-1) - lo_val) / (hi_val - lo_val)).clamp(0, 1)
        return (low + w).reshape(sigma.shape)

    def _sqrt_alpha_bars(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        """(sqrt(ac_t), sqrt(1 - ac_t)), float32 [B]: table values for integer t, from sigma(t) for float t."""
        t = self._as_time(t)
        if not t.is_floating_point():
            return self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]
        sigma = self._sigma_at(t)
        a = (1 + sigma**2).rsqrt()
        return a, sigma * a

    def alpha_bar(self, t: TimeLike) -> Tensor:
        """alpha_bar_t, float32 [B]."""
        return self._sqrt_alpha_bars(t)[0] ** 2

    def snr(self, t: TimeLike) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar), float32 [B] (0 at T with zero terminal SNR)."""
        a, b = self._sqrt_alpha_bars(t)
        return (a / b) ** 2

    def _coefs(self, t: TimeLike, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(ac), sqrt(1 - ac)) shaped [B, 1, ..., 1] like ``like``."""
        a, b = self._sqrt_alpha_bars(t)
        return _expand(a, like), _expand(b, like)

    # ---- forward process, targets, conversions ---------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: TimeLike, noise: Tensor) -> Tensor:
        """x_t = sqrt(ac_t) x_0 + sqrt(1 - ac_t) eps (Ho et al. eq. 4). x0, noise: [B, ...]."""
        a, b = self._coefs(t, x0)
        return a * x0 + b * noise

    def target(self, x0: Tensor, noise: Tensor, t: TimeLike, parameterization: str) -> Tensor:
        """Regression target: eps, x0, or v = sqrt(ac) eps - sqrt(1 - ac) x0 (Salimans & Ho 2022, sec. 4)."""
        _check_parameterization(parameterization)
        if parameterization == "eps":
            return noise
        if parameterization == "x0":
            return x0
        a, b = self._coefs(t, x0)
        return a * noise - b * x0

    def to_x0(self, x_t: Tensor, t: TimeLike, out: Tensor, parameterization: str) -> Tensor:
        """x0 implied by a model output ``out`` at (x_t, t). eps-prediction is undefined where alpha_bar = 0."""
        _check_parameterization(parameterization)
        if parameterization == "x0":
            return out
        a, b = self._coefs(t, x_t)
        if parameterization == "eps":
            return (x_t - b * out) / a
        return a * x_t - b * out

    def to_eps(self, x_t: Tensor, t: TimeLike, out: Tensor, parameterization: str) -> Tensor:
        """eps implied by a model output ``out`` at (x_t, t). x0-prediction is undefined where alpha_bar = 1."""
        _check_parameterization(parameterization)
        if parameterization == "eps":
            return out
        a, b = self._coefs(t, x_t)
        if parameterization == "x0":
            return (x_t - a * out) / b
        return b * x_t + a * out

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g}"
