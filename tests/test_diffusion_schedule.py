"""Noise schedules, forward process, targets / conversions, and the loss helpers (ldm.diffusion.schedule / loss)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from ldm.diffusion.loss import diffusion_loss, loss_weights, sample_timesteps
from ldm.diffusion.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr, sample_noise

PARAMS = ("eps", "v", "x0")


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.from_config("scaled_linear", 1000, 0.00085, 0.012)


# ---- betas ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, diffusers_kind, start, end",
    [
        ("scaled_linear", "scaled_linear", 0.00085, 0.012),
        ("linear", "linear", 0.0001, 0.02),
        ("cosine", "squaredcos_cap_v2", 0.0001, 0.02),
    ],
)
def test_betas_match_diffusers(kind, diffusers_kind, start, end):
    ours = make_betas(kind, 1000, start, end)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=diffusers_kind).betas
    assert ours.shape == (1000,) and ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), ref, rtol=1e-5, atol=1e-8)


def test_zero_terminal_snr_matches_diffusers_and_keeps_first_alpha():
    betas = make_betas("scaled_linear")
    ours = rescale_zero_terminal_snr(betas)
    ref = diffusers_rescale(betas)  # in float64, as ours: float32 rounding near beta -> 1 differs by diffusers version
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ac, ac_old = torch.cumprod(1 - ours, 0), torch.cumprod(1 - betas, 0)
    assert abs(float(ac[-1])) < 1e-12
    assert float(ac[0]) == pytest.approx(float(ac_old[0]), rel=1e-12)

    zsnr = NoiseSchedule(ours)
    assert float(zsnr.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-7)
    assert float(zsnr.snr(torch.tensor([999]))) == pytest.approx(0.0, abs=1e-7)
    # the sigma view stays finite (alpha_bar floored at 2**-24 => sigma_max ~ 4096)
    assert torch.isfinite(zsnr.sigmas).all() and zsnr.sigma_max == pytest.approx(4096.0, rel=1e-3)


def test_bad_schedule_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown beta schedule"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        make_betas("linear", 1000, 0.02, 0.001)
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule(torch.tensor([0.1, 0.0, 0.2]))


def test_buffers_are_derived_not_saved(sched):
    assert sched.state_dict() == {}
    assert {n for n, _ in sched.named_buffers()} == {
        "betas",
        "alphas_cumprod",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sigmas",
        "log_sigmas",
    }
    ac = sched.alphas_cumprod.double()  # float32 buffer: 1 - ac near t = 0 keeps ~5 significant digits
    torch.testing.assert_close(sched.sigmas.double(), ((1 - ac) / ac).sqrt(), rtol=5e-5, atol=0)


# ---- forward process, targets, conversions ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (6, 3)])
@pytest.mark.parametrize("parameterization", PARAMS)
def test_target_and_conversions_round_trip(sched, shape, parameterization):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([0, 1, 250, 500, 900, 998])
    x_t = sched.q_sample(x0, t, noise)
    out = sched.target(x0, noise, t, parameterization)
    torch.testing.assert_close(sched.to_x0(x_t, t, out, parameterization), x0, rtol=0, atol=2e-4)
    torch.testing.assert_close(sched.to_eps(x_t, t, out, parameterization), noise, rtol=0, atol=2e-4)


def test_q_sample_is_ho_eq4_and_float_t_agrees(sched):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod[t]
    expected = ac.sqrt()[:, None, None, None] * x0 + (1 - ac).sqrt()[:, None, None, None] * noise
    torch.testing.assert_close(sched.q_sample(x0, t, noise), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sched.q_sample(x0, t.float(), noise), expected, rtol=1e-5, atol=1e-5)


def test_v_target_matches_diffusers_get_velocity(sched):
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(5, 4, 6, 6, generator=g), torch.randn(5, 4, 6, 6, generator=g)
    t = torch.tensor([0, 3, 400, 777, 999])
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).get_velocity(x0, noise, t)
    torch.testing.assert_close(sched.target(x0, noise, t, "v"), ref, rtol=1e-5, atol=1e-6)


def test_sigma_time_maps_are_inverse(sched):
    t_int = torch.arange(1000)
    torch.testing.assert_close(sched.t_to_sigma(t_int), sched.sigmas)
    torch.testing.assert_close(sched.sigma_to_t(sched.sigmas), t_int.float(), rtol=0, atol=2e-3)
    t_cont = torch.tensor([0.0, 0.25, 17.5, 400.9, 998.999])
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t_cont)), t_cont, rtol=0, atol=2e-3)
    # quantize picks the nearest training step in log-sigma and returns integers
    t_q = sched.sigma_to_t(sched.t_to_sigma(torch.tensor([10.2, 10.8, 500.4])), quantize=True)
    assert t_q.dtype == torch.long and t_q.tolist() == [10, 11, 500]


def test_snr_is_one_over_sigma_squared(sched):
    t = torch.tensor([0, 100, 999])
    torch.testing.assert_close(sched.snr(t), sched.sigmas[t] ** -2, rtol=1e-5, atol=0)


def test_out_of_range_timesteps_and_bad_parameterization_raise(sched):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"Timesteps must lie in \[0, 999\]"):
        sched.q_sample(x, torch.tensor([0, 1000]), x)
    with pytest.raises(ValueError, match=r"Timesteps must lie in"):
        sched.t_to_sigma(torch.tensor([-0.5]))
    with pytest.raises(ValueError, match="Unknown parameterization"):
        sched.target(x, x, torch.tensor([1, 2]), "epsilon")


# ---- noise ----------------------------------------------------------------------------------------------------------


def test_sample_noise_is_seeded_and_offset_moves_channel_means():
    shape = (256, 4, 8, 8)
    a = sample_noise(shape, 0.1, generator=torch.Generator().manual_seed(0))
    b = sample_noise(shape, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    plain = sample_noise(shape, 0.0, generator=torch.Generator().manual_seed(0))
    # Var of a per-(B, C) spatial mean: 1/HW without offset, 1/HW + offset^2 with it (15% ~ 3.4 std. errors).
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 64, rel=0.15)
    assert a.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 64 + 0.01, rel=0.15)
    with pytest.raises(ValueError, match=r"\[B, C, \.\.\.\]"):
        sample_noise((8,), 0.1)


# ---- loss helpers ---------------------------------------------------------------------------------------------------


def test_min_snr_weights_known_values():
    # betas 0.5, 0.5 -> alpha_bar = 0.5, 0.25 -> SNR = 1, 1/3; gamma = 0.5 clips the first step only.
    sched = NoiseSchedule(torch.tensor([0.5, 0.5]))
    t = torch.tensor([0, 1])
    expected = {"x0": [0.5, 1 / 3], "eps": [0.5, 1.0], "v": [0.25, 0.25]}
    for parameterization, values in expected.items():
        w = loss_weights(sched, t, parameterization, "min_snr", gamma=0.5)
        torch.testing.assert_close(w, torch.tensor(values), rtol=1e-6, atol=0)
        assert torch.equal(loss_weights(sched, t, parameterization), torch.ones(2))


def test_min_snr_weights_on_sd_schedule_and_zero_terminal_snr(sched):
    t = torch.tensor([10, 900])  # SNR(10) ~ 1e2 > gamma, SNR(900) ~ 6e-3 < gamma
    snr = sched.snr(t).double()
    assert snr[0] > 5 > snr[1]
    eps_expected = torch.stack([5 / snr[0], snr.new_tensor(1.0)]).float()
    v_expected = torch.stack([5 / (snr[0] + 1), snr[1] / (snr[1] + 1)]).float()
    torch.testing.assert_close(loss_weights(sched, t, "eps", "min_snr"), eps_expected)
    torch.testing.assert_close(loss_weights(sched, t, "v", "min_snr"), v_expected)
    zsnr = NoiseSchedule.from_config(zero_terminal_snr=True)
    last = torch.tensor([999])
    assert loss_weights(zsnr, last, "eps", "min_snr").item() == 1.0  # limit SNR -> 0, not NaN
    assert loss_weights(zsnr, last, "v", "min_snr").item() == 0.0
    with pytest.raises(ValueError, match="Unknown loss weighting"):
        loss_weights(sched, t, "eps", "p2")


def test_diffusion_loss_is_weighted_per_sample_mse():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    w = torch.tensor([1.0, 0.0, 3.0])
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(diffusion_loss(pred, target, w), (w * per_sample).mean())
    torch.testing.assert_close(diffusion_loss(pred, target), F.mse_loss(pred, target))
    assert diffusion_loss(target, target, w).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        diffusion_loss(pred, target[:2])
    with pytest.raises(ValueError, match="weights must be"):
        diffusion_loss(pred, target, w[:2])


def test_sample_timesteps_range_and_seed():
    t = sample_timesteps(4000, 1000, t_min=200, t_max=210, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and set(t.tolist()) == set(range(200, 210))
    again = sample_timesteps(4000, 1000, t_min=200, t_max=210, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    full = sample_timesteps(20000, 1000, generator=torch.Generator().manual_seed(1))
    assert full.min().item() == 0 and full.max().item() == 999
    with pytest.raises(ValueError, match="t_min < t_max"):
        sample_timesteps(4, 1000, t_min=10, t_max=10)
