"""Diffusion core: noise schedules, training targets and losses, the VE denoiser wrapper, samplers and CFG.

Pure PyTorch; knows nothing about Lightning or Hydra. See docs/diffusion.md.
"""

from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.guidance import CFGDenoiser
from ldm.diffusion.loss import diffusion_loss, loss_weights, sample_timesteps
from ldm.diffusion.samplers import (
    SAMPLERS,
    ddim_invert,
    get_sampler,
    get_sigmas,
    nfe,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from ldm.diffusion.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr, sample_noise

__all__ = [
    "CFGDenoiser",
    "DiscreteDenoiser",
    "NoiseSchedule",
    "SAMPLERS",
    "ddim_invert",
    "diffusion_loss",
    "get_sampler",
    "get_sigmas",
    "loss_weights",
    "make_betas",
    "nfe",
    "rescale_zero_terminal_snr",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_noise",
    "sample_timesteps",
]
