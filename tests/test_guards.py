"""Config guards: data/model mismatches are refused before the first step, naming both values."""

from __future__ import annotations

import hydra
import pytest
from hydra.errors import InstantiationException
from omegaconf import OmegaConf, open_dict

from ldm.utils.guards import check_run
from ldm.utils.run import ConfigError
from tests.hydra_helpers import CONFIG_DIR
from train import train


@pytest.fixture
def compose_ldm(compose_train):
    """quickstart_ldm with an untrained first stage built from the autoencoder config (no checkpoint file)."""

    def _compose(overrides=()):
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
            ae = compose("train", overrides=["experiment=quickstart_autoencoder"]).model
        cfg = compose_train(["experiment=quickstart_ldm", "callbacks.sample_grid=null", *overrides])
        with open_dict(cfg):
            cfg.model.first_stage_config = {"ddconfig": OmegaConf.to_container(ae.ddconfig), "embed_dim": ae.embed_dim}
        return cfg

    return _compose


def test_autoencoder_resolution_not_divisible_is_refused(compose_train, tmp_path):
    cfg = compose_train(["experiment=quickstart_autoencoder", "data.image_size=34"])
    with pytest.raises(ConfigError, match=r"data.image_size=34 .* downsampling 4 .*ch_mult=\[1, 2, 2\].* 32 or 36"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before training started


def test_ldm_resolution_must_divide_autoencoder_times_unet_factor(compose_ldm):
    cfg = compose_ldm(["data.image_size=36"])  # divisible by the autoencoder's 4, not by 4 x 2
    with pytest.raises(ConfigError, match=r"data.image_size=36 .* downsampling 8 \(4 = autoencoder .* x 2 = U-Net"):
        train(cfg)
    with open_dict(cfg):
        cfg.data.image_size = 40  # a multiple of 8 passes
    check_run(hydra.utils.instantiate(cfg.data, _convert_="all"), hydra.utils.instantiate(cfg.model, _convert_="all"))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.unet_config.in_channels=3", r"in_channels=3 .* z_channels=4"),
        ("model.unet_config.out_channels=8", r"out_channels=8 .* z_channels=4"),
        ("model.unet_config.context_dim=96", r"context_dim=96 .* width 128"),
    ],
)
def test_ldm_channel_mismatches_are_refused(compose_ldm, override, expected):
    cfg = compose_ldm([override])
    with pytest.raises(InstantiationException, match=expected):
        train(cfg)


def test_upscaler_resolution_must_divide_its_scale_and_fit_its_crop(compose_train):
    cfg = compose_train(["experiment=shapes_upscaler_x4", "data.image_size=62"])  # 62 is no multiple of 4
    with pytest.raises(ConfigError, match=r"data.image_size=62 is not divisible by 4 \(upscaling scale=4\)"):
        train(cfg)
    with open_dict(cfg):
        cfg.data.image_size = 28  # a multiple of 4, smaller than the 32 px training crop
    with pytest.raises(ConfigError, match=r"data.image_size=28 is smaller than model.train_crop=32"):
        train(cfg)
    with open_dict(cfg):
        cfg.model.train_crop = None  # whole images: 4 (scale) and 4 (U-Net downsampling) must divide the side
        cfg.data.image_size = 36
    check_run(hydra.utils.instantiate(cfg.data, _convert_="all"), hydra.utils.instantiate(cfg.model, _convert_="all"))
    with open_dict(cfg):
        cfg.data.image_size = 44 + 2
    with pytest.raises(ConfigError, match=r"not divisible by 4 \(upscaling scale=4, U-Net downsampling 4\)"):
        check_run(hydra.utils.instantiate(cfg.data, _convert_="all"), hydra.utils.instantiate(cfg.model, _convert_="all"))
