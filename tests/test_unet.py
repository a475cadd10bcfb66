"""The SD U-Net (ldm/modules/unet.py) and its diffusers conversion (ldm/convert/unet.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.convert.unet import (
    diffusers_unet_config,
    unet_diffusers_to_sd,
    unet_key_map,
    unet_sd_to_diffusers,
)
from ldm.modules.unet import UNetModel, timestep_embedding
from tests.weights import randomize_

# Tiny U-Nets following the SD topology rules (widths are multiples of 32 for diffusers' GroupNorm).
SD1_TINY = dict(image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                transformer_depth=1, context_dim=32, legacy=False)
SD2_TINY = dict(SD1_TINY, num_heads=-1, num_head_channels=8, use_linear_in_transformer=True, context_dim=48)
# The full-size U-Nets of the SD releases (configs/model/unet/), built on the meta device.
UNET_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model" / "unet"
SD15 = OmegaConf.to_container(OmegaConf.load(UNET_CONFIGS / "sd15.yaml"))
SD21 = OmegaConf.to_container(OmegaConf.load(UNET_CONFIGS / "sd21.yaml"))


def inputs(params: dict, batch: int = 2, size: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, params["in_channels"], size, size, generator=gen)
    t = torch.tensor([3, 999][:batch])
    ctx = None
    if params.get("context_dim"):
        ctx = torch.randn(batch, 7, params["context_dim"], generator=gen)
    return x, t, ctx


@pytest.mark.parametrize("params", [SD15, SD21], ids=["sd15", "sd21"])
def test_full_size_configs_have_the_sd_parameter_count_and_key_layout(params):
    with torch.device("meta"):
        state = UNetModel(**params).state_dict()
    # Parameter counts of the released SD 1.5 and SD 2.1 U-Nets (model.diffusion_model.*, 686 tensors).
    expected = 859_520_964 if params is SD15 else 865_910_724
    assert sum(v.numel() for v in state.values()) == expected
    assert len(state) == 686
    ctx = params["context_dim"]
    shapes = {
        "time_embed.0.weight": (1280, 320),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, ctx),
        "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1) if params is SD15 else (320, 320),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("params", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])
def test_output_shape_and_zero_output_at_init(params):
    torch.manual_seed(0)
    model = UNetModel(**params)
    x, t, ctx = inputs(params)
    out = model(x, t, ctx)
    assert out.shape == (2, 4, 16, 16)
    # SD zero-initialises out.2 (and each residual branch's last layer): the untrained U-Net outputs 0
    assert torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(model.get_submodule(f"input_blocks.{i}.0.out_layers.3").weight) == 0 for i in (1, 2))


def test_concat_conditioning_adds_input_channels():
    params = dict(SD1_TINY, in_channels=4 + 5)  # SD 2 inpainting: latent + mask + masked-image latent
    model = randomize_(UNetModel(**params))
    x, t, ctx = inputs(dict(SD1_TINY))
    extra = torch.randn(2, 5, 16, 16)
    out = model(x, t, ctx, concat=extra)
    assert out.shape == (2, 4, 16, 16)
    assert torch.equal(out, model(torch.cat([x, extra], dim=1), t, ctx))
    assert not torch.allclose(out, model(x, t, ctx, concat=torch.zeros_like(extra)))
    with pytest.raises(ValueError, match="concat"):
        model(x, t, ctx)  # the concat channels are missing


def test_unconditional_and_class_conditional_variants():
    params = dict(image_size=16, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
                  num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, num_classes=10,
                  use_scale_shift_norm=True, resblock_updown=True)
    model = randomize_(UNetModel(**params))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5.5, 300.0])  # float timesteps are allowed
    y = torch.tensor([1, 7])
    out = model(x, t, y=y)
    assert out.shape == (2, 3, 16, 16)
    assert not torch.allclose(out, model(x, t, y=torch.tensor([2, 7])))  # labels matter
    assert "input_blocks.2.0.in_layers.0.weight" in model.state_dict()  # the down-sampling ResBlock
    assert tuple(model.state_dict()["input_blocks.3.1.qkv.weight"].shape) == (192, 64, 1)  # openaimodel AttentionBlock
    with pytest.raises(ValueError, match="class labels"):
        model(x, t)


def test_new_and_legacy_attention_order_split_qkv_differently():
    params = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[1],
                  num_res_blocks=1, channel_mult=[1], num_heads=4)
    legacy = randomize_(UNetModel(**params))
    new = UNetModel(**params, use_new_attention_order=True)
    new.load_state_dict(legacy.state_dict())
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    assert not torch.allclose(legacy(x, t), new(x, t))
    single = UNetModel(**dict(params, num_heads=1), use_new_attention_order=True)  # one head: orders agree
    single_legacy = UNetModel(**dict(params, num_heads=1))
    single.load_state_dict(legacy.state_dict())
    single_legacy.load_state_dict(legacy.state_dict())
    torch.testing.assert_close(single(x, t), single_legacy(x, t))


def test_gradient_checkpointing_gives_identical_gradients():
    plain = randomize_(UNetModel(**SD1_TINY))
    ckpt = UNetModel(**dict(SD1_TINY, use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = inputs(SD1_TINY)
    for model in (plain, ckpt):
        model.train()
        model(x, t, ctx).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(p.grad.abs().sum() > 0 for p in plain.parameters())


def test_timestep_embedding_is_sd_cos_first():
    t = torch.tensor([0, 1, 250, 999])
    emb = timestep_embedding(t, 8)
    half = 4
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # t = 0: cosines first
    assert timestep_embedding(t, 7).shape == (4, 7)  # odd sizes are zero-padded


def test_channels_last_input_gives_the_same_output():
    model = randomize_(UNetModel(**SD1_TINY)).eval()
    x, t, ctx = inputs(SD1_TINY)
    with torch.no_grad():
        ref = model(x, t, ctx)
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, ctx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bad_inputs_get_clear_errors():
    model = UNetModel(**SD1_TINY)
    x, t, ctx = inputs(SD1_TINY)
    with pytest.raises(ValueError, match="context"):
        model(x, t)
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        model(x[:, :3], t, ctx)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(x[..., :12, :12], t, ctx)
    with pytest.raises(ValueError, match="context_dim"):
        UNetModel(**dict(SD1_TINY, context_dim=None))
    with pytest.raises(ValueError, match="dims=2"):
        UNetModel(**dict(SD1_TINY, dims=3))


@pytest.mark.parametrize("params", [SD1_TINY, SD2_TINY], ids=["sd15-like", "sd21-like"])
def test_diffusers_unet_converted_into_ours_gives_the_same_eps(params):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**diffusers_unet_config(params)).eval()
    ours = UNetModel(**params).eval()
    ours.load_state_dict(unet_diffusers_to_sd(reference.state_dict(), params))
    x, t, ctx = inputs(params)
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert expected.abs().mean() > 0.1  # diffusers does not zero-initialise: a real comparison
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5


@pytest.mark.parametrize("params", [SD1_TINY, SD2_TINY, SD15], ids=["sd1", "sd2", "sd15-full"])
def test_key_conversion_round_trip_is_bit_exact(params):
    if params is SD15:
        with torch.device("meta"):
            state = UNetModel(**params).state_dict()
        names = unet_key_map(params)
        assert len(set(names.values())) == len(names) == len(state)  # a bijection over every key
        # spot checks against the SD 1.5 <-> diffusers names used by the official conversion script
        assert names["input_blocks.1.0.in_layers.0.weight"] == "down_blocks.0.resnets.0.norm1.weight"
        assert names["input_blocks.3.0.op.weight"] == "down_blocks.0.downsamplers.0.conv.weight"
        assert names["middle_block.1.proj_in.weight"] == "mid_block.attentions.0.proj_in.weight"
        assert names["output_blocks.2.1.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"
        assert names["output_blocks.5.2.conv.bias"] == "up_blocks.1.upsamplers.0.conv.bias"
        assert names["output_blocks.3.0.skip_connection.weight"] == "up_blocks.1.resnets.0.conv_shortcut.weight"
        assert names["time_embed.2.weight"] == "time_embedding.linear_2.weight"
        return
    state = randomize_(UNetModel(**params)).state_dict()
    back = unet_diffusers_to_sd(unet_sd_to_diffusers(state, params), params)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_conversion_refuses_what_diffusers_cannot_express_and_reports_missing_keys():
    with pytest.raises(ValueError, match="disable_middle_self_attn"):
        diffusers_unet_config(dict(SD2_TINY, disable_middle_self_attn=True))
    state = UNetModel(**SD1_TINY).state_dict()
    del state["out.2.weight"]
    with pytest.raises(KeyError, match="1 missing"):
        unet_sd_to_diffusers(state, SD1_TINY)
