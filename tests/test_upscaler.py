"""Diffusion upscaler: exact degradation, noise augmentation, learning one batch better than bicubic, checkpoints,
the sample.py chain (text-to-image -> upscale) and scripts/upscale.py, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.data.synthetic import ShapesSource
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.upscaler import Upscaler, load_upscaler, psnr_per_image
from ldm.modules.unet import timestep_embedding
from ldm.upscale import NOISE_AUG_SCHEDULE, area_downsample, bicubic_upsample, noise_augment, upscale
from tests.script_loader import load_script
from tests.weights import randomize_

# 16 px high-res images, U-Net downsampling 2: the smallest upscaler that still has every part
UNET = dict(image_size=16, in_channels=6, out_channels=3, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[], num_head_channels=16, use_scale_shift_norm=True, num_classes="sequential",
            adm_in_channels=16)


def tiny_upscaler(scale: int = 2, **kwargs) -> Upscaler:
    torch.manual_seed(0)
    options = dict(unet_config=UNET, scale=scale, max_noise_level=20, ema_decay=None,
                   schedule=dict(kind="scaled_linear", beta_start=1e-4, beta_end=0.02))
    return Upscaler(**{**options, **kwargs})


def shapes(n: int, resolution: int = 16) -> torch.Tensor:
    """n procedural shapes images, [n, 3, R, R] in [-1, 1]."""
    source = ShapesSource(num_samples=n, resolution=resolution, split="train", seed=0)
    arrays = [np.asarray(source[i]["image"].convert("RGB"), dtype=np.float32) for i in range(n)]
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1).permute(0, 3, 1, 2).contiguous()


# ---- degradation and conditioning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2, 4])
def test_degradation_is_the_exact_area_downsampling(scale):
    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    low = area_downsample(x, scale)
    block_means = x.reshape(2, 3, 8 // scale, scale, 12 // scale, scale).mean(dim=(3, 5))
    assert low.shape == (2, 3, 8 // scale, 12 // scale)
    torch.testing.assert_close(low, block_means, rtol=0, atol=1e-6)
    torch.testing.assert_close(low, F.interpolate(x, scale_factor=1 / scale, mode="area"), rtol=0, atol=1e-6)


def test_training_degrades_by_area_downsampling(monkeypatch):
    """The U-Net's concat input is the bicubic of the noise-augmented *area*-downsampled batch."""
    model = tiny_upscaler(max_noise_level=0)
    x = shapes(2)
    seen = {}

    def spy(low, levels, schedule, generator=None):
        seen["low"], seen["levels"] = low, levels
        return low

    monkeypatch.setattr("ldm.models.upscaler.noise_augment", spy)
    model.diffusion_step(x)
    torch.testing.assert_close(seen["low"], area_downsample(x, 2), rtol=0, atol=0)
    assert seen["levels"].tolist() == [0, 0]


def test_noise_augmentation_is_the_forward_process_at_each_level():
    """For a constant image c: mean sqrt(ac_l) c and std sqrt(1 - ac_l) per sample (Ho et al. eq. 4)."""
    schedule = NoiseSchedule.from_config(**NOISE_AUG_SCHEDULE)
    levels = torch.tensor([0, 50, 350])
    low = torch.full((3, 3, 64, 64), 0.5)
    out = noise_augment(low, levels, schedule, torch.Generator().manual_seed(0))
    alpha_bar = schedule.alpha_bar(levels)
    n = low[0].numel()
    for i in range(3):
        expected_std = float((1 - alpha_bar[i]).sqrt())
        assert abs(float(out[i].mean()) - 0.5 * float(alpha_bar[i].sqrt())) < 5 * expected_std / n**0.5
        assert abs(float(out[i].std()) / expected_std - 1) < 5 / (2 * n) ** 0.5
    assert float((1 - alpha_bar[2]).sqrt()) > 10 * float((1 - alpha_bar[0]).sqrt())  # levels really differ


def test_condition_shapes_and_the_noise_level_inputs():
    low = torch.rand(3, 3, 8, 8) * 2 - 1
    levels = torch.tensor([0, 7, 20])
    concat, y, base = tiny_upscaler().condition(low, levels, torch.Generator().manual_seed(0))
    assert concat.shape == base.shape == (3, 3, 16, 16)
    torch.testing.assert_close(base, bicubic_upsample(low, 2), rtol=0, atol=0)  # the residual's base is clean
    torch.testing.assert_close(y, timestep_embedding(levels, 16), rtol=0, atol=0)  # sinusoidal level features
    assert not torch.allclose(concat, base)  # the U-Net sees the noised input
    table = tiny_upscaler(unet_config={**UNET, "num_classes": 21, "adm_in_channels": None})  # SD style embedding
    _, y, _ = table.condition(low, levels)
    assert y.dtype == torch.long and y.tolist() == [0, 7, 20]
    table.unet(torch.zeros(3, 3, 16, 16), torch.tensor([1, 2, 3]), y=y, concat=concat)  # runs


def test_training_crops_start_on_the_low_res_grid():
    model = tiny_upscaler(scale=4, train_crop=8, unet_config={**UNET})
    rows = torch.arange(32.0).view(1, 1, 32, 1).expand(64, 3, 32, 32)  # pixel value = its row index
    crops = model.random_crop(rows)
    assert crops.shape == (64, 3, 8, 8)
    tops = crops[:, 0, 0, 0]
    assert bool((tops % 4 == 0).all()) and len(set(tops.tolist())) > 1
    torch.testing.assert_close(crops[:, 0, :, 0] - tops[:, None], torch.arange(8.0).expand(64, 8))


# ---- learning --------------------------------------------------------------------------------------------------------


def test_overfits_one_batch_and_beats_bicubic():
    torch.manual_seed(0)
    model = tiny_upscaler(target_scale=10.0)
    images = shapes(4)  # [4, 3, 16, 16]
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=3e-3)

    def held_out_loss() -> float:  # the same timesteps and noise before and after training
        with torch.no_grad():
            return float(model.diffusion_step(images.repeat(4, 1, 1, 1), generator=torch.Generator().manual_seed(-1)))

    before = held_out_loss()
    for step in range(60):
        loss = model.diffusion_step(images, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out_loss() < 0.7 * before
    low = area_downsample(images, 2)
    ours = upscale(model.eval(), low, steps=10, generator=torch.Generator().manual_seed(0))
    psnr = float(psnr_per_image(ours, images).mean())
    psnr_bicubic = float(psnr_per_image(bicubic_upsample(low, 2), images).mean())
    assert psnr > psnr_bicubic + 1.0, (psnr, psnr_bicubic)


# ---- checkpoints, sample.py chain, scripts/upscale.py ----------------------------------------------------------------


def save_checkpoint(model, path: Path) -> Path:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """A random tiny x2 upscaler with EMA, and a random tiny 16 px text-to-image model, as checkpoint files."""
    from tests.test_latent_diffusion import tiny_model

    root = tmp_path_factory.mktemp("upscaler")
    upscaler = randomize_(tiny_upscaler(ema_decay=0.9).eval())
    upscaler.model_ema.update(randomize_(upscaler.model, seed=1))  # EMA weights differ from the live ones
    ldm = tiny_model()
    ldm_ckpt = {"state_dict": ldm.state_dict(), "hyper_parameters": dict(ldm.hparams)}
    ldm.on_save_checkpoint(ldm_ckpt)
    torch.save(ldm_ckpt, root / "ldm.ckpt")
    return {"dir": root, "model": upscaler, "upscaler": save_checkpoint(upscaler, root / "upscaler.ckpt"),
            "ldm": root / "ldm.ckpt"}


def test_load_round_trip_is_exact(checkpoints):
    loaded = load_upscaler(str(checkpoints["upscaler"]))
    original = checkpoints["model"]
    assert loaded.scale == 2 and not loaded.training
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    low = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a = upscale(original, low, steps=3, noise_level=5, generator=torch.Generator().manual_seed(0))
    b = upscale(loaded, low, steps=3, noise_level=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 3, 16, 16)
    ema_off = upscale(loaded, low, steps=3, noise_level=5, generator=torch.Generator().manual_seed(0), use_ema=False)
    assert not torch.equal(a, ema_off)  # sampling uses the EMA weights by default


def test_loader_refuses_other_checkpoints(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="is not an upscaler checkpoint"):
        load_upscaler(str(checkpoints["ldm"]))
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        load_upscaler(str(tmp_path / "missing.ckpt"))


def test_sample_script_chains_text_to_image_and_upscaling(checkpoints, tmp_path):
    from tests.test_img2img_inpaint import compose_sample

    sample = load_script("sample")
    base = [f"ckpt={checkpoints['ldm']}", "prompt=a red circle", "n=2", "steps=2", "cfg_scale=1"]
    sample.main(compose_sample([*base, "upscale=true", f"upscaler_ckpt={checkpoints['upscaler']}",
                                "upscale_steps=2", "upscale_noise_level=3"], tmp_path / "up"))
    pngs = sorted((tmp_path / "up").glob("0000*.png"))
    assert len(pngs) == 2 and (tmp_path / "up" / "grid.png").exists()
    assert Image.open(pngs[0]).size == (32, 32)  # 16 px text-to-image, x2
    meta = json.loads(Image.open(pngs[0]).text["parameters"])
    assert meta["upscaler"] == "upscaler.ckpt" and meta["upscale_factor"] == 2 and meta["upscale_noise_level"] == 3
    # the chain upscales exactly the text-to-image output (one batch, generator seeded with `seed`)
    sample.main(compose_sample(base, tmp_path / "plain"))
    low = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in sorted((tmp_path / "plain").glob("0000*"))])
    low = torch.from_numpy(low / 127.5 - 1).permute(0, 3, 1, 2)  # [2, 3, 16, 16]
    expected = upscale(load_upscaler(str(checkpoints["upscaler"])), low, steps=2, noise_level=3,
                       generator=torch.Generator().manual_seed(0))
    got = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in pngs]) / 255
    difference = np.abs(got - ((expected.permute(0, 2, 3, 1).numpy() + 1) / 2))
    assert difference.max() < 3 / 255  # PNG rounding of the 16 px images before and 32 px ones after
    with pytest.raises(ValueError, match="upscale=true needs upscaler_ckpt"):
        sample.main(compose_sample([*base, "upscale=true"], tmp_path / "bad"))


def test_upscale_script_writes_images_and_a_comparison_grid(checkpoints, tmp_path):
    script = load_script("upscale")
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(shapes(2)):
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"s{i}.png")
    result = script.main(["--ckpt", str(checkpoints["upscaler"]), "--input", str(folder), "--out", str(tmp_path / "a"),
                          "--steps", "2", "--ground-truth", "--device", "cpu"])
    assert [p.name for p in result["images"]] == ["s0_x2.png", "s1_x2.png"]
    assert Image.open(result["images"][0]).size == (16, 16)  # 16 px originals -> 8 px -> x2
    assert len(result["psnr"]) == 2 and result["grid"].exists()
    result = script.main(["--ckpt", str(checkpoints["upscaler"]), "--input", str(folder / "s0.png"),
                          "--out", str(tmp_path / "b"), "--steps", "2", "--device", "cpu"])
    assert Image.open(result["images"][0]).size == (32, 32) and result["psnr"] == []
    with pytest.raises(FileNotFoundError, match="--input .*nothing.png does not exist"):
        script.main(["--ckpt", str(checkpoints["upscaler"]), "--input", str(folder / "nothing.png")])


# ---- bad input -------------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_problem(checkpoints):
    model = checkpoints["model"]
    low = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="not divisible by the upscaling factor 4"):
        area_downsample(torch.zeros(1, 3, 10, 12), 4)
    for scale in (1, 2.5, True):
        with pytest.raises(ValueError, match="scale must be an integer >= 2"):
            area_downsample(torch.zeros(1, 3, 8, 8), scale)
    with pytest.raises(ValueError, match="scale must be an integer >= 2"):
        tiny_upscaler(scale=3.0)
    with pytest.raises(ValueError, match="must lie in \\[-1, 1\\]"):
        upscale(model, low + 200)
    with pytest.raises(ValueError, match="must be \\[B, 3, H, W\\]"):
        upscale(model, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="noise_level must be an integer in \\[0, 20\\]"):
        upscale(model, low, noise_level=21)
    four = tiny_upscaler(unet_config={**UNET, "channel_mult": [1, 2, 2]})  # U-Net downsampling 4
    with pytest.raises(ValueError, match="upscaled size 6x6 is not divisible by 4"):
        upscale(four, torch.zeros(1, 3, 3, 3), steps=1)
    with pytest.raises(ValueError, match="in_channels=6 and out_channels=3"):
        tiny_upscaler(unet_config={**UNET, "in_channels": 4})
    with pytest.raises(ValueError, match="num_classes to an int > max_noise_level=20"):
        tiny_upscaler(unet_config={**UNET, "num_classes": 10, "adm_in_channels": None})
    with pytest.raises(ValueError, match="train_crop=6 must be a multiple of scale=4"):
        tiny_upscaler(scale=4, train_crop=6)
    with pytest.raises(ValueError, match="train_crop=32 exceeds the training images"):
        tiny_upscaler(train_crop=32).random_crop(torch.zeros(2, 3, 16, 16))
