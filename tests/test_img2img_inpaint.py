"""img2img (strength) and inpainting (latent blending, paste, inpainting U-Net) on a tiny random model.

The ends of the strength range are exact identities (round trip, text-to-image); truncated sigma lists are checked
against diffusers' img2img timesteps and, for every sampler, against the closed-form Gaussian flow of
tests/test_samplers.py; inpainting is checked with an oracle U-Net whose x0-prediction is known in closed form.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.samplers import SAMPLERS, get_sampler, get_sigmas
from ldm.diffusion.schedule import NoiseSchedule
from ldm.inpaint import latent_mask
from ldm.models.diffusion import LatentDiffusion
from ldm.pipeline import SamplingConfig, text_to_image
from ldm.pipeline_img2img import image_to_image, img2img_sigmas, strength_steps
from ldm.utils.image_inputs import image_request
from ldm.utils.sampling_io import file_hash
from tests.script_loader import load_script
from tests.test_latent_diffusion import DDCONFIG, UNET
from tests.test_samplers import BUDGET, MEAN_TOL, MU, STD, VAR_TOL, exact_network, gaussian_denoiser
from tests.weights import randomize_

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def build_model(concat_channels: int = 0) -> LatentDiffusion:
    """16 px images, f=2 autoencoder (8x8x4 latents), random U-Net, a non-trivial per-channel latent normalisation."""
    torch.manual_seed(0)
    unet = {**UNET, "in_channels": 4 + concat_channels}
    model = LatentDiffusion(unet_config=unet, cond_stage_config={"arch": "ldm-tiny-clip"},
                            first_stage_config={"ddconfig": DDCONFIG, "embed_dim": 4}, ema_decay=None,
                            latent_norm="none", concat_channels=concat_channels)
    randomize_(model.unet)
    model.latent_shift.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    model.latent_scale.copy_(torch.tensor([1.5, 0.7, 1.2, 1.0]))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> LatentDiffusion:
    return build_model()


@pytest.fixture(scope="module")
def init() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [3, 3, 16, 16] in [-1, 1]


@pytest.fixture(scope="module")
def mask() -> torch.Tensor:
    """An asymmetric repaint rectangle (rows 3-10, columns 2-7); [1, 1, 16, 16], broadcast over the batch."""
    m = torch.zeros(1, 1, 16, 16)
    m[..., 3:11, 2:8] = 1
    return m


def config(**overrides) -> SamplingConfig:
    return SamplingConfig(**{"sampler": "dpmpp_2m", "steps": 6, "cfg_scale": 3.0, "batch_size": 2,
                             "progress": False, **overrides})


def round_trip(model, images: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)) with the posterior mode, in [0, 1]."""
    return ((model.decode_latents(model.encode_images(images, sample=False)) + 1) / 2).clamp(0, 1)


def forbid_sampling(model, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the U-Net must not run here")

    monkeypatch.setattr(model, "sampling_unet", fail)


def oracle_unet(model, target: torch.Tensor):
    """An eps-network whose denoiser returns ``target`` [B, C, h, w] at every sigma (and for both CFG halves)."""
    schedule = model.schedule

    def unet(x_in, t, **kwargs):
        sigma = schedule.t_to_sigma(t)[:, None, None, None]  # [B', 1, 1, 1]
        x = x_in * (1 + sigma**2).sqrt()  # VE coordinates
        return (x - target.repeat(x.shape[0] // target.shape[0], 1, 1, 1)) / sigma

    return unet


# ---- strength: the two exact ends and the middle --------------------------------------------------------------------


def test_strength_zero_is_the_autoencoder_round_trip_without_sampling(model, init, monkeypatch):
    expected = round_trip(model, init[:2])
    forbid_sampling(model, monkeypatch)
    assert torch.equal(image_to_image(model, PROMPTS[:2], init[:2], config(), strength=0.0), expected)
    # fewer than half a step rounds to no step at all
    assert torch.equal(image_to_image(model, PROMPTS[:2], init[:2], config(steps=10), strength=0.04), expected)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_strength_one_is_text_to_image_with_the_same_seed(model, init, name):
    cfg = config(sampler=name, seed=5, steps=4)  # batch_size 2 over 3 prompts: the seeds survive batching
    expected = text_to_image(model, PROMPTS, cfg)
    assert torch.equal(image_to_image(model, PROMPTS, init, cfg, strength=1.0), expected)


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_a"])
def test_intermediate_strength_stays_closer_to_the_init_than_text_to_image(model, init, name):
    cfg = config(sampler=name, steps=10)
    reference = round_trip(model, init)
    txt2img = text_to_image(model, PROMPTS, cfg)
    low, mid = (image_to_image(model, PROMPTS, init, cfg, strength=s) for s in (0.3, 0.6))
    distance = {key: float((image - reference).abs().mean()) for key, image in
                (("low", low), ("mid", mid), ("txt2img", txt2img))}
    # Less noise keeps more of the init: measured 0.10 < 0.16 < 0.18 (mean |difference| in [0, 1] units).
    assert distance["low"] < distance["mid"] < distance["txt2img"]
    assert distance["low"] > 1e-3  # it did change
    assert not torch.allclose(mid, txt2img, atol=1e-3)


def test_strength_validation(model, init):
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        image_to_image(model, PROMPTS[:1], init[:1], config(), strength=1.5)
    assert [strength_steps(100, s) for s in (0.29, 0.005, 0.0049)] == [29, 1, 0]  # round, not int(28.999...)


# ---- truncated sigma lists ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.2, 0.5, 0.74, 1.0])
def test_truncated_sigmas_are_diffusers_img2img_timesteps(strength):
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps: timesteps[steps - int(steps * strength):]."""
    sched = NoiseSchedule.from_config("scaled_linear", 1000, 0.00085, 0.012)
    steps = 50
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    theirs = scheduler.timesteps[steps - int(steps * strength):]
    sigmas = img2img_sigmas(get_sigmas(sched, steps, "leading"), strength)
    assert sigmas[-1] == 0 and sigmas.numel() == len(theirs) + 1
    assert sched.sigma_to_t(sigmas[:-1], quantize=True).tolist() == theirs.tolist()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_denoises_from_a_truncated_karras_schedule(name):
    """Data x0 ~ N(MU, STD^2) noised to sigma_k = sigmas[steps - k] and sampled down the truncated Karras list must
    come back with the data's moments; the ODE samplers must follow the exact flow map
    MU + (x - MU) STD / sqrt(STD^2 + sigma_k^2)."""
    sched = NoiseSchedule.from_config("scaled_linear", 1000, 0.00085, 0.012)
    steps, spacing = BUDGET[name]
    sigmas = img2img_sigmas(get_sigmas(sched, steps, spacing), 0.5)
    assert sigmas.numel() - 1 == {50: 25, 15: 8}[steps]  # half the steps, 7.5 rounded up
    denoiser = DiscreteDenoiser(exact_network(gaussian_denoiser, sched, "eps"), sched, "eps")
    g = torch.Generator().manual_seed(0)
    x0 = MU + STD * torch.randn(20_000, 3, generator=g)
    x = x0 + float(sigmas[0]) * torch.randn(20_000, 3, generator=g)
    out = get_sampler(name)(denoiser, x, sigmas, generator=g, progress=False)
    assert (out.mean(0) - MU).abs().max() < MEAN_TOL
    assert (out.var(0) / STD**2 - 1).abs().max() < VAR_TOL[name]
    if name in ("ddim", "euler", "heun", "dpmpp_2m"):
        flow = MU + (x - MU) * STD / (STD**2 + float(sigmas[0]) ** 2).sqrt()
        # max |error| over 20,000 samples, measured: 0.084 first order (25 steps), 0.035-0.041 second order (8 steps)
        assert float((out - flow).abs().max()) < (0.15 if name in ("ddim", "euler") else 0.08)


# ---- inpainting -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_with_paste_keeps_unmasked_pixels_exactly(model, init, mask, strength):
    out = image_to_image(model, PROMPTS, init, config(), strength=strength, mask=mask)
    keep = (mask == 0).expand(3, 3, -1, -1)
    assert torch.equal(out[keep], ((init + 1) / 2)[keep])
    assert float((out - round_trip(model, init))[~keep].abs().mean()) > 1e-2  # the masked part is repainted


def test_paste_dilation_keeps_generated_pixels_next_to_the_mask(model, init, mask):
    cfg = config(steps=3)
    generated = image_to_image(model, PROMPTS[:2], init[:2], cfg, strength=1.0, mask=mask, paste=False)
    dilated = image_to_image(model, PROMPTS[:2], init[:2], cfg, strength=1.0, mask=mask, paste_dilation=1)
    grown = torch.zeros_like(mask)
    grown[..., 2:12, 1:9] = 1  # the mask grown by one pixel
    grown = grown.bool().expand(2, 3, -1, -1)
    assert torch.equal(dilated[~grown], ((init[:2] + 1) / 2)[~grown])
    assert torch.equal(dilated[grown], generated[grown])  # the ring around the mask is generated, not pasted
    with pytest.raises(ValueError, match="paste_dilation must be >= 0"):
        image_to_image(model, PROMPTS[:1], init[:1], cfg, mask=mask, paste_dilation=-1)


def test_inpainting_without_paste_keeps_the_known_latents(model, init, mask, monkeypatch):
    """With an oracle U-Net steering the repaint region to the latents of other images, the result is in closed form:
    decode(where(latent_mask, target, z0)); the kept latents are bit-exact. Kept *pixels* then differ from the
    autoencoder round trip decode(encode(x)) only through the decoder's reach (its GroupNorm statistics and mid-block
    attention span the whole image), which must stay within the round trip's own error: mean |out - round trip| on
    kept pixels < mean |round trip - x| (measured 0.073 vs 0.27 with this random decoder)."""
    z0 = model.encode_images(init, sample=False)  # [3, 4, 8, 8]
    other = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    target = model.encode_images(other, sample=False)
    monkeypatch.setattr(model, "sampling_unet", lambda use_ema=True: oracle_unet(model, target))
    decoded = []
    real_decode = model.decode_latents
    monkeypatch.setattr(model, "decode_latents", lambda z: decoded.append(z) or real_decode(z))
    out = image_to_image(model, PROMPTS, init, config(batch_size=3), strength=1.0, mask=mask, paste=False)

    repaint = latent_mask(mask, 2).expand(3, 4, -1, -1).bool()  # [3, 4, 8, 8]: any repainted pixel in the 2x2 cell
    assert torch.equal(decoded[0][~repaint], z0[~repaint])
    torch.testing.assert_close(decoded[0][repaint], target[repaint], rtol=0, atol=1e-3)
    expected = ((real_decode(torch.where(repaint, target, z0)) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-3)

    keep = (mask == 0).expand(3, 3, -1, -1)
    reference = round_trip(model, init)
    round_trip_error = float((reference - (init + 1) / 2).abs().mean())
    assert float((out - reference)[keep].abs().mean()) < round_trip_error


def test_all_zero_mask_returns_the_round_trip(model, init, monkeypatch):
    empty = torch.zeros(3, 1, 16, 16)
    expected = round_trip(model, init)
    forbid_sampling(model, monkeypatch)
    cfg = config(batch_size=3)  # the round trip above ran on all 3 images at once (CPU convs vary with batch size)
    assert torch.equal(image_to_image(model, PROMPTS, init, cfg, strength=1.0, mask=empty, paste=False), expected)
    assert torch.equal(image_to_image(model, PROMPTS, init, cfg, strength=1.0, mask=empty), (init + 1) / 2)


def test_bad_inputs_name_the_problem(model, init, mask):
    run = lambda **kw: image_to_image(model, PROMPTS, **{"init_images": init, "config": config(), **kw})  # noqa: E731
    with pytest.raises(ValueError, match=r"mask must be a \[B, 1, H, W\] tensor"):
        run(mask=mask[0, 0])
    with pytest.raises(ValueError, match=r"expected \[3 or 1, 1, 16, 16\]; resize the mask"):
        run(mask=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="0 \\(keep\\) or 1 \\(repaint\\)"):
        run(mask=mask * 0.5)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*x \* 2 - 1"):
        run(init_images=(init + 1) * 127.5)
    with pytest.raises(ValueError, match="2 init images for 3 prompts"):
        run(init_images=init[:2])
    with pytest.raises(ValueError, match="config.height=32 but the init images have height 16"):
        run(config=config(height=32))
    with pytest.raises(ValueError, match="width=15 is not divisible by the autoencoder's factor 2"):
        run(init_images=init[..., :15])


def test_inpainting_unet_gets_mask_and_masked_image_channels(init, mask, monkeypatch):
    """concat_channels = C + 1: the U-Net input is [latents, mask, masked-image latents] (SD-inpainting layout)."""
    model = build_model(concat_channels=5)
    seen = []
    real_unet = model.unet

    def spy(x, t, concat=None, **kwargs):
        seen.append(concat)
        return real_unet(x, t, concat=concat, **kwargs)

    monkeypatch.setattr(model, "sampling_unet", lambda use_ema=True: spy)
    out = image_to_image(model, PROMPTS[:2], init[:2], config(steps=3), strength=1.0, mask=mask)
    concat = seen[0]  # [2B, 5, 8, 8]: [uncond, cond] halves
    assert len(seen) == 3 and concat.shape == (4, 5, 8, 8) and torch.equal(concat[:2], concat[2:])
    assert torch.equal(concat[:2, :1], torch.nn.functional.interpolate(mask, size=(8, 8)).expand(2, -1, -1, -1))
    masked = model.encode_images(init[:2] * (1 - mask), sample=False)
    torch.testing.assert_close(concat[:2, 1:], masked)
    keep = (mask == 0).expand(2, 3, -1, -1)
    assert torch.equal(out[keep], ((init[:2] + 1) / 2)[keep])
    with pytest.raises(ValueError, match="inpainting model .* pass a mask"):
        image_to_image(model, PROMPTS[:2], init[:2], config(), strength=0.5)


# ---- scripts/sample.py ----------------------------------------------------------------------------------------------


def compose_sample(overrides: list[str], out: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(config_name="sample", overrides=[*overrides, f"out={out}", "device=cpu"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)  # as @hydra.main does: ${hydra:...} interpolations resolve
    return cfg


@pytest.fixture(scope="module")
def sample_files(model, tmp_path_factory) -> dict:
    """A self-contained checkpoint of the tiny model, a 20 px init PNG and a mask PNG (resized to 16 px on load)."""
    root = tmp_path_factory.mktemp("sample")
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, root / "tiny.ckpt")
    rgb = (np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "init.png")
    white = np.zeros((20, 20), np.uint8)
    white[5:15, 0:10] = 255  # repaint the left-middle block
    Image.fromarray(white).save(root / "mask.png")
    Image.fromarray(white[:10]).save(root / "small_mask.png")
    (root / "notes.png").write_text("not an image")
    return {"dir": root, "ckpt": root / "tiny.ckpt", "init": root / "init.png", "mask": root / "mask.png"}


def test_sample_script_inpaints_and_records_the_inputs(sample_files, tmp_path):
    script = load_script("sample")
    f = sample_files
    cfg = compose_sample([f"ckpt={f['ckpt']}", "prompt=a red circle", "n=2", "steps=3", "cfg_scale=2",
                          f"init_image={f['init']}", f"mask={f['mask']}", "strength=0.6"], tmp_path)
    script.main(cfg)
    pngs = sorted(tmp_path.glob("0000*.png"))
    assert len(pngs) == 2 and (tmp_path / "grid.png").exists()
    meta = json.loads(Image.open(pngs[0]).text["parameters"])
    assert meta["init_image"] == "init.png" and meta["mask"] == "mask.png" and meta["strength"] == 0.6
    assert meta["paste"] is True and len(meta["init_image_sha256"]) == 10
    # kept pixels are the init image resized to the training resolution (16 px), byte for byte
    init16 = np.asarray(Image.open(f["init"]).convert("RGB").resize((16, 16), Image.BICUBIC))
    keep = np.asarray(Image.open(f["mask"]).resize((16, 16), Image.NEAREST)) < 128
    for png in pngs:
        result = np.asarray(Image.open(png).convert("RGB"))
        assert result.shape == (16, 16, 3) and np.array_equal(result[keep], init16[keep])
        assert not np.array_equal(result[~keep], init16[~keep])


def test_sample_script_img2img_and_bad_files(sample_files, tmp_path):
    script = load_script("sample")
    f = sample_files
    base = [f"ckpt={f['ckpt']}", "prompt=a red circle", "n=1", "steps=2"]
    script.main(compose_sample([*base, f"init_image={f['init']}", "strength=0.5"], tmp_path / "ok"))
    meta = json.loads(Image.open(tmp_path / "ok" / "00000-seed0.png").text["parameters"])
    assert meta["strength"] == 0.5 and "mask" not in meta
    with pytest.raises(ValueError, match="notes.png is not a readable image"):
        script.main(compose_sample([*base, f"init_image={f['dir'] / 'notes.png'}"], tmp_path / "bad"))

    def request(*overrides):  # the same option parsing, without loading the checkpoint each time
        return image_request(compose_sample([*base, *overrides], tmp_path / "bad"), 16, 16, file_hash)

    with pytest.raises(FileNotFoundError, match="init_image=.*missing.png does not exist"):
        request(f"init_image={f['dir'] / 'missing.png'}")
    with pytest.raises(ValueError, match="is 20x10 px but init_image=.* is 20x20 px"):
        request(f"init_image={f['init']}", f"mask={f['dir'] / 'small_mask.png'}")
    with pytest.raises(ValueError, match="mask=.* needs an init_image=PATH"):
        request(f"mask={f['mask']}")
    assert request(f"init_image={f['init']}", f"mask={f['mask']}").kwargs["strength"] == 1.0  # inpainting default
    assert request(f"init_image={f['init']}").kwargs["init_images"].shape == (1, 3, 16, 16)


def test_bf16_weights_sample_close_to_fp32(model, init):
    """sample.py precision=bf16 casts the model to bfloat16: text-to-image and img2img run (fp32 sampler state,
    bf16 network calls) and land near the fp32 images."""
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    prompts = ["a red circle", "a blue square"]
    for run in (lambda m: text_to_image(m, prompts, config(steps=4)),
                lambda m: image_to_image(m, prompts, init[:2], config=config(steps=4), strength=0.5)):
        full, low = run(model), run(half)
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        assert (full - low).abs().mean() < 0.05


def test_image_to_image_is_exposed_by_the_pipeline_module():
    from ldm import pipeline
    from ldm.pipeline import image_to_image
    from ldm.pipeline_img2img import image_to_image as defined

    assert image_to_image is defined
    with pytest.raises(AttributeError, match="no attribute 'inpaint_everything'"):
        pipeline.inpaint_everything
