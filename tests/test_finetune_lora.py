"""Fine-tuning from a project checkpoint and LoRA adapters: exact starts, only adapters train, files round-trip,
merged weights sample as the adapters do, the recipes run through train.py, the new-word data and its reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm.convert.checkpoint import save_project_checkpoint
from ldm.finetune import latent_diffusion_from_ldm_checkpoint
from ldm.lora import apply_adapter, has_lora, inject_lora, load_lora_state_dict, merge_lora, read_adapter, save_adapter
from ldm.models.diffusion import LatentDiffusion, load_latent_diffusion
from ldm.modules.unet import UNetModel
from tests.weights import randomize_

# 32 px images -> 8x8x4 latents (the tiny shards of the test suite), ldm-tiny-clip text (width 128)
DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=16, ch_mult=[1, 2, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0, norm_num_groups=8)
UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[1, 2], num_head_channels=16, use_spatial_transformer=True, context_dim=128,
            num_classes="sequential", adm_in_channels=128, use_linear_in_transformer=True, legacy=False)
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
PROMPTS = ["a red wedge", "a blue circle"]


def adam(lr: float = 1e-2):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    """A base checkpoint with a trained (unfrozen) text encoder and EMAs that differ from the raw weights."""
    torch.manual_seed(0)
    model = LatentDiffusion(unet_config=UNET, cond_stage_config={"arch": "ldm-tiny-clip", "freeze": False},
                            first_stage_config={"ddconfig": DDCONFIG, "embed_dim": 4}, ema_decay=0.9,
                            latent_norm="none")
    randomize_(model.unet)  # SD zero-initialises output layers: random weights make every path visible
    randomize_(model.ema_unet, seed=1)  # and the EMA differs from the raw weights
    with torch.no_grad():
        model.cond_stage_model.model.token_embedding.weight.mul_(1.5)  # raw text != its EMA
        model.first_stage_model.latent_mean.zero_()  # stage-1 latent statistics
        model.first_stage_model.latent_std.fill_(1.0)
    model.first_stage_model.weights_loaded = True
    path = tmp_path_factory.mktemp("base") / "base.ckpt"
    save_project_checkpoint(model, path)
    return path


def unet_inputs(model: LatentDiffusion, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = model.encode_conditioning(PROMPTS, use_ema=False)
    return {"x": torch.randn(2, 4, 8, 8, generator=gen), "timesteps": torch.tensor([10, 600]), **cond}


def train_steps(model: LatentDiffusion, steps: int = 3) -> None:
    """A few optimizer steps of the model's own loss on random latents (configure_optimizers as Lightning does)."""
    optimizer = model.configure_optimizers()
    model.train()
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        batch = {"latent_mean": torch.randn(4, 4, 8, 8, generator=gen), "latent_logvar": torch.full((4, 4, 8, 8), -8.0),
                 "caption": ["a red wedge", "a blue wedge", "a red circle", ""]}
        loss = model.diffusion_step(batch, generator=gen)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def lora_model(base_ckpt: Path) -> LatentDiffusion:
    return latent_diffusion_from_ldm_checkpoint(str(base_ckpt), lora=LORA, ema_decay=None, optimizer=adam()).eval()


# ---------------------------------------------------------------------------------------------- fine-tuning starts
def test_init_from_a_project_checkpoint_loads_exactly(base_ckpt):
    saved = torch.load(base_ckpt, weights_only=True)["state_dict"]
    raw = latent_diffusion_from_ldm_checkpoint(str(base_ckpt), init_ema=False, ema_decay=0.99)
    state = raw.state_dict()
    for key, value in saved.items():  # every live tensor is the file's; the EMAs restart from the live weights
        if not key.startswith(("model_ema.", "cond_stage_ema.")):
            assert torch.equal(state[key], value), key
    assert torch.equal(state["model_ema.shadow.diffusion_model.out.2.weight"], saved["model.diffusion_model.out.2.weight"])
    assert int(state["model_ema.num_updates"]) == 0 and raw.model_ema.decay == 0.99

    ema = latent_diffusion_from_ldm_checkpoint(str(base_ckpt), init_ema=True).state_dict()
    for key, value in saved.items():  # init_ema: the sampling pair, EMA U-Net with the EMA text encoder
        if key.startswith("model_ema.shadow.diffusion_model."):
            assert torch.equal(ema["model." + key.removeprefix("model_ema.shadow.")], value), key
        if key.startswith("cond_stage_ema.shadow."):
            assert torch.equal(ema["cond_stage_model." + key.removeprefix("cond_stage_ema.shadow.")], value), key
    token = "cond_stage_model.model.token_embedding.weight"
    assert not torch.equal(ema[token], saved[token])  # the raw text encoder was not taken


def test_bad_starts_fail_clearly(base_ckpt, tmp_path):
    with pytest.raises(ValueError, match="ema_decay=null"):
        latent_diffusion_from_ldm_checkpoint(str(base_ckpt), lora=LORA)  # LoRA with the base's EMA decay
    with pytest.raises(ValueError, match="keeps the text encoder frozen"):
        latent_diffusion_from_ldm_checkpoint(str(base_ckpt), lora=LORA, ema_decay=None,
                                             cond_stage_config={"freeze": False})
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        latent_diffusion_from_ldm_checkpoint(str(base_ckpt), lora={"rank": 0}, ema_decay=None)
    with pytest.raises(ValueError, match="matched no layer"):
        latent_diffusion_from_ldm_checkpoint(str(base_ckpt), lora={"rank": 2, "target_modules": ["qkv"]}, ema_decay=None)
    torch.save({"state_dict": {}, "hyper_parameters": {"ddconfig": {}}}, tmp_path / "ae.ckpt")
    with pytest.raises(ValueError, match="not a latent-diffusion checkpoint"):
        latent_diffusion_from_ldm_checkpoint(str(tmp_path / "ae.ckpt"))


# ---------------------------------------------------------------------------------------------- LoRA
def plain_unet(state: dict, prefix: str) -> UNetModel:
    """A U-Net without adapters holding the ``prefix`` tensors of a checkpoint's state dict (the reference)."""
    unet = UNetModel(**UNET)
    unet.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return unet.eval()


@pytest.fixture(scope="module")
def lora_run(base_ckpt, tmp_path_factory) -> dict:
    """A LoRA model on the base, its outputs before and after 3 training steps, and its saved adapter file."""
    model = lora_model(base_ckpt)
    inputs = unet_inputs(model)
    with torch.no_grad():
        initial = model.unet(**inputs)
    train_steps(model)
    with torch.no_grad():
        trained = model.unet(**inputs)
    adapter, meta = save_adapter(model.unet, tmp_path_factory.mktemp("lora") / "lora_adapter.safetensors", LORA,
                                 base={"weights": "ema"})
    return {"model": model, "inputs": inputs, "initial": initial, "trained": trained, "adapter": adapter, "meta": meta}


def test_lora_starts_as_a_no_op_and_only_adapters_train(base_ckpt, lora_run):
    model = lora_run["model"]
    base = plain_unet(torch.load(base_ckpt, weights_only=True)["state_dict"], "model_ema.shadow.diffusion_model.")
    with torch.no_grad():  # B = 0: the adapted U-Net computes exactly the base (EMA) U-Net
        torch.testing.assert_close(lora_run["initial"], base(**lora_run["inputs"]), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 4 * 2 * 7  # A, B x 4 projections x 2 attentions x 7 transformer blocks
    assert model.cond_stage_model.frozen and model.model_ema is None and model.cond_stage_ema is None
    optimizer = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    # training moved the outputs and left every base weight as the file has it
    assert (lora_run["trained"] - lora_run["initial"]).abs().max() > 1e-4
    base_layers = {k.replace(".base_layer", ""): v for k, v in model.unet.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_layers.items())


def test_adapter_file_round_trips_and_merges_into_the_base(base_ckpt, lora_run):
    model, inputs = lora_run["model"], lora_run["inputs"]
    state, info = read_adapter(lora_run["adapter"])
    assert info["rank"] == 4 and info["alpha"] == 8.0 and json.loads(lora_run["meta"].read_text()) == info
    live = model.unet.state_dict()
    assert sorted(state) == sorted(k.replace(".default.", ".") for k in live if ".lora_" in k)
    assert all(torch.equal(v, live[k.replace(".weight", ".default.weight")]) for k, v in state.items())

    # sampling's route: the base file (its EMA U-Net samples) + the adapter file, merged
    sampler = load_latent_diffusion(str(base_ckpt))
    apply_adapter(sampler, lora_run["adapter"], scale=1.0, use_ema=True)
    assert not has_lora(sampler.ema_unet) and sorted(sampler.ema_unet.state_dict()) == sorted(UNetModel(**UNET).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(sampler.ema_unet(**inputs), lora_run["trained"], rtol=1e-4, atol=1e-5)

    # lora_scale: W + scale * (alpha / r) * B A, layer by layer
    half = plain_unet(torch.load(base_ckpt, weights_only=True)["state_dict"], "model_ema.shadow.diffusion_model.")
    inject_lora(half, LORA)
    load_lora_state_dict(half, state)
    merge_lora(half, scale=0.5)
    layer = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    lora = model.unet.get_submodule(layer)
    delta = 0.5 * (8 / 4) * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    torch.testing.assert_close(half.get_submodule(layer).weight, lora.base_layer.weight + delta)


def test_merge_lora_script_writes_the_trained_model(base_ckpt, lora_run, tmp_path):
    from scripts.merge_lora import main as merge_main

    model = lora_run["model"]
    # the Lightning checkpoint of a LoRA run: hyper-parameters carry model.lora, so it reloads with its adapters
    run_ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(run_ckpt)
    torch.save(run_ckpt, tmp_path / "last.ckpt")
    for args in ([str(base_ckpt), str(tmp_path / "a.ckpt"), "--lora", str(lora_run["adapter"])],
                 [str(tmp_path / "last.ckpt"), str(tmp_path / "b.ckpt")]):
        merged = torch.load(merge_main(args), weights_only=True)
        assert merged["hyper_parameters"]["lora"] is None
        unet = plain_unet(merged["state_dict"], "model.diffusion_model.")  # strict: the original keys only
        with torch.no_grad():
            torch.testing.assert_close(unet(**lora_run["inputs"]), lora_run["trained"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="holds no LoRA adapters"):
        merge_main([str(tmp_path / "a.ckpt"), str(tmp_path / "c.ckpt")])


def test_full_finetune_trains_unet_and_text_with_fresh_ema(base_ckpt):
    model = latent_diffusion_from_ldm_checkpoint(str(base_ckpt), ema_decay=0.5, optimizer=adam(1e-3))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, steps=1)
    model.on_train_batch_end(None, None, 0)  # the EMA update Lightning runs after each step
    after = model.state_dict()
    for prefix in ("model.diffusion_model.", "cond_stage_model.", "model_ema.shadow.", "cond_stage_ema.shadow."):
        assert any(not torch.equal(after[k], start[k]) for k in after if k.startswith(prefix)), prefix
    assert all(torch.equal(after[k], start[k]) for k in after if k.startswith("first_stage_model."))


# ---------------------------------------------------------------------------------------------- recipes
def test_lora_recipe_trains_and_writes_its_adapter(compose_train, base_ckpt):
    from train import train

    cfg = compose_train(["experiment=quickstart_lora", f"init_from={base_ckpt}", "trainer.max_steps=2",
                         "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "data.batch_size=4",
                         "callbacks.sample_grid=null", "logger=csv"])
    assert cfg.model.lora.rank == 8 and cfg.model.ema_decay is None and "shape_wordstriangle" in cfg.data.train_shards
    _, objects = train(cfg)
    adapter = Path(cfg.paths.output_dir, "checkpoints", "lora_adapter.safetensors")
    state, info = read_adapter(adapter)
    assert info["base"]["path"] == str(base_ckpt.resolve()) and len(info["base"]["sha256"]) == 64
    assert info["base"]["weights"] == "ema" and info["global_step"] == 2
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_b)  # the adapter moved away from its no-op start
    last = load_latent_diffusion(str(Path(cfg.paths.output_dir, "checkpoints", "last.ckpt")))
    assert has_lora(last.unet) and last.hparams["lora"]["rank"] == 8


def test_sample_script_merges_an_adapter(base_ckpt, lora_run, tmp_path):
    from PIL import Image

    from tests.script_loader import load_script
    from tests.test_img2img_inpaint import compose_sample

    out = tmp_path / "out"
    cfg = compose_sample([f"ckpt={base_ckpt}", "prompt=a red wedge", "n=1", "steps=2", f"lora={lora_run['adapter']}",
                          "lora_scale=0.5"], out)
    load_script("sample").main(cfg)
    meta = json.loads(Image.open(next(out.glob("0000*.png"))).text["parameters"])
    assert meta["lora"] == "lora_adapter.safetensors" and meta["lora_scale"] == 0.5 and len(meta["lora_sha256"]) == 10


# ---------------------------------------------------------------------------------------------- new-word data
def test_new_word_captions_and_their_reading():
    from ldm.data.synthetic import ShapesSource
    from ldm.evaluation.prompt_accuracy import expected_shape_attributes

    source = ShapesSource(12, shapes=["triangle"], shape_words={"triangle": "Wedge"})
    for i in range(len(source)):
        sample = source[i]
        assert "wedge" in sample["caption"] and "triangle" not in sample["caption"]
        assert sample["meta"]["shape"] == "triangle"
    assert source.prompts()[0] == "a red wedge"
    with pytest.raises(ValueError, match="shape_words"):
        ShapesSource(4, shape_words={"hexagon": "hex"})
    # rehearsal: a replay_fraction of the samples is drawn as without the subset and the new word
    mixed = ShapesSource(200, shapes=["triangle"], shape_words={"triangle": "wedge"}, replay_fraction=0.5)
    samples = [mixed[i] for i in range(len(mixed))]
    replayed = [s for s in samples if s["meta"]["replay"]]
    assert 70 < len(replayed) < 130 and {s["meta"]["shape"] for s in replayed} == {"circle", "square", "triangle"}
    assert all("wedge" not in s["caption"] and s["meta"]["shape"] in s["caption"] for s in replayed)
    assert all("wedge" in s["caption"] for s in samples if not s["meta"]["replay"])
    assert expected_shape_attributes("a red wedge") is None
    assert expected_shape_attributes("a red wedge", {"wedge": "triangle"}) == {"color": "red", "shape": "triangle"}
    assert expected_shape_attributes("a blue circle", {"wedge": "triangle"}) == {"color": "blue", "shape": "circle"}
    with pytest.raises(ValueError, match="shape_aliases"):
        expected_shape_attributes("a red wedge", {"wedge": "hexagon"})


def test_finetune_recipe_trains_the_text_tower_of_a_base_that_kept_it_frozen(compose_train, tmp_path):
    """The quickstart's stage 2 keeps the stage-0 text tower frozen; a frozen tower cannot give a new word features."""
    from hydra.utils import instantiate

    torch.manual_seed(0)
    base = LatentDiffusion(unet_config=UNET, cond_stage_config={"arch": "ldm-tiny-clip", "freeze": True},
                           first_stage_config={"ddconfig": DDCONFIG, "embed_dim": 4}, ema_decay=0.9, latent_norm="none")
    base.first_stage_model.weights_loaded = True
    path = tmp_path / "frozen_text.ckpt"
    save_project_checkpoint(base, path)
    cfg = compose_train(["experiment=quickstart_finetune", f"init_from={path}"])
    model = instantiate(cfg.model)
    assert not model.cond_stage_model.frozen and model.cond_stage_ema is not None
    assert all(p.requires_grad for p in model.cond_stage_model.parameters())
    frozen = instantiate(compose_train(["experiment=quickstart_finetune", f"init_from={path}",
                                        "model.cond_stage_config.freeze=true"]).model)
    assert frozen.cond_stage_model.frozen and frozen.cond_stage_ema is None
