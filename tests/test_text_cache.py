"""Cached text embeddings: scripts/encode_latents.py text_encoder=... stores what the frozen text encoder computes,
stage 2 uses them instead of the encoder with the same loss (caption dropout included), a cache of another text
encoder or a trainable text encoder is refused, bad text tensors are skipped, and train.py fits from the cache."""

from __future__ import annotations

import contextlib
import json
import tarfile
from pathlib import Path

import hydra
import pytest
import torch
import webdataset as wds
from safetensors.torch import save as save_tensors

from ldm.data.latents import LATENTS_KEY, LatentDataModule, load_text_uncond, moments_bytes
from ldm.models.text_cache import (TextSourceMismatch, TrainableTextEncoderError, check_text_sources,
                                   text_encoder_identity)
from ldm.modules.conditioning import OpenCLIPTextEncoder
from ldm.utils.run import ConfigError
from tests.hydra_helpers import tiny_shards
from tests.test_latent_cache import BATCH, autoencoder_checkpoint, compose_encode, compose_ldm, encode_script, read_all
from train import train


def clip_checkpoint(path: Path, seed: int) -> str:
    """A stage-0 CLIP checkpoint (text tower of configs/model/ldm_tiny.yaml's arch at a seeded init), saved as
    ldm.models.clip.CLIPModule is: weights under ``model.``, ``arch`` in the hyper-parameters."""
    torch.manual_seed(seed)
    encoder = OpenCLIPTextEncoder("ldm-tiny-clip")
    state = {f"model.{k}": v for k, v in encoder.model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"arch": "ldm-tiny-clip"}}, path)
    return str(path)


@pytest.fixture(scope="module")
def cache(tiny_data_root, tmp_path_factory) -> dict:
    """Tiny shapes32 shards (128 train / 32 val) encoded by a seeded autoencoder and a seeded stage-0 text tower."""
    root = tmp_path_factory.mktemp("text_cache")
    image_shards = tiny_shards({"source": "shapes", "kwargs": {"resolution": 32, "seed": 0}}, tiny_data_root)
    ckpt, clip = autoencoder_checkpoint(root / "ae.ckpt", seed=0), clip_checkpoint(root / "clip.ckpt", seed=0)
    summaries = encode_script.encode(compose_encode(ckpt, root / "latents", image_shards, f"text_encoder={clip}"))
    return {"ckpt": ckpt, "clip": clip, "root": root, "summaries": summaries,
            "train": summaries["train"]["pattern"], "val": summaries["val"]["pattern"]}


# text_encoder=<a stage-0 CLIP checkpoint> caches 77 tokens; quickstart_ldm reads 32 (scripts/pipeline.sh encodes
# with its settings): the models here read what the cache holds
CACHE_CONTEXT = "model.cond_stage_config.context_length=77"


def ldm(cache: dict, *overrides: str):
    """The quickstart LatentDiffusion with the cache's autoencoder and text encoder."""
    cfg = compose_ldm(cache, Path("unused"), cache["ckpt"], f"model.cond_stage_config.pretrained={cache['clip']}",
                      CACHE_CONTEXT, *overrides)
    return hydra.utils.instantiate(cfg.model, _convert_="all")


def test_caption_features_encode_each_distinct_caption_once_within_the_memory_bound(tmp_path):
    encoder, identity = encode_script.load_text_encoder(clip_checkpoint(tmp_path / "clip.ckpt", seed=1))
    text = (encoder.eval(), identity)
    calls = []
    original = encoder.encode
    encoder.encode = lambda captions: calls.append(list(captions)) or original(captions)
    batches = [["a red circle", "a blue square", "a red circle"], ["a blue square", "a green triangle", ""]]
    row_mb = (77 * 128 + 128) * 4 / 2**20  # one caption's context + pooled, float32
    bounds = ((1.0, ["a green triangle", ""]), (1.5 * row_mb, ["a blue square", "a green triangle", ""]))
    for max_mb, second_call in bounds:
        calls.clear()
        features = encode_script.CaptionFeatures(text, contextlib.nullcontext(), max_mb)
        for captions in batches:
            got = features(captions)
            with torch.no_grad():
                want = original(captions)
            torch.testing.assert_close(got["text_context"], want["context"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["text_pooled"], want["pooled"], rtol=1e-5, atol=1e-5)
        # repeats within a batch are encoded once; across batches only while they fit in max_mb (one row here)
        assert calls == [["a red circle", "a blue square"], second_call], calls
        assert features.requested == 6 and features.encoded == 2 + len(second_call)
        assert features.bytes <= max_mb * 2**20


def test_cached_text_equals_the_online_encoding(cache):
    encoder, identity = encode_script.load_text_encoder(cache["clip"])
    assert identity["checkpoint_kind"] == "clip" and identity["context_shape"] == [77, 128]
    batches = read_all(LatentDataModule(None, cache["val"], batch_size=BATCH))
    assert sum(len(b["caption"]) for b in batches) == 32
    for batch in batches:
        online = encoder.encode(batch["caption"])
        assert batch["text_context"].dtype == torch.float16 and batch["text_context"].shape == (BATCH, 77, 128)
        torch.testing.assert_close(batch["text_context"].float(), online["context"], rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(batch["text_pooled"].float(), online["pooled"], rtol=1e-3, atol=2e-3)
        assert all(source == identity for source in batch["text_source"])
    assert batches[0]["latent_mean"].shape == (BATCH, 4, 8, 8)  # the latents are still there

    null = encoder.encode([""])
    for split in ("train", "val"):
        context, pooled, source = load_text_uncond(cache["summaries"][split]["text_uncond"])
        torch.testing.assert_close(context.float(), null["context"][0], rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(pooled.float(), null["pooled"][0], rtol=1e-3, atol=2e-3)
        assert source == identity == cache["summaries"][split]["text_source"]


def test_cached_text_gives_the_online_loss_with_caption_dropout(cache):
    torch.manual_seed(0)
    model = ldm(cache)
    for weight in model.unet.parameters():  # zero-initialised output layers would make the loss ignore the text
        if not weight.any():
            torch.nn.init.normal_(weight, std=0.2)
    for name, weight in model.unet.named_parameters():  # and a strong text path, so the check below has teeth
        if ".attn2.to_v." in name or ".attn2.to_out.0.weight" in name:
            torch.nn.init.normal_(weight, std=1.0)
    batch = read_all(LatentDataModule(None, cache["val"], batch_size=BATCH))[0]
    online_batch = {k: v for k, v in batch.items() if not k.startswith("text_")}
    contexts, text_calls = [], []
    model.unet.register_forward_pre_hook(lambda m, args, kwargs: contexts.append(kwargs["context"]), with_kwargs=True)
    model.cond_stage_model.register_forward_hook(lambda *args: text_calls.append(1))
    null = model.cond_stage_model.encode([""])["context"][0]  # [L, D]

    def loss(b: dict) -> torch.Tensor:
        torch.manual_seed(0)  # same posterior sample, dropped captions, timesteps and noise
        return model.diffusion_step(b, generator=torch.Generator().manual_seed(0))["loss"]

    model.train()
    losses = []
    for p in (0.5, 1.0):
        model.hparams.cond_drop_prob = p  # 1.0 is refused at construction; set here to drop every caption
        calls = len(text_calls)
        cached_loss = loss(batch)
        assert len(text_calls) - calls <= 1  # only the empty prompt, once
        online_loss = loss(online_batch)
        torch.testing.assert_close(cached_loss, online_loss, rtol=1e-4, atol=0)  # float16 text: ~4e-7 here
        losses.append(online_loss.item())
        cached, online = contexts[-2], contexts[-1]  # [B, L, D] the U-Net received
        dropped = [torch.equal(row, null) for row in cached]
        assert dropped == [torch.allclose(row, null, atol=1e-6) for row in online]
        kept = ~torch.tensor(dropped)
        torch.testing.assert_close(cached[kept], batch["text_context"][kept].float())
        assert 0 < sum(dropped) < BATCH if p == 0.5 else all(dropped)
    torch.testing.assert_close(cached_loss, online_loss, rtol=1e-5, atol=0)  # p=1: both use the same null prompt
    assert abs(losses[0] / losses[1] - 1) > 1e-2  # the text changes the loss (measured 0.22): the comparison has teeth


def test_a_cache_of_another_text_encoder_is_refused_naming_both(cache, tmp_path):
    other = clip_checkpoint(tmp_path / "other_clip.ckpt", seed=1)
    with pytest.raises(TextSourceMismatch) as info:
        train(compose_ldm(cache, tmp_path, cache["ckpt"], f"model.cond_stage_config.pretrained={other}", CACHE_CONTEXT))
    message = str(info.value)
    assert cache["clip"] in message and other in message and "encode_latents.py" in message
    assert cache["summaries"]["train"]["text_source"]["weights_sha256"][:16] in message
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # refused at the first batch, nothing trained

    identity = cache["summaries"]["train"]["text_source"]  # same weights, another layer: another encoder
    with pytest.raises(TextSourceMismatch, match="layer=penultimate"):
        check_text_sources([identity], {**identity, "layer": "penultimate"})
    # the same text tower under another architecture name (another image tower) is the same encoder
    check_text_sources([identity], {**identity, "arch": "ldm-tiny-clip-rn"})
    with pytest.raises(TextSourceMismatch, match="ldm-small-clip"):
        check_text_sources([identity], {**identity, "arch": "ldm-small-clip"})


def test_a_trainable_text_encoder_is_refused(cache, tmp_path):
    model = ldm(cache, "model.cond_stage_config.freeze=false")
    batch = read_all(LatentDataModule(None, cache["val"], batch_size=BATCH))[0]
    model.train()
    with pytest.raises(TrainableTextEncoderError, match="freeze=false"):
        model.diffusion_step(batch)
    # nor does the script cache a text encoder that its checkpoint trains
    trains_text = tmp_path / "ldm_trains_text.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {
        "unet_config": {}, "cond_stage_config": {"arch": "ldm-tiny-clip", "freeze": False}}}, trains_text)
    with pytest.raises(ConfigError, match="freeze=false"):
        encode_script.load_text_encoder(str(trains_text))
    with pytest.raises(ConfigError, match="freeze=false"):
        encode_script.load_text_encoder({"arch": "ldm-tiny-clip", "pretrained": cache["clip"], "freeze": False})


def test_bad_text_tensors_are_skipped_and_counted(cache, tmp_path):
    with tarfile.open(cache["summaries"]["val"]["shards"][0]) as tar:
        good = {}
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            good.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    samples = list(good.values())[:6]
    template = samples[0]
    mean, context, pooled = torch.zeros(4, 8, 8), torch.zeros(77, 128), torch.zeros(128)
    meta = json.loads(template["json"])
    meta.pop("text_source")

    def payload(**text: torch.Tensor) -> bytes:
        return moments_bytes(mean, mean, text)

    broken = [
        {**template, "__key__": "short_context", LATENTS_KEY: payload(text_context=context[:10], text_pooled=pooled)},
        {**template, "__key__": "flat_context", LATENTS_KEY: payload(text_context=context.flatten(),
                                                                      text_pooled=pooled)},
        {**template, "__key__": "nan_pooled", LATENTS_KEY: payload(text_context=context, text_pooled=pooled / 0)},
        {**template, "__key__": "int_context", LATENTS_KEY: save_tensors(
            {"mean": mean.half(), "logvar": mean.half(), "text_context": context.long(),
             "text_pooled": pooled.half()})},
        {**template, "__key__": "no_pooled", LATENTS_KEY: save_tensors(
            {"mean": mean.half(), "logvar": mean.half(), "text_context": context.half()})},
        {**template, "__key__": "no_text", LATENTS_KEY: moments_bytes(mean, mean)},  # .json names a text encoder
        {**template, "__key__": "anonymous_text", "json": json.dumps(meta).encode()},  # text without text_source
    ]
    shard = tmp_path / "val-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as sink:
        for sample in samples + broken:
            sink.write(sample)
    batches = read_all(LatentDataModule(None, str(shard), batch_size=4))
    assert [len(b["caption"]) for b in batches] == [4, 2] and batches[0]["text_context"].shape == (4, 77, 128)
    assert sum(int(b["n_skipped"]) for b in batches) == len(broken)
    assert not {s["__key__"] for s in broken} & {k for b in batches for k in b["key"]}

    mixed = tmp_path / "mixed-000000.tar"  # a stream of text and latent-only samples is a configuration error
    with wds.TarWriter(str(mixed), encoder=False) as sink:
        for sample in samples[:2]:
            sink.write(sample)
        sink.write({**template, "__key__": "latent_only", LATENTS_KEY: moments_bytes(mean, mean),
                    "json": json.dumps(meta).encode()})
    with pytest.raises(ValueError, match="with and without text"):
        read_all(LatentDataModule(None, str(mixed), batch_size=4))


def test_train_py_fits_stage_2_from_a_text_and_latent_cache(cache, tmp_path):
    cfg = compose_ldm(cache, tmp_path, cache["ckpt"], f"model.cond_stage_config.pretrained={cache['clip']}",
                      CACHE_CONTEXT)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 3 and (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    # the stage-2 checkpoint's text encoder is the cache's: it can re-encode (text_encoder=<ldm ckpt>) the same cache
    encoder, identity = encode_script.load_text_encoder(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert identity["checkpoint_kind"] == "diffusion"
    check_text_sources([cache["summaries"]["train"]["text_source"]], identity)
    assert identity["weights_sha256"] == text_encoder_identity(objects["model"].cond_stage_model)["weights_sha256"]


def test_the_in_memory_text_cache_serves_what_the_stream_does(cache):
    from tests.test_latent_cache import memory_and_stream_agree

    memory_and_stream_agree(cache["train"], 128)
