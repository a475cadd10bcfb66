"""Stage 1: KL autoencoder blocks, loss, LightningModule, checkpoints, configs and SD/diffusers parity."""

from __future__ import annotations

import csv
import functools
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader

from ldm.convert.vae import diffusers_to_sd_vae, extract_vae_state_dict, sd_to_diffusers_vae
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.autoencoder import Decoder, DiagonalGaussianDistribution, Encoder
from ldm.modules.losses import LPIPS, AutoencoderLoss
from ldm.optim import warmup_constant
from ldm.utils.image_logging import log_image_grid

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None

# Same topology rules as SD's kl-f8 (ch_mult, 2 ResNet blocks, mid attention), tiny width.
F8 = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
          ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
F4 = dict(F8, ch_mult=[1, 2, 2], num_res_blocks=1)
TINY = dict(F8, resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1)  # f=2: fast Trainer tests
TINY_LOSS = dict(disc_start=0, disc_num_layers=2, disc_ndf=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to oversubscribed CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1]: [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    data = [{"image": img, "caption": f"image {i}"} for i, img in enumerate(_images(n))]
    return DataLoader(data, batch_size=batch_size)


def _model(**overrides) -> AutoencoderKL:
    kwargs = dict(
        ddconfig=TINY,
        embed_dim=4,
        loss=dict(TINY_LOSS),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, betas=(0.5, 0.9)),
        scheduler=functools.partial(warmup_constant, warmup_steps=2),
        grad_clip=1.0,
    )
    kwargs.update(overrides)
    return AutoencoderKL(**kwargs)


def _trainer(tmp_path: Path, max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=tmp_path, log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


# ---------------------------------------------------------------- blocks
@pytest.mark.parametrize("ddconfig, factor", [(F4, 4), (F8, 8)])
def test_encoder_decoder_shapes_and_sd_parameter_names(ddconfig, factor):
    enc, dec = Encoder(**ddconfig), Decoder(**ddconfig)
    x = torch.randn(2, 3, 32, 32)
    moments = enc(x)
    assert moments.shape == (2, 8, 32 // factor, 32 // factor)  # double_z: mean and log-variance
    assert dec(moments[:, :4]).shape == (2, 3, 32, 32)

    levels = len(ddconfig["ch_mult"])
    enc_keys, dec_keys = set(enc.state_dict()), set(dec.state_dict())
    for key in ("conv_in.weight", "down.0.block.0.norm1.weight", "down.0.block.0.conv2.bias",
                "down.1.block.0.nin_shortcut.weight", "down.0.downsample.conv.weight", "mid.block_1.conv1.weight",
                "mid.attn_1.q.weight", "mid.attn_1.proj_out.bias", "mid.block_2.norm2.weight", "norm_out.weight",
                "conv_out.weight"):
        assert key in enc_keys, key
    assert f"down.{levels - 1}.downsample.conv.weight" not in enc_keys  # no downsampling after the last level
    # decoder levels stored in CompVis' reversed order: up.0 is full resolution and never upsamples
    assert f"up.{levels - 1}.upsample.conv.weight" in dec_keys and "up.0.upsample.conv.weight" not in dec_keys
    assert f"up.0.block.{ddconfig['num_res_blocks']}.conv1.weight" in dec_keys  # num_res_blocks + 1 per level
    assert dec.state_dict()["up.0.block.0.nin_shortcut.weight"].shape[:2] == (32, 64)


def test_sd_kl_f8_config_builds_the_sd_vae():
    cfg = dict(F8, ch=128, resolution=256)
    model = AutoencoderKL(cfg, embed_dim=4)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("latent_")}
    assert len(weights) == 248
    assert sum(v.numel() for v in weights.values()) == 83_653_863  # SD's first_stage_model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)


def test_norm_num_groups_reaches_every_norm_including_attention():
    enc = Encoder(**dict(F4, norm_num_groups=8))
    groups = {name: m.num_groups for name, m in enc.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert "mid.attn_1.norm" in groups and set(groups.values()) == {8}


def test_ddconfig_tolerates_sd_options_and_rejects_typos():
    for extra in ({"attn_type": "vanilla-xformers"}, {"attn_type": "none"}, {"use_linear_attn": True},
                  {"resamp_with_conv": False}, {"give_pre_end": True}, {"tanh_out": True}):
        dec = Decoder(**dict(TINY, **extra))
        out = dec(torch.randn(1, 4, 8, 8))
        assert out.shape[-1] == 16
    assert Decoder(**dict(TINY, tanh_out=True))(10 * torch.randn(1, 4, 8, 8)).abs().max() <= 1
    with pytest.raises(TypeError, match="unknown ddconfig keys.*z_chanels"):
        Encoder(**dict(TINY, z_chanels=4))
    with pytest.raises(ValueError, match="attn_type"):
        Encoder(**dict(TINY, attn_type="flash"))


def test_downsample_pads_right_and_bottom_only():
    from ldm.modules.autoencoder import Downsample

    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of every stride-2 window
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(down(x), x[:, :, ::2, ::2])  # no left/top padding: windows start at (0, 0)


def test_channels_last_and_checkpointing_do_not_change_results():
    torch.manual_seed(0)
    enc = Encoder(**TINY)
    x = torch.randn(2, 3, 16, 16)
    ref = enc(x)
    enc_cl = Encoder(**TINY).to(memory_format=torch.channels_last)
    enc_cl.load_state_dict(enc.state_dict())
    torch.testing.assert_close(enc_cl(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)

    enc_ckpt = Encoder(**dict(TINY, use_checkpoint=True))
    enc_ckpt.load_state_dict(enc.state_dict())
    enc(x).square().sum().backward()
    enc_ckpt(x).square().sum().backward()
    for (name, a), b in zip(enc.named_parameters(), enc_ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


# ---------------------------------------------------------------- posterior
def test_kl_of_standard_normal_is_zero_and_matches_closed_form():
    zeros = torch.zeros(3, 8, 4, 4)  # mean 0, logvar 0
    assert torch.equal(DiagonalGaussianDistribution(zeros).kl(), torch.zeros(3))
    mean, logvar = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), -1.0)
    kl = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).kl()
    expected = 0.5 * (0.25 + torch.exp(torch.tensor(-1.0)) - 1.0 + 1.0)  # 0.5 (mu^2 + var - 1 - log var)
    torch.testing.assert_close(kl, expected.reshape(1))
    big = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, 100.0)], 1))
    assert big.logvar.item() == 20.0  # clamped to [-30, 20]


def test_posterior_sample_is_reparameterised_and_seedable():
    mean, logvar = torch.full((4000, 1, 1, 1), 2.0), torch.full((4000, 1, 1, 1), 2 * math.log(0.5))  # std 0.5
    params = torch.cat([mean, logvar], 1)
    post = DiagonalGaussianDistribution(params)
    a = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, post.sample(torch.Generator().manual_seed(1)))
    assert abs(a.mean().item() - 2.0) < 0.05 and abs(a.std().item() - 0.5) < 0.05
    assert torch.equal(post.mode(), params[:, :1])


# ---------------------------------------------------------------- training
def test_overfits_one_batch():
    torch.manual_seed(0)
    model = AutoencoderKL(TINY, 4, loss={"disc_weight": 0.0})
    x = _images(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(250):  # the loss falls ~7x in 250 steps (seeds 0-2); require 5x
        rec, post = model(x)
        loss, logs = model.loss.generator_loss(x, rec, post)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["rec_loss"].item())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 5, (losses[:10], losses[-10:])


def test_decoder_noise_perturbs_each_channel_by_its_own_spread_in_training_only():
    model = _model(decoder_noise=0.1)
    z = torch.randn(64, 4, 8, 8) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1, 1)  # [B, C, h, w]
    torch.manual_seed(0)
    delta = model._noised_for_decoder(z) - z
    ratio = delta.std(dim=(0, 2, 3)) / z.std(dim=(0, 2, 3))  # [C]: noise std over channel std
    assert torch.allclose(ratio, torch.full((4,), 0.1), rtol=0.05), ratio
    assert torch.equal(_model()._noised_for_decoder(z), z)  # off by default, as SD
    with pytest.raises(ValueError, match="decoder_noise"):
        _model(decoder_noise=-0.1)


def test_decoder_noise_is_used_by_the_training_step_and_not_by_validation(tmp_path):
    seen = []
    model = _model(decoder_noise=0.5)
    original = model._noised_for_decoder
    model._noised_for_decoder = lambda z: seen.append(z.shape) or original(z)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2)
    trainer.fit(model, _loader(), _loader(4))
    assert torch.isfinite(model.latent_std).all()  # validation ran (it measures the latent statistics) ...
    assert len(seen) == 2  # ... and only the two training steps noised the latents: validation decodes the mode


def test_latent_rgb_loss_is_zero_for_a_linear_colour_code_and_off_by_default():
    model = _model(latent_rgb_weight=1.0)
    x = _images(3)  # [3, 3, 16, 16]; f = 2
    pooled = torch.nn.functional.avg_pool2d(x, 2)  # [3, 3, 8, 8]
    z = torch.cat([2 * pooled, torch.randn(3, 1, 8, 8)], 1)  # colour in channels 0-2 (scaled), noise in 3
    with torch.no_grad():
        model.latent_to_rgb.weight.copy_(torch.eye(3, 4).view(3, 4, 1, 1) / 2)
        model.latent_to_rgb.bias.zero_()
    assert model.latent_rgb_loss(x, z).item() < 1e-10
    shifted = z + torch.tensor([0.2, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)  # red off by 0.1 in every cell
    torch.testing.assert_close(model.latent_rgb_loss(x, shifted), torch.tensor(0.1**2 * 64))  # per-image sum

    plain = _model()
    assert plain.latent_to_rgb is None and not any(k.startswith("latent_to_rgb") for k in plain.state_dict())
    with pytest.raises(ValueError, match="latent_rgb_weight"):
        _model(latent_rgb_weight=-1.0)


def test_latent_rgb_term_falls_in_training_and_its_head_is_optimised(tmp_path):
    torch.manual_seed(0)
    model = _model(latent_rgb_weight=1.0, loss=dict(TINY_LOSS, disc_start=10**6))
    head_before = model.latent_to_rgb.weight.detach().clone()
    x = _images(8)
    with torch.no_grad():
        first = model.latent_rgb_loss(x, model.encode(x).mode()).item()
    trainer = _trainer(tmp_path, max_steps=64, limit_val_batches=1, check_val_every_n_epoch=8)
    trainer.fit(model, _loader(n=64, batch_size=8), _loader(8))
    with torch.no_grad():
        last = model.latent_rgb_loss(x, model.encode(x).mode()).item()
    assert not torch.equal(model.latent_to_rgb.weight, head_before)  # the head is in the optimizer
    assert last < first / 3, (first, last)
    assert {"train/latent_rgb_loss", "val/latent_rgb_loss"} <= set(trainer.logged_metrics)


def test_latent_rgb_head_is_optional_when_loading_weights(tmp_path):
    with_head, without = _model(latent_rgb_weight=1.0), _model()
    torch.save({"state_dict": with_head.state_dict()}, tmp_path / "head.ckpt")
    torch.save({"state_dict": without.state_dict()}, tmp_path / "plain.ckpt")
    loaded = _model(ckpt_path=str(tmp_path / "head.ckpt"))  # the head is dropped: not part of this model
    torch.testing.assert_close(loaded.encoder.conv_in.weight, with_head.encoder.conv_in.weight)
    fresh = _model(latent_rgb_weight=1.0, ckpt_path=str(tmp_path / "plain.ckpt"))  # a new head starts fresh
    torch.testing.assert_close(fresh.decoder.conv_out.weight, without.decoder.conv_out.weight)


class _RecordDiscriminator(L.Callback):
    """Record, per training batch, global_step and the discriminator's optimizer step count."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        d_opt = trainer.optimizers[1]
        state = d_opt.state[d_opt.param_groups[0]["params"][0]]
        self.rows.append((trainer.global_step, int(state["step"]) if state else 0))


def test_global_step_counts_generator_steps_and_gan_starts_at_disc_start(tmp_path):
    model = _model(loss=dict(TINY_LOSS, disc_start=3))
    record = _RecordDiscriminator()
    trainer = _trainer(tmp_path, max_steps=6, callbacks=[record])
    trainer.fit(model, train_dataloaders=_loader(n=64))
    assert trainer.global_step == 6  # max_steps = generator steps, although the discriminator stepped too
    assert [g for g, _ in record.rows] == [1, 2, 3, 4, 5, 6]
    assert [d for _, d in record.rows] == [0, 0, 0, 1, 2, 3]  # discriminator steps from generator step 3 on
    sched_g, sched_d = trainer.lr_scheduler_configs
    assert sched_g.scheduler.last_epoch == 6 and sched_d.scheduler.last_epoch == 3
    logged = trainer.logged_metrics
    for key in ("train/rec_loss", "train/kl_loss", "train/g_loss", "train/d_loss", "train/grad_norm",
                "train/disc_grad_norm", "train/lr"):
        assert key in logged, key


def test_validation_fills_latent_stats_and_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = _model()
    assert not model.has_latent_stats
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=None, val_check_interval=2)
    val = _loader(n=12, batch_size=5)  # uneven last batch
    trainer.fit(model, train_dataloaders=_loader(), val_dataloaders=val)
    assert model.has_latent_stats
    model.eval()
    with torch.no_grad():
        z = torch.cat([model.encode(b["image"]).mode() for b in val])  # [12, 4, 8, 8]
    torch.testing.assert_close(model.latent_mean, z.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model.latent_std, z.transpose(0, 1).flatten(1).std(dim=1, unbiased=False))
    for key in ("val/psnr", "val/ssim", "val/rec_loss"):
        assert key in trainer.callback_metrics, key
    png = list((Path(trainer.logger.log_dir) / "images").glob("val_reconstructions_step*.png"))
    assert len(png) == 1 and Image.open(png[0]).size[0] > 0

    path = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(path)
    loaded = AutoencoderKL.load_from_checkpoint(path, weights_only=True)
    torch.testing.assert_close(loaded.latent_std, model.latent_std)
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x).mode()), model.decode(model.encode(x).mode()))
    # inference without the loss module (as the diffusion stage uses it): loss.* tensors are dropped
    bare = AutoencoderKL.load_from_checkpoint(path, weights_only=True, loss=None)
    assert bare.loss is None and not any(k.startswith("loss.") for k in bare.state_dict())
    torch.testing.assert_close(bare.latent_mean, model.latent_mean)


def test_init_from_sd_style_checkpoint_without_loss_weights(tmp_path):
    source = _model()
    sd_file = {f"first_stage_model.{k}": v for k, v in source.state_dict().items()
               if not k.startswith(("loss.", "latent_"))}
    sd_file["model.diffusion_model.out.0.weight"] = torch.ones(3)  # other parts of an SD checkpoint
    torch.save({"state_dict": sd_file}, tmp_path / "sd.ckpt")
    target = _model(ckpt_path=str(tmp_path / "sd.ckpt"))
    torch.testing.assert_close(target.decoder.conv_out.weight, source.decoder.conv_out.weight)
    assert not target.has_latent_stats  # SD checkpoints carry no statistics

    wrong = dict(TINY, ch=16)
    with pytest.raises(RuntimeError, match="size mismatch"):
        AutoencoderKL(wrong, 4, ckpt_path=str(tmp_path / "sd.ckpt"))
    del sd_file["first_stage_model.decoder.conv_out.weight"]
    torch.save({"state_dict": sd_file}, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match="missing.*decoder.conv_out.weight"):
        AutoencoderKL(TINY, 4, ckpt_path=str(tmp_path / "partial.ckpt"))


# ---------------------------------------------------------------- losses
def test_lpips_without_weights_fails_clearly():
    with pytest.raises(FileNotFoundError, match=r"model\.loss\.lpips_weights.*offline"):
        AutoencoderLoss(perceptual_weight=1.0, lpips_weights=None)
    with pytest.raises(FileNotFoundError, match="not a file"):
        AutoencoderLoss(perceptual_weight=1.0, lpips_weights="/nonexistent/vgg16.pth")


def test_lpips_from_a_torchvision_vgg16_file(tmp_path):
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    random_backbone = _LPIPS(pretrained=False, net="vgg", pnet_rand=True).net.state_dict()
    # torchvision's layout: features.N.* (LPIPS slices keep torchvision's layer indices)
    torch.save({f"features.{k.split('.', 1)[1]}": v for k, v in random_backbone.items()}, tmp_path / "vgg16.pth")
    lpips = LPIPS(tmp_path / "vgg16.pth")
    torch.testing.assert_close(lpips.net.net.slice3.state_dict()["10.weight"], random_backbone["slice3.10.weight"])
    x = _images(2, size=32)
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    assert lpips(x, x).abs().max() < 1e-6
    d = lpips(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    lpips.train()
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())


def test_adaptive_weight_balances_gradient_norms():
    loss = AutoencoderLoss(disc_weight=0.5, disc_num_layers=2, disc_ndf=8)
    last = torch.randn(3, 3, requires_grad=True)
    nll, g = (last * 2).sum(), (last * 4).sum()  # gradients 2 and 4 on 9 entries: norms 6 and 12
    expected = torch.tensor(0.5 * 6.0 / (12.0 + 1e-4))
    torch.testing.assert_close(loss.adaptive_weight(nll, g, last), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- image logging
def test_image_grid_goes_to_a_png_for_csv_loggers(tmp_path):
    trainer = SimpleNamespace(loggers=[CSVLogger(tmp_path, name="run")])  # what log_image_grid reads
    images = torch.rand(4, 3, 16, 16)
    written = log_image_grid(trainer, "val/reconstructions", images, step=7, captions=list("abcd"), ncol=2)
    assert len(written) == 1 and written[0].parent.name == "images" and written[0].name.endswith("step00000007.png")
    png = Image.open(written[0])
    assert png.text["captions"] == "a | b | c | d" and png.text["key"] == "val/reconstructions"

    assert log_image_grid(SimpleNamespace(loggers=[]), "x", images, step=0) == []
    with pytest.raises(ValueError, match="captions"):
        log_image_grid(trainer, "x", images, step=0, captions=["only one"])


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("experiment, resolution, factor", [
    ("quickstart_autoencoder", 32, 4), ("digits_autoencoder", 32, 4), ("photos_autoencoder", 64, 8)])
def test_experiment_configs_build_the_model(compose_train, experiment, resolution, factor):
    cfg = compose_train([f"experiment={experiment}"], tiny_data=False)
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert isinstance(model, AutoencoderKL)
    assert cfg.callbacks.model_checkpoint.monitor == "val/psnr" and cfg.callbacks.model_checkpoint.mode == "max"
    posterior = model.encode(torch.zeros(1, 3, resolution, resolution))
    assert posterior.mean.shape[-1] == resolution // factor
    optimizers, _ = model.configure_optimizers()
    assert isinstance(optimizers[0], torch.optim.AdamW) and optimizers[0].defaults["betas"] == (0.5, 0.9)


# ---------------------------------------------------------------- diffusers parity
def _random_diffusers_vae(level_attention: bool):
    """diffusers AutoencoderKL, 3 levels (32, 64, 64 channels), 2 ResNet blocks, random weights everywhere."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    down, up = ["DownEncoderBlock2D"] * 3, ["UpDecoderBlock2D"] * 3
    if level_attention:  # attention at the 8x8 level: CompVis attn_resolutions=[8]
        down[2], up[0] = "AttnDownEncoderBlock2D", "AttnUpDecoderBlock2D"
    vae = DiffusersAutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=down, up_block_types=up, block_out_channels=[32, 64, 64],
        layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=32,
    ).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.05)
    return vae


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed")
@pytest.mark.parametrize("level_attention", [False, True])
def test_diffusers_autoencoder_parity(level_attention):
    torch.manual_seed(0)
    theirs = _random_diffusers_vae(level_attention)
    ddconfig = dict(F8, ch_mult=[1, 2, 2], attn_resolutions=[8] if level_attention else [])
    ours = AutoencoderKL(ddconfig, embed_dim=4).eval()
    missing, unexpected = ours.load_state_dict(diffusers_to_sd_vae(theirs.state_dict()), strict=False)
    assert set(missing) == {"latent_mean", "latent_std"} and not unexpected

    x, z = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        mean_ours, mean_theirs = ours.encode(x).mean, theirs.encode(x).latent_dist.mean
        dec_ours, dec_theirs = ours.decode(z), theirs.decode(z).sample
    assert (mean_ours - mean_theirs).norm() / mean_theirs.norm() <= 1e-5
    assert (dec_ours - dec_theirs).norm() / dec_theirs.norm() <= 1e-5

    sd_state = {k: v for k, v in ours.state_dict().items() if not k.startswith("latent_")}
    back = diffusers_to_sd_vae(sd_to_diffusers_vae(sd_state))  # the mapping inverts exactly
    assert back.keys() == sd_state.keys() and all(torch.equal(back[k], sd_state[k]) for k in back)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed")
def test_sd_keys_agree_with_diffusers_own_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    theirs = _random_diffusers_vae(level_attention=False)
    ours = AutoencoderKL(dict(F8, ch_mult=[1, 2, 2]), embed_dim=4)
    sd_state = {k: v for k, v in ours.state_dict().items() if not k.startswith("latent_")}
    reference = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in sd_state.items()}, theirs.config)
    converted = sd_to_diffusers_vae(sd_state)
    assert converted.keys() == reference.keys() == theirs.state_dict().keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    # a diffusers layout inside a single file is recognised and converted back
    assert extract_vae_state_dict({f"vae.{k}": v for k, v in converted.items()}).keys() == sd_state.keys()


def _logged_rows(tmp_path: Path, log_every: bool, monkeypatch) -> tuple[list[dict], int]:
    """CSV rows of a 7-step GAN fit logging every 3 steps, and the number of self.log calls it made."""
    if log_every:  # the reference: every term logged on every batch, as before the gate
        monkeypatch.setattr("ldm.models.autoencoder.writes_step_metrics", lambda trainer: True)
    calls = []
    log = AutoencoderKL.log
    monkeypatch.setattr(AutoencoderKL, "log", lambda self, *a, **k: calls.append(1) or log(self, *a, **k))
    torch.manual_seed(0)
    model = _model(loss=dict(TINY_LOSS, disc_start=2))
    trainer = _trainer(tmp_path / str(log_every), max_steps=7, log_every_n_steps=3)
    trainer.fit(model, train_dataloaders=_loader(n=64))
    monkeypatch.undo()
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f)), len(calls)


def test_loss_terms_are_logged_on_logging_steps_only_with_the_same_rows(tmp_path, monkeypatch):
    every_batch, every_calls = _logged_rows(tmp_path, True, monkeypatch)
    gated, gated_calls = _logged_rows(tmp_path, False, monkeypatch)
    assert [row["step"] for row in every_batch] == ["2", "5"]  # logging steps 3 and 6 (0-based step index 2, 5)
    assert {"train/kl_loss", "train/d_loss", "train/grad_norm", "train/disc_grad_norm", "train/lr"} <= set(gated[0])
    assert gated == every_batch  # the loggers receive exactly the same values
    assert gated_calls < every_calls / 2  # ... from fewer self.log calls (rec_loss, for the progress bar, every batch)
