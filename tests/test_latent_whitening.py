"""latent_norm=whiten: the diffusion model's latents are standardised per channel and then decorrelated (ZCA)."""

from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion import LatentDiffusion
from tests.test_fast_paths import DDCONFIG, UNET


def tiny_ldm(latent_norm: str = "whiten", **kwargs) -> LatentDiffusion:
    torch.manual_seed(0)
    return LatentDiffusion(unet_config=UNET, cond_stage_config={"arch": "ldm-tiny-clip"},
                           first_stage_config={"ddconfig": DDCONFIG, "embed_dim": 4}, ema_decay=None,
                           latent_norm=latent_norm, **kwargs)


def correlated_latents(n: int = 64, seed: int = 0) -> torch.Tensor:
    """[n, 4, 8, 8]: four channels driven mostly by one factor, as small autoencoders' latents are."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 4, 8, 8, generator=g) * torch.tensor([10.0, 1.0, 0.3, 0.05]).view(1, 4, 1, 1)
    mixing = torch.tensor([[1.0, 0.5, 0.2, 0.1], [0.8, -0.4, 0.3, 0.0], [-0.9, 0.1, 0.5, 0.2], [0.7, 0.2, -0.1, 0.6]])
    return torch.einsum("dc,bchw->bdhw", mixing, factors) + torch.tensor([3.0, -1.0, 0.5, 2.0]).view(1, 4, 1, 1)


def channel_covariance(z: torch.Tensor) -> torch.Tensor:
    return torch.cov(z.transpose(0, 1).flatten(1))  # [C, C]


def test_whitened_latents_are_decorrelated_and_invertible():
    model = tiny_ldm()
    assert not bool(model.latent_stats_ready)  # needs the correlations: never taken from stage 1's per-channel stats
    z = correlated_latents()
    assert channel_covariance((z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), keepdim=True)).abs().min() > 0.3
    model._estimate_latent_stats(z)
    normalised = model.normalize_latents(z)
    torch.testing.assert_close(channel_covariance(normalised), torch.eye(4), atol=1e-3, rtol=0)  # float32 mixing
    torch.testing.assert_close(normalised.mean((0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(model.denormalize_latents(normalised), z, atol=1e-4, rtol=1e-5)
    mix = model.latent_mix
    torch.testing.assert_close(mix, mix.T)  # ZCA: the symmetric inverse square root, channels keep their place
    torch.testing.assert_close(mix @ model.latent_unmix, torch.eye(4), atol=1e-5, rtol=0)
    # fresh data from the same source comes out near-white too
    torch.testing.assert_close(channel_covariance(model.normalize_latents(correlated_latents(seed=1))),
                               torch.eye(4), atol=0.05, rtol=0)


def test_per_channel_leaves_channels_correlated():
    model = tiny_ldm("per_channel")
    z = correlated_latents()
    model._estimate_latent_stats(z)
    torch.testing.assert_close(model.latent_mix, torch.eye(4))
    covariance = channel_covariance(model.normalize_latents(z))
    torch.testing.assert_close(covariance.diagonal(), torch.ones(4), atol=1e-4, rtol=0)
    assert covariance.triu(1).abs().max() > 0.3


def test_whitening_survives_a_state_dict_round_trip_and_old_checkpoints_load():
    trained = tiny_ldm()
    trained._estimate_latent_stats(correlated_latents())
    z = correlated_latents(seed=2)
    restored = tiny_ldm()
    restored.load_state_dict(trained.state_dict())
    assert bool(restored.latent_stats_ready)
    torch.testing.assert_close(restored.normalize_latents(z), trained.normalize_latents(z))

    per_channel = tiny_ldm("per_channel")
    per_channel._estimate_latent_stats(z)
    old = {k: v for k, v in per_channel.state_dict().items() if k not in ("latent_mix", "latent_unmix")}
    loaded = tiny_ldm("per_channel")
    loaded.load_state_dict(old)  # a checkpoint written before whitening existed
    torch.testing.assert_close(loaded.latent_mix, torch.eye(4))
    torch.testing.assert_close(loaded.normalize_latents(z), per_channel.normalize_latents(z))


def test_whiten_refuses_a_fixed_scale_factor():
    with pytest.raises(ValueError, match="scale_factor"):
        tiny_ldm(scale_factor=0.18215)


def test_diffusers_export_refuses_whitened_latents(tmp_path):
    pytest.importorskip("diffusers")
    from ldm.convert.diffusers_folder import save_diffusers_folder

    model = tiny_ldm()
    model._estimate_latent_stats(correlated_latents())
    with pytest.raises(ValueError, match="whiten"):
        save_diffusers_folder(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()  # refused before writing anything
