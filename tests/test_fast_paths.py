"""Fast paths: no host reads of device values in the training step, and speed switches that keep the numbers.

The host-read check runs the step on the ``meta`` device: meta tensors have shapes but no values, so any
``.item()``, ``bool(tensor)``, ``float(tensor)`` or ``.tolist()`` raises, exactly where a CUDA step would wait for
the GPU (``torch.cuda.set_sync_debug_mode("error")`` needs a GPU; this needs none).
"""

from __future__ import annotations

from functools import partial

import hydra
import pytest
import torch
import torch.nn.functional as F

from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.diffusion import LatentDiffusion
from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.unet import UNetModel
from ldm.optim import build_optimizer
from tests.hydra_helpers import CONFIG_DIR
from tests.weights import randomize_

DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=16, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0, norm_num_groups=8)
UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[1, 2], num_head_channels=16, use_spatial_transformer=True, context_dim=128,
            use_linear_in_transformer=True, legacy=False, num_classes="sequential", adm_in_channels=128)


def tiny_ldm(freeze_text: bool = True) -> LatentDiffusion:
    torch.manual_seed(0)
    return LatentDiffusion(unet_config=UNET, cond_stage_config={"arch": "ldm-tiny-clip", "freeze": freeze_text},
                           first_stage_config={"ddconfig": DDCONFIG, "embed_dim": 4}, ema_decay=0.999,
                           latent_norm="per_channel", optimizer=partial(torch.optim.AdamW, lr=1e-3))


def batch(device: str = "cpu") -> dict:
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # [B, 3, H, W]
    return {"image": images.to(device), "caption": ["a red circle", "a blue square", "", "a green triangle"]}


def train_step(model: LatentDiffusion, optimizer: torch.optim.Optimizer, data: dict, i: int) -> torch.Tensor:
    """What Lightning runs per batch (automatic optimisation), EMA update included."""
    optimizer.zero_grad(set_to_none=True)
    loss = model.diffusion_step(data)["loss"]
    loss.backward()
    optimizer.step()
    model.on_train_batch_end(None, data, i)
    return loss


@pytest.mark.parametrize("trainable_text", [False, True])
def test_training_step_reads_no_device_value_after_the_first_batch(trainable_text):
    model = tiny_ldm(freeze_text=not trainable_text)
    model.first_stage_model.weights_loaded = True
    model.train()
    assert not bool(model.latent_stats_ready)  # estimated on the first batch: that batch may read them back
    optimizer = model.configure_optimizers()
    train_step(model, optimizer, batch(), 0)
    assert bool(model.latent_stats_ready) and int(model.model_ema.num_updates) == 1

    model.to("meta")  # from here on every host read of a tensor value raises
    with pytest.raises(RuntimeError, match="meta"):
        bool(model.latent_stats_ready)  # the detector works: this is what the first batch had to do
    optimizer = model.configure_optimizers()  # over the meta parameters (no scheduler configured)
    for i in range(1, 3):
        loss = train_step(model, optimizer, batch("meta"), i)
        assert loss.device.type == "meta" and loss.shape == ()
    assert model.model_ema._host_updates == 3


def test_latent_stats_flag_follows_a_loaded_state_dict():
    trained = tiny_ldm()
    trained._set_latent_stats(torch.zeros(4), torch.full((4,), 2.0))  # scale 1 / 2
    model = tiny_ldm().train()
    model._latents_from_batch(batch())  # a fresh model estimates the statistics on its first batch
    model.load_state_dict(tiny_ldm().state_dict())  # statistics not ready in the loaded state ...
    model._latents_from_batch(batch())  # ... so they are estimated again, not skipped on a stale host flag
    assert bool(model.latent_stats_ready) and not torch.allclose(model.latent_scale, torch.ones(4))
    model.load_state_dict(trained.state_dict())  # ready in the loaded state: kept as loaded
    model._latents_from_batch(batch())
    torch.testing.assert_close(model.latent_scale, torch.full((4,), 0.5))


def test_schedule_checks_timesteps_on_the_device_on_cuda_and_meta():
    schedule = NoiseSchedule.from_config()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    expected = schedule.q_sample(x0, torch.tensor([0, 500, 999]), noise)
    with pytest.raises(ValueError, match=r"Timesteps must lie in \[0, 999\]"):  # CPU: checked on the host
        schedule.q_sample(x0, torch.tensor([0, 1000, 5]), noise)
    meta = NoiseSchedule.from_config().to("meta")  # as on CUDA: a device-side assert, no host read
    out = meta.q_sample(x0.to("meta"), torch.tensor([0, 500, 999], device="meta"), noise.to("meta"))
    assert out.shape == expected.shape and out.device.type == "meta"


def _model_config(model: str, **optimizer_overrides):
    """``cfg.model`` of ``configs/train.yaml`` with ``model=<model>`` and ``model.optimizer.<key>=<value>``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        optimizer = [f"++model.optimizer.{key}={value}" for key, value in optimizer_overrides.items()]
        return compose("train", overrides=[f"model={model}", *optimizer]).model


def _optimizer_from_model_config(model: str = "ldm_tiny", **overrides):
    return hydra.utils.instantiate(_model_config(model, **overrides).optimizer)


def test_the_clip_stage_steps_with_fused_adamw():
    """Stage 0's AdamW walks the 6.3M-parameter token embedding every step: fused, its update is 3.9x faster and
    the quickstart CLIP's step 0.190 -> 0.157 s (BENCHMARKS.md); the update is the one checked against the plain
    loop below."""
    from ldm.models.clip import CLIPModule

    factory = _optimizer_from_model_config("clip_tiny")  # configs/model/clip_tiny.yaml
    assert factory.keywords.get("fused") is True
    optimizer = CLIPModule(arch="ldm-tiny-clip", optimizer=factory).configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert optimizer.defaults["fused"]


def test_the_tiny_autoencoder_and_its_discriminator_step_with_fused_adamw():
    """Stage 1's 154 small tensors cost ~9 for-loop ops each per update, about half the ops of its step; fused, the
    quickstart autoencoder's ``Trainer.fit`` steps 1.04-1.05x faster (BENCHMARKS.md)."""
    model_cfg = _model_config("autoencoder_f4_tiny")  # configs/model/autoencoder_f4_tiny.yaml
    optimizers, _ = hydra.utils.instantiate(model_cfg, _convert_="all").configure_optimizers()
    assert len(optimizers) == 2 and all(optimizer.defaults["fused"] for optimizer in optimizers)


def test_fused_adamw_is_the_quickstart_default_and_matches_the_plain_update():
    assert _optimizer_from_model_config().keywords.get("fused") is True  # configs/model/ldm_tiny.yaml
    factories = {"plain": _optimizer_from_model_config(fused="false"),
                 "foreach": _optimizer_from_model_config(fused="false", foreach="true"),
                 "fused": _optimizer_from_model_config()}
    params = {**UNET, "num_classes": None, "adm_in_channels": None}
    start = randomize_(UNetModel(**params)).state_dict()
    nets = {}
    for name, factory in factories.items():
        net = UNetModel(**params)
        net.load_state_dict(start)
        nets[name] = (net, build_optimizer(factory, net))  # decay / no-decay groups, as configure_optimizers
    assert nets["fused"][1].defaults["fused"] and nets["foreach"][1].defaults["foreach"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # the same gradients for every implementation: only the update arithmetic differs
        grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in nets["plain"][0].parameters()]
        for net, optimizer in nets.values():
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    plain = torch.cat([p.detach().flatten() for p in nets["plain"][0].parameters()])
    for name in ("foreach", "fused"):
        other = torch.cat([p.detach().flatten() for p in nets[name][0].parameters()])
        torch.testing.assert_close(other, plain, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    moved = plain - torch.cat([p.flatten() for p in start.values() if p.is_floating_point()])
    assert moved.abs().max() > 1e-3  # three steps of lr 1e-3 moved the weights: the comparison is not vacuous


def test_channels_last_unet_matches_the_contiguous_one():
    torch.manual_seed(0)
    params = {**UNET, "num_classes": None, "adm_in_channels": None}
    plain = randomize_(UNetModel(**params))
    fast = randomize_(UNetModel(**params)).to(memory_format=torch.channels_last)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 128)
    out_plain = plain(x, t, ctx)
    out_fast = fast(x.contiguous(memory_format=torch.channels_last), t, ctx)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-5)
    out_plain.square().mean().backward()
    out_fast.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_cpu_bf16_autocast_takes_attention_in_fp32(monkeypatch):
    """Under ``torch.autocast("cpu", bfloat16)`` (``trainer.precision=bf16-mixed`` on a CPU) the matrix products run in
    bf16 but SDPA gets fp32 inputs (the CPU's bf16 flash-attention kernels are the slow ones); GEGLU's GELU takes the
    bf16 projection as it is (no fp32 round trip); without autocast every call sees the model's own dtype."""
    seen = {"sdpa": [], "gelu": []}
    sdpa, gelu = F.scaled_dot_product_attention, F.gelu
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen["sdpa"].append((q.dtype, k.dtype, v.dtype)) or sdpa(q, k, v, **kw))
    monkeypatch.setattr(F, "gelu", lambda x, *a, **kw: seen["gelu"].append(x.dtype) or gelu(x, *a, **kw))
    torch.manual_seed(0)
    unet = randomize_(UNetModel(**{**UNET, "num_classes": None, "adm_in_channels": None}))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 128)
    reference = unet(x, t, ctx)
    assert seen["sdpa"] and seen["gelu"] and all(d == torch.float32 for s in seen["sdpa"] for d in s)
    seen["sdpa"].clear(), seen["gelu"].clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, ctx)
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    assert len(seen["sdpa"]) == 2 * blocks and len(seen["gelu"]) == blocks  # self + cross attention, GEGLU
    assert all(d == torch.float32 for s in seen["sdpa"] for d in s) and set(seen["gelu"]) == {torch.bfloat16}
    # the result is still the bf16-mixed one: close to fp32 at bf16 precision, and it trains
    assert ((out.float() - reference).norm() / reference.norm()).item() < 3e-2
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters() if p.requires_grad)
