"""Samplers: pure functions over a VE denoiser ``D(x, sigma, **extra_args) -> x0_hat`` (k-diffusion style).

All samplers share one signature::

    sample_xxx(denoiser, x, sigmas, *, extra_args=None, generator=None, callback=None, progress=True, **opts) -> x0

``x`` is the initial noise already multiplied by ``sigmas[0]``; ``sigmas`` is a strictly decreasing 1-D tensor that
ends in 0 (see ``get_sigmas``). Every random draw comes from ``generator``, so a fixed seed is bit-reproducible.
``callback`` receives ``{"x", "i", "sigma", "sigma_next", "denoised"}`` after each step.

In VE coordinates several classic samplers coincide (see docs/diffusion.md): DDIM(eta=0) is the Euler step of the
probability-flow ODE, and DDIM(eta=1) is the DDPM posterior step, which is also Euler-ancestral(eta=1).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor
from tqdm.auto import trange

from ldm.diffusion.schedule import NoiseSchedule

Denoiser = Callable[..., Tensor]
Callback = Callable[[dict], None]
SIGMA_SPACINGS = ("leading", "trailing", "linspace", "karras")


# ---- sigma schedules ---------------------------------------------------------------------------------------------


def get_sigmas(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = "leading",
    rho: float = 7.0,
    steps_offset: int = 1,
) -> Tensor:
    """``steps + 1`` decreasing sigmas ending in 0, float32 on the schedule's device.

    Spacings follow Lin et al. 2023, Table 2 (and diffusers' ``DDIMScheduler.set_timesteps``):

    - ``"leading"``: t = (steps-1, ..., 0) * (T // steps) + steps_offset (Stable Diffusion / DDIM default).
    - ``"trailing"``: t = round(T, T - T/steps, ...) - 1; starts at t = T - 1, required for zero terminal SNR.
    - ``"linspace"``: t = round(linspace(0, T - 1, steps)) reversed.
    - ``"karras"``: Karras et al. 2022 eq. 5, ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``
      between the schedule's sigma_min and sigma_max (continuous, not on the training grid).
    """
    T = schedule.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] for a schedule with {T} timesteps, got {steps}.")
    if spacing == "karras":
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        lo, hi = schedule.sigma_min ** (1 / rho), schedule.sigma_max ** (1 / rho)
        sigmas = ((hi + ramp * (lo - hi)) ** rho).float().to(schedule.sigmas.device)
    else:
        if spacing == "leading":
            timesteps = torch.arange(steps - 1, -1, -1, dtype=torch.long) * (T // steps) + steps_offset
            if int(timesteps[0]) > T - 1:
                raise ValueError(
                    f"'leading' spacing with steps={steps}, steps_offset={steps_offset} reaches t={int(timesteps[0])}"
                    f" > {T - 1}; use fewer steps, steps_offset=0, or spacing='trailing'."
                )
        elif spacing == "trailing":
            timesteps = torch.arange(T, 0, -T / steps, dtype=torch.float64).round().long() - 1
        elif spacing == "linspace":  # diffusers' rounding; one step starts at T - 1 (diffusers would pick t = 0)
            first = 0 if steps > 1 else T - 1
            timesteps = torch.linspace(first, T - 1, steps, dtype=torch.float64).round().long().flip(0)
        else:
            raise ValueError(f"Unknown sigma spacing {spacing!r}; choose one of {SIGMA_SPACINGS}.")
        sigmas = schedule.sigmas[timesteps.to(schedule.sigmas.device)]
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# ---- helpers -----------------------------------------------------------------------------------------------------


def _check_sigmas(x: Tensor, sigmas: Tensor) -> list[float]:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with >= 2 entries (get_sigmas), got shape {tuple(sigmas.shape)}.")
    values = sigmas.tolist()
    if values[-1] != 0 or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError("sigmas must be strictly decreasing and end in 0; build them with get_sigmas().")
    if x.ndim < 1:
        raise ValueError("x must be a batch [B, ...].")
    return values


def _randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_next^2; eta = 1 is the DDPM posterior noise."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(1 - sigma_next**2 / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


class _Stepper:
    """Loop plumbing shared by the samplers: progress bar, batched sigma, denoiser call with extra args."""

    def __init__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        extra_args: Optional[dict],
        callback: Optional[Callback],
        progress: bool,
    ):
        self.values = _check_sigmas(x, sigmas)
        self.denoiser, self.extra_args, self.callback = denoiser, extra_args or {}, callback
        self.batch, self.device = x.shape[0], x.device
        self.progress = progress

    def steps(self) -> Iterator[tuple[int, float, float]]:
        """Yields (i, sigma, sigma_next)."""
        for i in trange(len(self.values) - 1, disable=not self.progress, desc="sampling", leave=False):
            yield i, self.values[i], self.values[i + 1]

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        s = torch.full((self.batch,), sigma, device=self.device, dtype=torch.float32)  # [B]
        return self.denoiser(x, s, **self.extra_args)

    def report(self, x: Tensor, i: int, sigma: float, sigma_next: float, denoised: Tensor) -> None:
        if self.callback is not None:
            self.callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


# ---- samplers ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Optional[dict] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
) -> Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 1 / Alg. 1
    without its 2nd-order correction)."""
    run = _Stepper(denoiser, x, sigmas, extra_args, callback, progress)
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        run.report(x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Optional[dict] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
    eta: float = 1.0,
) -> Tensor:
    """Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion ``sample_euler_ancestral``)."""
    run = _Stepper(denoiser, x, sigmas, extra_args, callback, progress)
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma)
        sigma_down, sigma_up = _ancestral_sigmas(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + sigma_up * _randn_like(x, generator)
        run.report(x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Optional[dict] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16) written in VE coordinates.

    Dividing eq. 12, ``x_s = sqrt(ac_s) x0 + sqrt(1 - ac_s - s_eta^2) eps + s_eta z``, by sqrt(ac_s) and using
    ``sigma^2 = (1 - ac) / ac`` gives ``x_s = x0 + sqrt(sigma_s^2 - u^2) eps + u z`` with
    ``u = s_eta / sqrt(ac_s) = eta * sigma_s * sqrt(1 - sigma_s^2 / sigma_t^2)`` and eps = (x_t - x0) / sigma_t.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1] (0: deterministic, 1: DDPM posterior noise), got {eta}.")
    run = _Stepper(denoiser, x, sigmas, extra_args, callback, progress)
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma)
        eps = (x - denoised) / sigma
        u = eta * sigma_next * math.sqrt(1 - sigma_next**2 / sigma**2)  # <= sigma_next for eta <= 1
        x = denoised + math.sqrt(sigma_next**2 - u**2) * eps
        if u > 0:
            x = x + u * _randn_like(x, generator)
        run.report(x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Optional[dict] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, eqs. 6-7), VE coordinates.

    In VE coordinates the forward step is x_t = x_s + sqrt(sigma_t^2 - sigma_s^2) z, so the posterior is the
    Gaussian bridge ``N(x0 + (sigma_s^2 / sigma_t^2) (x_t - x0), sigma_s^2 (1 - sigma_s^2 / sigma_t^2))``; it is
    the "small" (beta tilde) posterior variance and handles skipped timesteps exactly.
    """
    run = _Stepper(denoiser, x, sigmas, extra_args, callback, progress)
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma)
        ratio = sigma_next**2 / sigma**2
        x = denoised + ratio * (x - denoised)
        if sigma_next > 0:
            x = x + sigma_next * math.sqrt(1 - ratio) * _randn_like(x, generator)
        run.report(x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Optional[dict] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1; Euler on the last step)."""
    run = _Stepper(denoiser, x, sigmas, extra_args, callback, progress)
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma)
        d = (x - denoised) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - run.denoise(x_euler, sigma_next)) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        run.report(x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Optional[dict] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in lambda = -log(sigma), as k-diffusion ``sample_dpmpp_2m``."""
    run = _Stepper(denoiser, x, sigmas, extra_args, callback, progress)
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma)
        if sigma_next == 0:
            x = denoised  # the exponential integrator's limit as sigma_next -> 0
        else:
            h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        run.report(x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Optional[dict] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 4 / app. B), midpoint form, as k-diffusion ``sample_dpmpp_2m_sde``.

    With h = lambda_next - lambda and eta_h = eta * h, each step is the exact solution of the linear part of the
    reverse SDE plus a second-order correction from the previous denoised estimate, then fresh noise of std
    ``sigma_next * sqrt(1 - exp(-2 eta_h))``. ``eta = 0`` is exactly DPM-Solver++(2M); ``eta = 1`` is the SDE.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    run = _Stepper(denoiser, x, sigmas, extra_args, callback, progress)
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            decay = -math.expm1(-h - eta_h)  # 1 - exp(-(1 + eta) h)
            x = (sigma_next / sigma) * math.exp(-eta_h) * x + decay * denoised
            if old_denoised is not None:
                x = x + 0.5 * decay * (h / h_last) * (denoised - old_denoised)
            if eta > 0:
                x = x + _randn_like(x, generator) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
            h_last = h
        old_denoised = denoised
        run.report(x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    x0: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Optional[dict] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
    fixed_point_iters: int = 0,
) -> Tensor:
    """Deterministic DDIM inversion: map clean ``x0`` to the x at ``sigmas[0]`` that ``sample_ddim(eta=0)`` on the
    same ``sigmas`` maps back to ~x0.

    Each step from sigma_low up to sigma_high inverts the sampler's step ``x_low = x_high + (sigma_low - sigma_high)
    * d(x_high, sigma_high)``, with ``d(x, sigma) = (x - D(x, sigma)) / sigma``. The default (``fixed_point_iters=0``)
    evaluates d at the current sample, like diffusers' ``DDIMInverseScheduler`` (1 NFE per step, O(step) error);
    each fixed-point iteration ``x_high <- x_low + (sigma_high - sigma_low) d(x_high, sigma_high)`` (Pan et al. 2023,
    AIDI) costs 1 more NFE per step and converges to the exact inverse of the sampler step.
    """
    if fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}.")
    run = _Stepper(denoiser, x0, sigmas, extra_args, callback, progress)
    values = run.values[::-1]  # increasing: 0, ..., sigmas[0]
    x = x0
    for k in trange(len(values) - 1, disable=not progress, desc="inverting", leave=False):
        sigma_low, sigma_high = values[k], values[k + 1]
        x_low = x
        denoised = run.denoise(x_low, sigma_high)
        x = x_low + (x_low - denoised) / sigma_high * (sigma_high - sigma_low)
        for _ in range(fixed_point_iters):
            denoised = run.denoise(x, sigma_high)
            x = x_low + (x - denoised) / sigma_high * (sigma_high - sigma_low)
        run.report(x, k, sigma_low, sigma_high, denoised)
    return x


# ---- registry ----------------------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Sampler function by registry name."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"Unknown sampler {name!r}; valid names: {', '.join(sorted(SAMPLERS))}.") from None


def nfe(name: str, steps: int) -> int:
    """Number of denoiser (network) evaluations for ``steps`` steps; CFG doubles the batch, not the count."""
    get_sampler(name)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    return 2 * steps - 1 if name == "heun" else steps

