"""Cross-attention maps (ldm/modules/attention_maps.py, scripts/plot_attention.py): the recorded weights are the
ones the layer applies, they land on the pixels that match a token, and recording changes no output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.models.diffusion import LatentDiffusion
from ldm.modules.attention import CrossAttention
from ldm.modules.attention_maps import CrossAttentionRecorder, attention_probs
from ldm.modules.unet import UNetModel
from tests.script_loader import load_script
from tests.test_latent_diffusion import DDCONFIG, POOLED, UNET
from tests.weights import randomize_


def test_recorded_weights_are_the_ones_the_layer_applies():
    torch.manual_seed(0)
    layer = CrossAttention(32, context_dim=24, heads=4, dim_head=8).eval()
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)  # [B, N, C], [B, M, D]
    probs = attention_probs(layer, x, context)  # [B, H, N, M]
    assert probs.shape == (2, 4, 10, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 10))
    v = layer.to_v(context).view(2, 7, 4, 8).transpose(1, 2)  # [B, H, M, d]
    merged = (probs @ v).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(layer.to_out(merged), layer(x, context=context), rtol=1e-5, atol=1e-5)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])  # [B, M]: the second prompt is 4 tokens long
    probs = attention_probs(layer, x, context, mask)
    assert (probs[1, ..., 4:] == 0).all()
    merged = (probs @ v).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(layer.to_out(merged), layer(x, context=context, mask=mask), rtol=1e-5, atol=1e-5)


class PixelsAttendToText(nn.Module):
    """x [B, C, h, w] -> the pixels as tokens -> one cross-attention to the context."""

    def __init__(self, channels: int):
        super().__init__()
        self.attn = CrossAttention(channels, context_dim=channels, heads=1, dim_head=channels)
        with torch.no_grad():  # q = k = identity: a pixel attends to the token equal to its feature
            for proj in (self.attn.to_q, self.attn.to_k, self.attn.to_v):
                proj.weight.copy_(torch.eye(channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.attn(x.flatten(2).transpose(1, 2), context=context)


def test_a_token_map_lights_up_the_pixels_that_match_the_token():
    channels, h, w = 4, 4, 6
    x = torch.zeros(1, channels, h, w)
    x[:, 1] = 6.0  # every pixel looks like token 1 ...
    x[:, 1, 0, :] = 0.0
    x[:, 0, 0, :] = 6.0  # ... except the top row, which looks like token 0
    context = torch.eye(channels)[None, :3]  # [1, M=3, C]: token i = e_i
    model = PixelsAttendToText(channels)
    with CrossAttentionRecorder(model) as recorder:
        model(x, context)
    maps = recorder.token_maps()  # [1, 3, h, w]
    assert maps.shape == (1, 3, h, w)
    assert (maps[0, 0, 0] > 0.9).all() and (maps[0, 0, 1:] < 0.1).all()  # token 0: the top row, not a column
    assert (maps[0, 1, 1:] > 0.9).all() and (maps[0, 1, 0] < 0.1).all()
    assert (maps[0, 2] < 0.1).all()  # token 2 matches no pixel


def test_recording_a_unet_changes_nothing_and_maps_every_text_token():
    torch.manual_seed(0)
    unet = randomize_(UNetModel(**UNET)).eval()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 128)
    with torch.no_grad():
        plain = unet(x, t, context=context)
        with CrossAttentionRecorder(unet) as recorder:
            recorded = unet(x, t, context=context)
            unet(x, t, context=context)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    transformers = sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))
    assert len(recorder.records) == 2 * transformers  # two calls, every cross-attention (8x8 and 4x4 levels)
    maps = recorder.token_maps()
    assert maps.shape == (2, 5, 8, 8)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 8, 8))  # a distribution over the tokens at each pixel
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())  # hooks removed on exit
    with torch.no_grad():
        unet(x, t, context=context)
    assert len(recorder.records) == 2 * transformers


def test_misuse_names_the_problem():
    torch.manual_seed(0)
    unet = randomize_(UNetModel(**UNET)).eval()
    with pytest.raises(RuntimeError, match="nothing recorded"):
        CrossAttentionRecorder(unet).token_maps()
    with torch.no_grad(), CrossAttentionRecorder(unet):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), context=torch.randn(1, 3, 128))
        with pytest.raises(ValueError, match="one latent size at a time"):
            unet(torch.randn(1, 4, 16, 16), torch.tensor([1]), context=torch.randn(1, 3, 128))


def test_plot_attention_script_draws_one_map_per_word(tmp_path):
    torch.manual_seed(0)
    model = LatentDiffusion(unet_config={**UNET, **POOLED}, cond_stage_config={"arch": "ldm-tiny-clip"},
                            first_stage_config={"ddconfig": DDCONFIG, "embed_dim": 4}, ema_decay=None)
    randomize_(model.unet)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "tiny.ckpt")
    script = load_script("plot_attention")
    assert [text for _, text in script.word_tokens(model, "a red circle")] == ["a", "red", "circle"]
    out = script.main(["--ckpt", str(tmp_path / "tiny.ckpt"), "--prompt", "a red circle", "--prompt", "a cyan square",
                       "--steps", "2", "--timesteps", "10", "900", "--out", str(tmp_path / "maps.png")])
    assert out.stat().st_size > 0
