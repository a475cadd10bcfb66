"""LatentDiffusion composition: pooled-text (SDXL-style vector) conditioning next to cross-attention."""

from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion import LatentDiffusion
from ldm.modules.unet import UNetModel
from ldm.pipeline import SamplingConfig, text_to_image
from tests.weights import randomize_

DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=16, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0, norm_num_groups=8)
UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[1, 2], num_head_channels=16, use_spatial_transformer=True, context_dim=128,
            use_linear_in_transformer=True, legacy=False)
POOLED = dict(num_classes="sequential", adm_in_channels=128)  # ldm-tiny-clip: width 128, embed_dim 128


def tiny_model(**unet_extra) -> LatentDiffusion:
    torch.manual_seed(0)
    model = LatentDiffusion(unet_config={**UNET, **unet_extra}, cond_stage_config={"arch": "ldm-tiny-clip"},
                            first_stage_config={"ddconfig": DDCONFIG, "embed_dim": 4}, ema_decay=None,
                            latent_norm="none")
    randomize_(model.unet)
    return model.eval()


def test_sequential_label_embedding_takes_a_vector_in_the_sdxl_layout():
    unet = UNetModel(**{**UNET, **POOLED})
    keys = unet.state_dict()
    assert tuple(keys["label_emb.0.0.weight"].shape) == (128, 128)  # [time_embed_dim, adm_in_channels]
    assert tuple(keys["label_emb.0.2.weight"].shape) == (128, 128)
    randomize_(unet)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 128)
    y = torch.randn(2, 128)
    assert not torch.allclose(unet(x, t, context=ctx, y=y), unet(x, t, context=ctx, y=y + 1))  # y matters
    with pytest.raises(ValueError, match=r"y must be \[B, adm_in_channels\] = \[2, 128\]"):
        unet(x, t, context=ctx, y=torch.randn(2, 64))
    with pytest.raises(ValueError, match="set adm_in_channels"):
        UNetModel(**{**UNET, "num_classes": "sequential"})


def test_pooled_text_reaches_the_unet_in_training_and_sampling():
    model = tiny_model(**POOLED)
    assert model.uses_pooled_text and not tiny_model().uses_pooled_text
    cond = model.encode_conditioning(["a red circle", ""])
    assert cond["context"].shape == (2, 77, 128) and cond["y"].shape == (2, 128)
    torch.testing.assert_close(cond["y"], model.cond_stage_model.encode(["a red circle", ""])["pooled"])
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a red circle", "a blue square"]}
    loss = model.diffusion_step(batch, generator=torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    assert model.unet.label_emb[0][0].weight.grad.abs().sum() > 0  # the pooled path is trained
    config = SamplingConfig(sampler="dpmpp_2m", steps=3, cfg_scale=3.0, seed=0, progress=False)
    red, blue = text_to_image(model, ["a red circle", "a blue square"], config).chunk(2)
    red_again = text_to_image(model, ["a red circle"], config)
    torch.testing.assert_close(red, red_again)  # seeded
    assert red.shape == (1, 3, 16, 16) and not torch.allclose(red, blue)  # the prompt matters


def test_pooled_width_mismatch_names_both_values():
    with pytest.raises(ValueError, match="adm_in_channels=64 but the text encoder's pooled embedding has 128"):
        tiny_model(num_classes="sequential", adm_in_channels=64)


def test_trainable_text_encoder_has_an_ema_that_sampling_and_validation_use():
    torch.manual_seed(0)
    def build(freeze: bool) -> LatentDiffusion:
        return LatentDiffusion(unet_config=UNET, cond_stage_config={"arch": "ldm-tiny-clip", "freeze": freeze},
                               first_stage_config={"ddconfig": DDCONFIG, "embed_dim": 4}, ema_decay=0.5,
                               latent_norm="none")

    assert build(freeze=True).cond_stage_ema is None  # frozen text encoder: nothing to average
    model = build(freeze=False)
    prompts = ["a red circle", "a blue square"]
    before = model.encode_conditioning(prompts, use_ema=True)["context"].detach()
    with torch.no_grad():  # a "training step" on the text encoder, then the EMA update of the batch end
        for p in model.cond_stage_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.on_train_batch_end(None, None, 0)
    raw = model.encode_conditioning(prompts)["context"]
    ema = model.encode_conditioning(prompts, use_ema=True)["context"]
    assert not torch.allclose(ema, before) and not torch.allclose(ema, raw)  # the EMA moved, but not all the way
    with model.ema_weights():  # validation: EMA weights swapped into the live modules, restored afterwards
        torch.testing.assert_close(model.encode_conditioning(prompts)["context"], ema)
    torch.testing.assert_close(model.encode_conditioning(prompts)["context"], raw)
    state = model.state_dict()
    assert any(k.startswith("cond_stage_ema.shadow.") for k in state)
    old = {k: v for k, v in state.items() if not k.startswith("cond_stage_ema.")}  # saved before text EMA existed
    fresh = build(freeze=False)
    fresh.fill_missing_text_ema(old)
    fresh.load_state_dict(old)  # strict
    torch.testing.assert_close(fresh.encode_conditioning(prompts, use_ema=True)["context"], raw)


def test_compile_switch_trains_the_same_unet_and_keeps_the_checkpoint_layout(monkeypatch):
    """model.compile=true: the training step runs through the compiled U-Net (dynamo's eager backend here, so the
    test does not wait for a C++ compiler), gives the plain model's loss, and the state dict (checkpoints) holds the
    U-Net once, under the same keys as without compiling."""
    compile_calls = []
    real_compile = torch.compile

    def eager_compile(module, **kwargs):
        compile_calls.append(module)
        return real_compile(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    plain = tiny_model()
    torch.manual_seed(0)
    compiled = LatentDiffusion(unet_config=UNET, cond_stage_config={"arch": "ldm-tiny-clip"},
                               first_stage_config={"ddconfig": DDCONFIG, "embed_dim": 4}, ema_decay=None,
                               latent_norm="none", compile=True)
    compiled.load_state_dict(plain.state_dict())
    compiled.eval()  # as tiny_model: no caption dropout in either
    assert compile_calls == [compiled.unet]
    assert list(compiled.state_dict()) == list(plain.state_dict())
    legacy = {**plain.state_dict(), **{f"_compiled_unet._orig_mod.{k}": v for k, v in plain.unet.state_dict().items()}}
    compiled.load_state_dict(legacy)  # what compile=true checkpoints held before: the U-Net twice
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a red circle", "a blue square"]}
    losses = []
    for model in (plain, compiled):
        torch.manual_seed(1)  # the posterior sample draws from the global generator
        losses.append(model.diffusion_step(batch, generator=torch.Generator().manual_seed(0))["loss"])
    torch.testing.assert_close(losses[1], losses[0])
    losses[1].backward()
    assert all(p.grad is not None for p in compiled.unet.parameters() if p.requires_grad)
