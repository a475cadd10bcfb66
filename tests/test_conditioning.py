"""The open_clip text encoder (ldm/modules/conditioning.py) and the CLIP text-weight conversion."""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ldm.convert.text_encoder import extract_open_clip_text_state, hf_text_to_open_clip, open_clip_text_to_hf
from ldm.modules.clip_attention import take_attention_products_in_fp32
from ldm.modules.clip_configs import TINY_CLIP_CONFIGS, create_clip_model, register_clip_configs, run_sequence_first
from ldm.modules.conditioning import OpenCLIPTextEncoder
from tests.probes import DispatchedOps

ARCH = "ldm-tiny-clip"
PROMPTS = ["a red circle", "a large blue square in the top left on a white background"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return OpenCLIPTextEncoder(ARCH, layer="penultimate")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_shapes_and_sd2_key_layout(encoder):
    out = encoder.encode(PROMPTS)
    width = TINY_CLIP_CONFIGS[ARCH]["text_cfg"]["width"]
    assert out["context"].shape == (2, 77, width) and encoder.width == width
    assert out["pooled"].shape == (2, TINY_CLIP_CONFIGS[ARCH]["embed_dim"])
    assert out["tokens"].shape == (2, 77) and out["tokens"].dtype == torch.long
    keys = set(encoder.state_dict())
    # the keys of SD 2.x's FrozenOpenCLIPEmbedder below cond_stage_model.
    for key in ("model.token_embedding.weight", "model.positional_embedding", "model.ln_final.weight",
                "model.text_projection", "model.logit_scale", "model.transformer.resblocks.3.attn.in_proj_weight"):
        assert key in keys
    assert not any(k.startswith("model.visual") for k in keys)


def test_layers_follow_open_clip_and_sd2_semantics(encoder):
    tokens = encoder.tokenize(PROMPTS)
    last = OpenCLIPTextEncoder(ARCH, layer="last")
    last.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        pen, fin = encoder(tokens), last(tokens)
        # independent references: open_clip's own forward paths
        ref = encoder.model.forward_intermediates(text=tokens, text_indices=[2], normalize_intermediates=True)
        pooled_ref = encoder.model.encode_text(tokens)
    torch.testing.assert_close(pen["context"], ref["text_intermediates"][0])  # ln_final(h_{L-1}), as SD 2.x
    torch.testing.assert_close(fin["pooled"], pooled_ref)
    torch.testing.assert_close(pen["pooled"], pooled_ref)  # pooled always comes from the last layer
    assert rel_err(pen["context"], fin["context"]) > 0.1  # penultimate != last


def test_long_prompts_are_truncated_with_one_warning_naming_the_prompt(encoder):
    long_prompt = "a red circle " * 40
    before = encoder.tokenizer.num_truncated
    with pytest.warns(UserWarning, match="truncated: 'a red circle a red circle"):
        tokens = encoder.encode([long_prompt, "a cat"])["tokens"]
    assert tokens[0, -1] == encoder.tokenizer.eot and tokens[0, 0] == encoder.tokenizer.sot
    assert (tokens[0] != 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same prompt does not warn twice
        encoder.encode([long_prompt])
    assert encoder.tokenizer.num_truncated == before + 2


def test_truncation_warnings_stop_after_a_limit_but_keep_counting():
    tokenizer = OpenCLIPTextEncoder(ARCH).tokenizer
    prompts = [f"prompt {i} " + "word " * 80 for i in range(tokenizer.max_warnings + 5)]
    with pytest.warns(UserWarning) as record:
        tokenizer(prompts)
    assert len(record) == tokenizer.max_warnings and "only counted" in str(record[-1].message)
    assert tokenizer.num_truncated == len(prompts)


def test_empty_prompt_is_the_unconditional_embedding(encoder):
    out = encoder.encode([""])
    sot, eot = encoder.tokenizer.sot, encoder.tokenizer.eot
    assert out["tokens"][0, :3].tolist() == [sot, eot, 0]
    null = encoder.null_context(3)
    assert null.shape == (3, 77, encoder.width)
    torch.testing.assert_close(null[2], out["context"][0])
    assert not torch.allclose(null[0], encoder.encode(["a red circle"])["context"][0])


def test_pad_with_eot_reproduces_sd1_tokenization():
    enc = OpenCLIPTextEncoder(ARCH, pad_with_eot=True)
    tokens = enc.tokenize(["a red circle"])[0]
    eot = enc.tokenizer.eot
    assert (tokens[5:] == eot).all() and tokens[4] == eot  # sot a red circle eot eot ...


def test_frozen_encoder_has_no_gradients_and_stays_in_eval(encoder):
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not encoder.encode(PROMPTS)["context"].requires_grad


def test_trainable_encoder_passes_gradients():
    enc = OpenCLIPTextEncoder(ARCH, freeze=False)
    enc.train()
    assert enc.training
    enc.encode(PROMPTS)["context"].square().mean().backward()
    assert enc.model.token_embedding.weight.grad.abs().sum() > 0
    assert enc.model.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0


def test_construction_never_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", refuse)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", refuse)
    monkeypatch.setattr(open_clip, "download_pretrained", refuse)
    OpenCLIPTextEncoder(ARCH)
    OpenCLIPTextEncoder("ViT-B-32")  # a real architecture, random weights


def test_hub_tag_offline_asks_for_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="local file"):
        OpenCLIPTextEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(FileNotFoundError, match="neither an existing file nor an open_clip tag"):
        OpenCLIPTextEncoder(ARCH, pretrained="no-such-tag")


def test_loads_an_open_clip_checkpoint_file_and_rejects_the_wrong_arch(tmp_path):
    torch.manual_seed(1)
    full = create_clip_model(ARCH)  # with its image tower, as open_clip saves it
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    enc = OpenCLIPTextEncoder(ARCH, pretrained=str(path))
    tokens = enc.tokenize(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(enc(tokens)["pooled"], full.encode_text(tokens))
    with pytest.raises(ValueError, match="does not fit arch"):
        OpenCLIPTextEncoder("ViT-B-32", pretrained=str(path))


def test_shorter_context_keeps_the_first_positions_of_a_longer_trained_context(tmp_path):
    torch.manual_seed(2)
    full = create_clip_model(ARCH)  # trained with 77 positions
    path = tmp_path / "clip77.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    long, short = OpenCLIPTextEncoder(ARCH, pretrained=str(path)), OpenCLIPTextEncoder(ARCH, str(path), context_length=16)
    a, b = long.encode(PROMPTS), short.encode(PROMPTS)
    assert b["context"].shape[1] == 16
    torch.testing.assert_close(b["context"], a["context"][:, :16])  # causal mask: kept positions are unchanged
    torch.testing.assert_close(b["pooled"], a["pooled"])


def _hf_text_model(layers: int = 4):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=128, intermediate_size=512,
                                      num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                                      hidden_act="quick_gelu", projection_dim=128)
    torch.manual_seed(0)
    return transformers.CLIPTextModel(cfg).eval()


def test_sd1_layout_clip_text_model_matches_transformers(tmp_path):
    hf = _hf_text_model()
    # an SD 1.x single-file checkpoint stores the text model under cond_stage_model.transformer.text_model.
    state = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in hf.state_dict().items()}
    path = tmp_path / "sd1.safetensors"
    save_file(state, str(path))
    for layer in ("last", "penultimate"):
        with pytest.warns(UserWarning, match="no text projection"):
            enc = OpenCLIPTextEncoder(ARCH, pretrained=str(path), layer=layer, quick_gelu=True, pad_with_eot=True)
        out = enc.encode(PROMPTS)
        with torch.no_grad():
            ref = hf(input_ids=out["tokens"], output_hidden_states=True)
        # SD 1.x: last layer after the final norm; SD 2.x penultimate: hidden_states[-2] through the final norm
        expected = ref.last_hidden_state if layer == "last" else hf.final_layer_norm(ref.hidden_states[-2])
        assert rel_err(out["context"], expected) <= 1e-5
        assert rel_err(out["pooled"], ref.pooler_output) <= 1e-5  # identity projection = pooler_output


def test_text_weight_conversion_round_trips_exactly():
    hf = _hf_text_model(layers=2)
    ours = hf_text_to_open_clip(hf.state_dict())
    back = open_clip_text_to_hf(ours, text_model_prefix="")
    assert back.keys() == hf.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())
    prefixed = open_clip_text_to_hf(ours)  # checkpoint-file layout
    assert all(k.startswith("text_model.") for k in prefixed)
    again, layout = extract_open_clip_text_state(prefixed)
    assert "transformers" in layout and all(torch.equal(again[k], v) for k, v in ours.items())
    with pytest.raises(ValueError, match="No CLIP text tower"):
        extract_open_clip_text_state({"foo.weight": torch.zeros(1)})


@pytest.mark.filterwarnings("ignore:.*no text projection")
def test_gelu_arch_warns_on_transformers_weights(tmp_path):
    hf = _hf_text_model()
    path = tmp_path / "text.safetensors"
    save_file(hf.state_dict(), str(path))
    with pytest.warns(UserWarning, match="QuickGELU"):
        OpenCLIPTextEncoder(ARCH, pretrained=str(path))


@pytest.mark.parametrize("name", list(TINY_CLIP_CONFIGS))
def test_tiny_architectures_are_registered_with_open_clip(name):
    cfg = TINY_CLIP_CONFIGS[name]
    register_clip_configs()
    assert name in open_clip.list_models()
    model = create_clip_model(name).eval()  # eval: the ResNet tower's batch norm cannot train on one image
    size = cfg["vision_cfg"]["image_size"]
    with torch.no_grad():
        image = model.encode_image(torch.zeros(1, 3, size, size))
        text = model.encode_text(open_clip.get_tokenizer(name)(["a red circle"]))
    assert image.shape == text.shape == (1, cfg["embed_dim"])


def test_text_towers_are_compared_by_configuration_not_name():
    from ldm.modules.clip_configs import same_text_tower

    assert same_text_tower("ldm-tiny-clip", "ldm-tiny-clip-rn")  # other image tower, same text tower
    assert same_text_tower("ldm-tiny-clip", "ldm-tiny-clip-64")
    assert not same_text_tower("ldm-tiny-clip", "ldm-small-clip")  # width 256 x 6
    assert not same_text_tower("ldm-tiny-clip", "no-such-arch")


def test_towers_run_sequence_first_with_the_same_outputs():
    torch.manual_seed(0)
    clip = create_clip_model(ARCH)
    assert not clip.transformer.batch_first and not clip.visual.transformer.batch_first
    images, tokens = torch.randn(2, 3, 32, 32), open_clip.get_tokenizer(ARCH)(PROMPTS)  # [2, 3, 32, 32], [2, 77]
    encoder = OpenCLIPTextEncoder(ARCH, layer="penultimate")
    with torch.no_grad():
        sequence_first = (clip.encode_image(images), clip.encode_text(tokens), *encoder.encode(PROMPTS).values())
        run_sequence_first(clip, False)
        run_sequence_first(encoder, False)
        batch_first = (clip.encode_image(images), clip.encode_text(tokens), *encoder.encode(PROMPTS).values())
    for ours, theirs in zip(sequence_first, batch_first):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_frozen_text_tower_under_bf16_autocast_never_expands_its_weights():
    """Batch-first, a frozen tower's attention in-projection ran as bmm over the weight expanded per token. Either
    of our changes avoids it on its own: the sequence-first layout (checked with torch's attention, as on a GPU) and
    the fp32-product attention, which projects in the input's layout (the tower as built)."""
    torch.manual_seed(0)
    encoder = OpenCLIPTextEncoder(ARCH, context_length=16)  # frozen, as built
    sequence_first = OpenCLIPTextEncoder(ARCH, context_length=16)
    take_attention_products_in_fp32(sequence_first, False)  # torch's own attention, our layout
    reference = OpenCLIPTextEncoder(ARCH, context_length=16)
    run_sequence_first(reference, False)
    take_attention_products_in_fp32(reference, False)  # open_clip as shipped
    counts = []
    for tower in (encoder, sequence_first, reference):
        with DispatchedOps() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
            tower.encode(PROMPTS)
        counts.append(ops.count("bmm"))
    layers = TINY_CLIP_CONFIGS[ARCH]["text_cfg"]["layers"]
    assert counts == [0, 0, layers], counts  # the reference shows what the layout avoids: one per block
