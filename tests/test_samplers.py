"""Denoiser wrapper, samplers, DDIM inversion and CFG against closed-form data distributions and diffusers.

For Gaussian data x0 ~ N(mu, diag(s^2)) the exact denoiser is E[x0 | x0 + sigma eps] = (s^2 x + sigma^2 mu) /
(s^2 + sigma^2) and the probability-flow ODE maps x at sigma_0 to mu + (x - mu) s / sqrt(s^2 + sigma_0^2). We turn
the analytic denoiser into an exact *discrete-time network* (eps or v on VP inputs), so every test runs the full
path network -> DiscreteDenoiser -> sampler. Samplers start from the exact marginal at sigmas[0],
x = mu + sqrt(s^2 + sigma_0^2) z, so what is measured is the sampler's own error, not the finite-sigma_max bias.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.guidance import CFGDenoiser
from ldm.diffusion.samplers import SAMPLERS, ddim_invert, get_sampler, get_sigmas, nfe, sample_ddim, sample_dpmpp_2m
from ldm.diffusion.schedule import NoiseSchedule

MU = torch.tensor([0.5, -1.0, 2.0])
STD = torch.tensor([0.5, 1.0, 1.5])
# (steps, spacing) per sampler: ~50 steps for first-order samplers, 15 for the second-order ones.
BUDGET = {
    "ddpm": (50, "karras"),
    "ddim": (50, "karras"),
    "euler": (50, "karras"),
    "euler_a": (50, "karras"),
    "heun": (15, "karras"),
    "dpmpp_2m": (15, "karras"),
    "dpmpp_2m_sde": (15, "karras"),
}
N_SAMPLES = 20_000
# Mean: Monte Carlo std. error is STD / sqrt(N) <= 0.011, so 0.05 is > 4 std. errors.
MEAN_TOL = 0.05
# Variance: relative error = discretisation (all these samplers lose variance at coarse steps; measured 5-15% at
# these budgets) + Monte Carlo sqrt(2 / N) = 1%.
VAR_TOL = {"ddpm": 0.2, "euler_a": 0.2, "ddim": 0.12, "euler": 0.12, "heun": 0.1, "dpmpp_2m": 0.1,
           "dpmpp_2m_sde": 0.2}


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.from_config("scaled_linear", 1000, 0.00085, 0.012)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x0 ~ N(MU, diag(STD^2)); x: [B, 3], sigma: [B]."""
    sig2 = sigma[:, None] ** 2
    return (STD**2 * x + sig2 * MU) / (STD**2 + sig2)


GMM_WEIGHTS, GMM_MEANS, GMM_STDS = torch.tensor([0.3, 0.7]), torch.tensor([-1.0, 1.5]), torch.tensor([0.3, 0.4])


def gmm_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for a 1-D two-component Gaussian mixture; x: [B, 1], sigma: [B]."""
    var = GMM_STDS**2 + sigma[:, None] ** 2  # [B, K]
    log_resp = GMM_WEIGHTS.log() - 0.5 * var.log() - 0.5 * (x - GMM_MEANS) ** 2 / var
    post_mean = (GMM_STDS**2 * x + sigma[:, None] ** 2 * GMM_MEANS) / var  # [B, K]
    return (log_resp.softmax(dim=-1) * post_mean).sum(dim=-1, keepdim=True)


def exact_network(analytic, sched: NoiseSchedule, parameterization: str):
    """The discrete-time network model(x_t, t) -> eps | v that the analytic VE denoiser implies."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = sched.t_to_sigma(t)  # [B]
        a = (1 + sigma**2).rsqrt()[:, None]  # sqrt(alpha_bar)
        x = x_t / a  # VE coordinates
        x0 = analytic(x, sigma)
        eps = (x - x0) / sigma[:, None]
        return eps if parameterization == "eps" else a * eps - sigma[:, None] * a * x0

    return model


def gaussian_start(sigma0: float, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(n, 3, generator=g)
    return MU + (STD**2 + sigma0**2).sqrt() * z, z


# ---- closed-form distributions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_gaussian_moments(sched, name, parameterization):
    steps, spacing = BUDGET[name]
    denoiser = DiscreteDenoiser(exact_network(gaussian_denoiser, sched, parameterization), sched, parameterization)
    sigmas = get_sigmas(sched, steps, spacing)
    g = torch.Generator().manual_seed(0)
    x, _ = gaussian_start(float(sigmas[0]), N_SAMPLES, g)
    out = get_sampler(name)(denoiser, x, sigmas, generator=g, progress=False)
    assert (out.mean(0) - MU).abs().max() < MEAN_TOL
    assert (out.var(0) / STD**2 - 1).abs().max() < VAR_TOL[name]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_gaussian_mixture(sched, name):
    steps, spacing = BUDGET[name]
    denoiser = DiscreteDenoiser(exact_network(gmm_denoiser, sched, "eps"), sched, "eps")
    sigmas = get_sigmas(sched, steps, spacing)
    g = torch.Generator().manual_seed(1)
    comp = torch.multinomial(GMM_WEIGHTS, N_SAMPLES, replacement=True, generator=g)
    noisy_std = (GMM_STDS[comp] ** 2 + float(sigmas[0]) ** 2).sqrt()
    x = (GMM_MEANS[comp] + noisy_std * torch.randn(N_SAMPLES, generator=g))[:, None]
    out = get_sampler(name)(denoiser, x, sigmas, generator=g, progress=False)[:, 0]
    mean = (GMM_WEIGHTS * GMM_MEANS).sum()
    var = (GMM_WEIGHTS * (GMM_STDS**2 + GMM_MEANS**2)).sum() - mean**2
    # Mode mass: the components barely overlap, so P(x < 0.25) = 0.3; std. error 0.0032, tolerance 0.025.
    assert abs(float((out < 0.25).float().mean()) - 0.3) < 0.025
    assert abs(float(out.mean() - mean)) < 0.06
    assert abs(float(out.var() / var) - 1) < 0.1


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("name, order", [("ddim", 1), ("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_ode_samplers_converge_to_the_exact_flow_map_at_their_order(sched, name, parameterization, order):
    denoiser = DiscreteDenoiser(exact_network(gaussian_denoiser, sched, parameterization), sched, parameterization)
    z = torch.randn(2000, 3, generator=torch.Generator().manual_seed(2))
    errors = []
    for steps in (20, 40):
        sigmas = get_sigmas(sched, steps, "karras")
        x = MU + (STD**2 + float(sigmas[0]) ** 2).sqrt() * z
        out = get_sampler(name)(denoiser, x, sigmas, progress=False)
        errors.append(float((out - (MU + STD * z)).abs().max()))
    # Halving the step size divides the error by 2^order (measured 2.0 and 4.6-4.8); 40 steps are already close.
    assert errors[0] / errors[1] > 0.8 * 2**order
    assert errors[1] < (0.3 if order == 1 else 0.03)


def test_ddim_and_ancestral_samplers_coincide_in_ve_coordinates(sched):
    """DDIM(eta=0) == Euler; DDIM(eta=1) == DDPM posterior == Euler-ancestral(eta=1), same seed -> same draws."""
    denoiser = DiscreteDenoiser(exact_network(gaussian_denoiser, sched, "v"), sched, "v")
    sigmas = get_sigmas(sched, 20, "leading")
    x, _ = gaussian_start(float(sigmas[0]), 500, torch.Generator().manual_seed(3))

    def run(name, **opts):
        g = torch.Generator().manual_seed(4)
        return get_sampler(name)(denoiser, x, sigmas, generator=g, progress=False, **opts)

    torch.testing.assert_close(run("ddim", eta=0.0), run("euler"), rtol=0, atol=1e-5)
    ddpm = run("ddpm")
    torch.testing.assert_close(run("ddim", eta=1.0), ddpm, rtol=0, atol=1e-5)
    torch.testing.assert_close(run("euler_a", eta=1.0), ddpm, rtol=0, atol=1e-5)
    assert (run("ddim", eta=0.5) - ddpm).abs().max() > 1e-2  # eta really changes the sampler


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m(sched, parameterization):
    """eta = 0 removes the SDE's noise and its extra decay: the step is DPM-Solver++(2M)'s, to rounding."""
    denoiser = DiscreteDenoiser(exact_network(gaussian_denoiser, sched, parameterization), sched, parameterization)
    sigmas = get_sigmas(sched, 12, "karras")
    x, _ = gaussian_start(float(sigmas[0]), 500, torch.Generator().manual_seed(3))
    ode = sample_dpmpp_2m(denoiser, x, sigmas, progress=False)
    sde = get_sampler("dpmpp_2m_sde")(denoiser, x, sigmas, eta=0.0, progress=False,
                                      generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sde, ode, rtol=0, atol=1e-5)
    noisy = get_sampler("dpmpp_2m_sde")(denoiser, x, sigmas, progress=False, generator=torch.Generator().manual_seed(4))
    assert (noisy - ode).abs().max() > 1e-2  # eta = 1 really is another sampler


# ---- determinism, inversion, diffusers parity ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_is_bit_identical(sched, name):
    denoiser = DiscreteDenoiser(exact_network(gaussian_denoiser, sched, "eps"), sched, "eps")
    sigmas = get_sigmas(sched, 8, "leading")
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(5)) * sigmas[0]

    def run(seed):
        return get_sampler(name)(denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed), progress=False)

    assert torch.equal(run(7), run(7))
    if name in ("ddpm", "euler_a", "dpmpp_2m_sde"):
        assert not torch.equal(run(7), run(8))


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_inversion_round_trip(sched, parameterization):
    denoiser = DiscreteDenoiser(exact_network(gaussian_denoiser, sched, parameterization), sched, parameterization)
    sigmas = get_sigmas(sched, 50, "leading")
    x0 = MU + STD * torch.randn(2000, 3, generator=torch.Generator().manual_seed(6))
    # Plain inversion (1 NFE per step, as diffusers): first-order error, measured mean |err| 0.12.
    x_T = ddim_invert(denoiser, x0, sigmas, progress=False)
    assert float((sample_ddim(denoiser, x_T, sigmas, progress=False) - x0).abs().mean()) < 0.2
    # Fixed-point inversion inverts every sampler step exactly: measured max |err| 3e-6 with 6 iterations.
    x_T = ddim_invert(denoiser, x0, sigmas, progress=False, fixed_point_iters=6)
    torch.testing.assert_close(sample_ddim(denoiser, x_T, sigmas, progress=False), x0, rtol=0, atol=1e-4)
    # and the inverted latents are distributed as the noisy marginal at sigmas[0] (std within 10%)
    z = (x_T - MU) / (STD**2 + float(sigmas[0]) ** 2).sqrt()
    assert (z.std(0) - 1).abs().max() < 0.1


def test_ddim_matches_diffusers_ddim_scheduler(sched):
    """Same exact eps network, same initial VP noise: every x0 prediction agrees with diffusers' DDIMScheduler."""
    steps = 50
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(steps)
    sigmas = get_sigmas(sched, steps, "leading")
    assert sched.sigma_to_t(sigmas[:-1], quantize=True).tolist() == scheduler.timesteps.tolist()

    model = exact_network(gaussian_denoiser, sched, "eps")
    noise = torch.randn(1000, 3, generator=torch.Generator().manual_seed(8))
    latents, theirs = noise.clone(), []
    for t in scheduler.timesteps:
        step = scheduler.step(model(latents, torch.full((1000,), int(t))), t, latents)
        latents = step.prev_sample
        theirs.append(step.pred_original_sample)

    ours = []
    x = noise / sched.sqrt_alphas_cumprod[int(scheduler.timesteps[0])]  # the same VP noise in VE coordinates
    denoiser = DiscreteDenoiser(model, sched, "eps")
    result = sample_ddim(denoiser, x, sigmas, callback=lambda d: ours.append(d["denoised"]), progress=False)
    # Our final output is the last x0 prediction; diffusers' last prev_sample is one step short of it (alpha_bar_0).
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-4)  # measured 9e-6
    torch.testing.assert_close(result, theirs[-1], rtol=0, atol=1e-4)


def test_dpmpp_2m_matches_diffusers_multistep_solver(sched):
    """Non-uniform steps in log-sigma exercise the step-ratio r of the 2M update (a smooth grid would hide it)."""
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
        final_sigmas_type="zero",
        timestep_spacing="linspace",
    )
    scheduler.set_timesteps(12)
    model = exact_network(gaussian_denoiser, sched, "eps")
    noise = torch.randn(500, 3, generator=torch.Generator().manual_seed(13))
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        latents = scheduler.step(model(latents, torch.full((500,), int(t))), t, latents).prev_sample

    sigmas = scheduler.sigmas.float()  # diffusers' VE sigmas for these timesteps, ending in 0
    x = noise * (1 + sigmas[0] ** 2).sqrt()  # the same VP noise in VE coordinates
    ours = sample_dpmpp_2m(DiscreteDenoiser(model, sched, "eps"), x, sigmas, progress=False)
    torch.testing.assert_close(ours, latents, rtol=0, atol=1e-4)  # measured 3e-6 (an inverted step ratio: 4e-2)


def test_dpmpp_2m_sde_matches_diffusers_sde_solver_with_the_same_noise(sched):
    """diffusers' ``sde-dpmsolver++`` (midpoint) draws one N(0, I) per step from the generator, as ours does; the
    VP noise term sigma_t * noise is sigma_t^VE * noise in VE coordinates, so the same seed gives the same path."""
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint", prediction_type="epsilon",
        final_sigmas_type="zero", timestep_spacing="linspace",
    )
    scheduler.set_timesteps(12)
    model = exact_network(gaussian_denoiser, sched, "eps")
    noise = torch.randn(500, 3, generator=torch.Generator().manual_seed(13))
    latents, g = noise * scheduler.init_noise_sigma, torch.Generator().manual_seed(14)
    for t in scheduler.timesteps:
        latents = scheduler.step(model(latents, torch.full((500,), int(t))), t, latents, generator=g).prev_sample

    sigmas = scheduler.sigmas.float()
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    ours = get_sampler("dpmpp_2m_sde")(DiscreteDenoiser(model, sched, "eps"), x, sigmas, progress=False,
                                       generator=torch.Generator().manual_seed(14))
    torch.testing.assert_close(ours, latents, rtol=0, atol=1e-4)


# ---- sigma schedules, registry, NFE --------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 999])
def test_sigma_spacings_match_diffusers_timesteps(sched, spacing, steps):
    sigmas = get_sigmas(sched, steps, spacing)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    if spacing == "linspace" and steps == 1:  # deliberate difference: diffusers would start from t = 0
        assert scheduler.timesteps.tolist() == [0] and float(sigmas[0]) == sched.sigma_max
        return
    torch.testing.assert_close(sigmas[:-1], sched.sigmas[scheduler.timesteps])


def test_trailing_and_karras_reach_sigma_max(sched):
    zsnr = NoiseSchedule.from_config(zero_terminal_snr=True)
    assert float(get_sigmas(zsnr, 10, "trailing")[0]) == zsnr.sigma_max
    karras = get_sigmas(sched, 10, "karras")
    assert float(karras[0]) == pytest.approx(sched.sigma_max) and float(karras[-2]) == pytest.approx(sched.sigma_min)
    with pytest.raises(ValueError, match="spacing='trailing'"):
        get_sigmas(sched, 1000, "leading")
    with pytest.raises(ValueError, match="Unknown sigma spacing"):
        get_sigmas(sched, 10, "uniform")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_nfe_counts_denoiser_calls(sched, name):
    calls = []
    inner = DiscreteDenoiser(exact_network(gaussian_denoiser, sched, "eps"), sched, "eps")

    def counting(x, sigma):
        calls.append(1)
        return inner(x, sigma)

    sigmas = get_sigmas(sched, 6, "leading")
    get_sampler(name)(counting, torch.randn(4, 3) * sigmas[0], sigmas, progress=False)
    assert len(calls) == nfe(name, 6) == (11 if name == "heun" else 6)


def test_registry_and_sigma_validation_errors(sched):
    with pytest.raises(ValueError, match="valid names: ddim, ddpm, dpmpp_2m, dpmpp_2m_sde, euler, euler_a, heun"):
        get_sampler("plms")
    denoiser = DiscreteDenoiser(exact_network(gaussian_denoiser, sched, "eps"), sched, "eps")
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="strictly decreasing and end in 0"):
        sample_ddim(denoiser, x, torch.tensor([1.0, 2.0, 0.0]), progress=False)
    with pytest.raises(ValueError, match="strictly decreasing and end in 0"):
        sample_ddim(denoiser, x, torch.tensor([2.0, 1.0]), progress=False)


# ---- denoiser wrapper ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_denoiser_wrapper_recovers_the_analytic_denoiser(sched, parameterization):
    def model(x_t, t):  # an exact network in any parameterisation, written through the schedule's own algebra
        x0 = exact_network(gaussian_denoiser, sched, "eps")
        eps = x0(x_t, t)
        clean = sched.to_x0(x_t, t, eps, "eps")
        return sched.target(clean, eps, t, parameterization)

    denoiser = DiscreteDenoiser(model, sched, parameterization)
    sigma = torch.tensor([0.05, 0.5, 1.0, 3.0, 14.0])
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(9)) * 4
    torch.testing.assert_close(denoiser(x, sigma), gaussian_denoiser(x, sigma), rtol=0, atol=2e-4)


def test_denoiser_quantize_and_no_clipping(sched):
    seen = []

    def model(x_t, t):
        seen.append(t)
        return torch.zeros_like(x_t)  # eps = 0 -> x0_hat = x

    x = torch.full((2, 3), 5.0)
    out = DiscreteDenoiser(model, sched, "eps", quantize=True)(x, torch.tensor([sched.sigmas[10] * 1.001, 0.5]))
    assert seen[-1].dtype == torch.long and int(seen[-1][0]) == 10
    assert torch.equal(out, x)  # latents outside [-1, 1] are not clipped by default
    clipped = DiscreteDenoiser(model, sched, "eps", clip_x0=1.0)(x, torch.tensor(0.5))
    assert float(clipped.max()) == 1.0


# ---- classifier-free guidance ----------------------------------------------------------------------------------------


class RecordingDenoiser:
    """D(x, sigma, context, concat) = x / (1 + sigma^2) + mean(context) + mean(concat); records batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, context, concat=None):
        self.calls.append({"batch": x.shape[0], "concat": concat})
        out = x / (1 + sigma[:, None, None, None] ** 2) + context.mean(dim=(1, 2))[:, None, None, None]
        if concat is not None:
            out = out + concat.mean(dim=1, keepdim=True)
        return out


def test_cfg_scale_one_is_exactly_the_conditional_denoiser():
    g = torch.Generator().manual_seed(10)
    x, sigma = torch.randn(2, 4, 3, 3, generator=g), torch.tensor([0.5, 2.0])
    cond, uncond = {"context": torch.randn(2, 77, 8, generator=g)}, {"context": torch.zeros(1, 77, 8)}
    inner = RecordingDenoiser()
    out = CFGDenoiser(inner, scale=1.0)(x, sigma, cond=cond, uncond=uncond)
    assert torch.equal(out, RecordingDenoiser()(x, sigma, **cond))
    assert [c["batch"] for c in inner.calls] == [2]  # no unconditional pass


def test_cfg_is_uncond_plus_scale_times_difference_in_one_batched_call():
    g = torch.Generator().manual_seed(11)
    x, sigma = torch.randn(2, 4, 3, 3, generator=g), torch.tensor([0.5, 2.0])
    context, negative = torch.randn(2, 77, 8, generator=g), torch.randn(1, 77, 8, generator=g)  # batch-1 broadcasts
    concat = torch.randn(2, 5, 3, 3, generator=g)
    inner = RecordingDenoiser()
    cfg = CFGDenoiser(inner, scale=7.5)
    out = cfg(x, sigma, cond={"context": context}, uncond={"context": negative}, concat=concat)
    c = RecordingDenoiser()(x, sigma, context, concat)
    u = RecordingDenoiser()(x, sigma, negative.expand(2, -1, -1), concat)
    torch.testing.assert_close(out, u + 7.5 * (c - u))
    assert [call["batch"] for call in inner.calls] == [4]  # [uncond, cond] in one call
    assert torch.equal(inner.calls[0]["concat"], torch.cat([concat, concat]))  # shared conditioning, same both halves


def test_cfg_rescale_and_errors():
    g = torch.Generator().manual_seed(12)
    x, sigma = torch.randn(2, 4, 3, 3, generator=g), torch.tensor([0.5, 2.0])
    cond, uncond = {"context": torch.randn(2, 77, 8, generator=g)}, {"context": torch.randn(2, 77, 8, generator=g)}
    inner = RecordingDenoiser()
    rescaled = CFGDenoiser(inner, scale=9.0, rescale=1.0)(x, sigma, cond=cond, uncond=uncond)
    c = inner(x, sigma, **cond)
    torch.testing.assert_close(rescaled.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))  # phi = 1: std of the cond branch
    with pytest.raises(ValueError, match="needs an `uncond` context"):
        CFGDenoiser(inner, scale=3.0)(x, sigma, cond=cond)
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(inner, scale=3.0)(x, sigma, cond=cond, uncond={"ctx": uncond["context"]})
    with pytest.raises(ValueError, match="expected batch 1 or 2"):
        CFGDenoiser(inner, scale=3.0)(x, sigma, cond=cond, uncond={"context": torch.zeros(3, 77, 8)})
