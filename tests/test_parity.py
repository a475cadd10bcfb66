"""Stable Diffusion parity of whole models: diffusers folders and original single files in and out.

Reduced widths, SD topology rules: SD 1.5 (8 heads, conv transformer projections, QuickGELU CLIP text
tower, last layer, eps) and SD 2.1 (fixed head width, linear projections, GELU OpenCLIP tower,
penultimate layer, v). Component-level parity lives in test_unet / test_autoencoder / test_conditioning.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.checkpoints import UnsafeCheckpointError
from ldm.convert.checkpoint import (
    CheckpointMismatchError,
    latent_diffusion_from_checkpoint,
    meta_device,
    save_project_checkpoint,
    save_sd_single_file,
    sd_ema_key,
)
from ldm.convert.unet import diffusers_unet_config
from ldm.convert.vae import diffusers_vae_config
from ldm.modules.conditioning import text_transformer
from tests.payloads import write_malicious_ckpt

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TEXT_WIDTH, TEXT_LAYERS = 128, 4  # open_clip "ldm-tiny-clip": 4 heads, vocab 49408, 77 tokens
SD1_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                transformer_depth=1, context_dim=TEXT_WIDTH, legacy=False)
SD2_UNET = dict(SD1_UNET, num_heads=-1, num_head_channels=8, use_linear_in_transformer=True)  # SD 2: fixed head width
DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 4, 4],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0, norm_num_groups=8)
# The same reduction through Hydra overrides of model=sd15, as a user of scripts/convert_checkpoint.py types it.
TINY_SD15_OVERRIDES = [
    "model.unet_config.model_channels=32", "model.unet_config.image_size=8", f"model.unet_config.context_dim={TEXT_WIDTH}",
    "model.cond_stage_config.arch=ldm-tiny-clip", "model.first_stage_config.ddconfig.ch=32",
    "model.first_stage_config.ddconfig.resolution=32", "+model.first_stage_config.ddconfig.norm_num_groups=8",
]


def model_kwargs(sd2: bool) -> dict:
    return dict(
        unet_config=SD2_UNET if sd2 else SD1_UNET,
        first_stage_config=dict(ddconfig=DDCONFIG, embed_dim=4),
        cond_stage_config=dict(arch="ldm-tiny-clip", quick_gelu=not sd2, layer="penultimate" if sd2 else "last",
                               pad_with_eot=not sd2),
        latent_norm="global", scale_factor=0.18215, ema_decay=0.9999, parameterization="v" if sd2 else "eps",
    )


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert expected.norm() > 0, "a zero reference compares nothing"
    return ((got - expected).norm() / expected.norm()).item()


def reference_models(sd2: bool, text_layers: int = TEXT_LAYERS, seed: int = 0):
    """Randomly initialised diffusers U-Net and VAE and transformers CLIP text model (diffusers does not
    zero-initialise output layers, so every weight matters)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(model_kwargs(sd2)["unet_config"])).eval()
    vae = diffusers.AutoencoderKL(**diffusers_vae_config(DDCONFIG, 4), scaling_factor=0.18215).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=text_layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=49406, eos_token_id=49407)).eval()
    return unet, vae, text


def save_reference_folder(folder: Path, sd2: bool, text_layers: int = TEXT_LAYERS):
    unet, vae, text = reference_models(sd2, text_layers)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="v_prediction" if sd2 else "epsilon").save_pretrained(folder / "scheduler")
    return unet, vae, text


def randomized_model(sd2: bool, seed: int = 1):
    """A project model whose U-Net, EMA copy, VAE and text tower all hold distinct random weights."""
    model = latent_diffusion_from_checkpoint(**model_kwargs(sd2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        model.model_ema.num_updates.fill_(1234)
    return model


@pytest.mark.parametrize("sd2", [False, True], ids=["sd15", "sd21"])
def test_diffusers_models_converted_in_give_the_same_outputs(tmp_path, sd2):
    unet, vae, text = save_reference_folder(tmp_path, sd2)
    ours = latent_diffusion_from_checkpoint(init_from=str(tmp_path), **model_kwargs(sd2)).eval()
    gen = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([3, 999]), torch.randn(2, 7, TEXT_WIDTH, generator=gen)
    image, z = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, torch.randn(2, 4, 4, 4, generator=gen)
    tokens = ours.cond_stage.tokenize(["a red circle above a blue square", ""])
    with torch.no_grad():
        assert rel_err(ours.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample) <= 1e-5
        assert rel_err(ours.first_stage.encode(image).mean, vae.encode(image).latent_dist.mean) <= 1e-5
        assert rel_err(ours.first_stage.decode(z), vae.decode(z).sample) <= 1e-5
        ref = text(input_ids=tokens, output_hidden_states=True)
        penultimate, last, _ = text_transformer(ours.cond_stage.model, tokens)
        assert rel_err(last, ref.last_hidden_state) <= 1e-5
        assert rel_err(penultimate, ref.hidden_states[-2]) <= 1e-5
        # the conditioning each SD version uses: last layer (SD 1.x), penultimate through ln_final (SD 2.x)
        expected = text.final_layer_norm(ref.hidden_states[-2]) if sd2 else ref.last_hidden_state
        assert rel_err(ours.cond_stage(tokens)["context"], expected) <= 1e-5
    assert ours.first_stage_model.weights_loaded
    assert torch.equal(ours.unet.state_dict()["out.2.weight"], ours.ema_unet.state_dict()["out.2.weight"])


@pytest.mark.parametrize("sd2", [False, True], ids=["sd15", "sd21"])
def test_single_file_export_uses_the_original_layout(tmp_path, sd2):
    """Our single file, read by diffusers' own SD converters, gives back the diffusers weights bit for bit."""
    from diffusers.loaders import single_file_utils as sfu

    unet, vae, text = save_reference_folder(tmp_path / "ref", sd2)
    ours = latent_diffusion_from_checkpoint(init_from=str(tmp_path / "ref"), **model_kwargs(sd2))
    with torch.no_grad():
        ours.ema_unet.get_submodule("out.2").weight.add_(1.0)  # EMA differs from the raw U-Net
    save_sd_single_file(ours, tmp_path / "sd.safetensors")
    sd = load_file(str(tmp_path / "sd.safetensors"))
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd  # CompVis LitEma: dots removed

    def same(converted: dict, reference: dict) -> bool:
        return converted.keys() == reference.keys() and all(torch.equal(converted[k], reference[k]) for k in reference)

    unet_config = {**unet.config, "layers_per_block": 2}  # diffusers' converter reads an int, not a per-level list
    assert same(sfu.convert_ldm_unet_checkpoint(sd, unet_config), unet.state_dict())
    ema = sfu.convert_ldm_unet_checkpoint(sd, unet_config, extract_ema=True)
    assert torch.equal(ema["conv_out.weight"], unet.state_dict()["conv_out.weight"] + 1.0)
    assert same(sfu.convert_ldm_vae_checkpoint(sd, vae.config), vae.state_dict())
    reference = {k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    if sd2:
        converted = sfu.convert_open_clip_checkpoint(text, sd)
        assert "cond_stage_model.model.token_embedding.weight" in sd
    else:
        converted = sfu.convert_ldm_clip_checkpoint(sd)
        converted.pop("text_model.embeddings.position_ids")
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert same({k: converted[k] for k in reference}, reference)


@pytest.mark.parametrize("sd2", [False, True], ids=["sd15", "sd21"])
@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["fp32", "fp16"])
def test_original_to_project_to_original_is_bit_exact(tmp_path, sd2, dtype):
    original = tmp_path / "original.safetensors"
    save_sd_single_file(randomized_model(sd2), original, dtype=dtype)  # raw U-Net, EMA copy, VAE, text tower
    model = latent_diffusion_from_checkpoint(init_from=str(original), init_ema=False, **model_kwargs(sd2))
    save_sd_single_file(model, tmp_path / "again.safetensors", dtype=dtype)
    before, after = load_file(str(original)), load_file(str(tmp_path / "again.safetensors"))
    assert after.keys() == before.keys()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    # init_ema=True puts the file's EMA weights into the U-Net
    ema = latent_diffusion_from_checkpoint(init_from=str(original), init_ema=True, **model_kwargs(sd2))
    key = "input_blocks.1.1.proj_in.weight"
    assert torch.equal(ema.unet.state_dict()[key].to(before[sd_ema_key(key)].dtype), before[sd_ema_key(key)])
    assert not torch.equal(model.unet.state_dict()[key], ema.unet.state_dict()[key])
    assert int(model.model_ema.num_updates) == 1234


@pytest.mark.parametrize("sd2", [False, True], ids=["sd15", "sd21"])
def test_diffusers_export_loads_with_from_pretrained(tmp_path, sd2):
    from ldm.convert.diffusers_folder import save_diffusers_folder

    ours = randomized_model(sd2).eval()
    save_diffusers_folder(ours, tmp_path, use_ema=False)
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    text = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    assert scheduler.config.prediction_type == ("v_prediction" if sd2 else "epsilon")
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    # SD 2.x text encoders stop one block early: their last hidden state is the penultimate layer
    assert text.config.num_hidden_layers == (TEXT_LAYERS - 1 if sd2 else TEXT_LAYERS)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, TEXT_WIDTH)
    tokens = ours.cond_stage.tokenize(["a photo of a cat"])
    with torch.no_grad():
        assert rel_err(unet(x, t, encoder_hidden_states=ctx).sample, ours.unet(x, t, ctx)) <= 1e-5
        assert rel_err(vae.decode(x).sample, ours.first_stage.decode(x)) <= 1e-5
        assert rel_err(text(input_ids=tokens).last_hidden_state, ours.cond_stage(tokens)["context"]) <= 1e-5
    again = latent_diffusion_from_checkpoint(init_from=str(tmp_path), **model_kwargs(sd2))
    skip = ("model_ema.", "first_stage_model.latent_", f"cond_stage_model.model.transformer.resblocks.{TEXT_LAYERS - 1}.",
            "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")
    kept = {k: v for k, v in ours.state_dict().items() if not k.startswith(skip)}
    again_state = again.state_dict()
    assert all(torch.equal(again_state[k], v) for k, v in kept.items())


def test_full_size_sd15_has_the_released_parameter_counts(compose_train):
    """Built once, on the meta device: nothing is allocated."""
    from ldm.models.first_stage import FirstStage
    from ldm.modules.conditioning import OpenCLIPTextEncoder
    from ldm.modules.unet import UNetModel

    cfg = OmegaConf.to_container(compose_train(["model=sd15"], tiny_data=False).model, resolve=True)
    with meta_device():
        unet, vae = UNetModel(**cfg["unet_config"]), FirstStage.from_config(cfg["first_stage_config"])
        text = OpenCLIPTextEncoder(**cfg["cond_stage_config"])
    assert all(p.is_meta for m in (unet, vae, text) for p in m.parameters())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    # SD 1.x stores CLIP ViT-L/14 as a transformers CLIPTextModel: no projection, no logit scale
    sd_text = {k: p for k, p in text.model.named_parameters() if k not in ("text_projection", "logit_scale")}
    assert sum(p.numel() for p in sd_text.values()) == 123_060_480


@pytest.mark.parametrize("name", ["sd15", "sd21_base", "sd21_v"])
def test_model_configs_compose_to_the_sd_architectures(compose_train, name):
    model = compose_train([f"model={name}"], tiny_data=False).model
    sd2 = name != "sd15"
    assert model.unet_config.context_dim == (1024 if sd2 else 768)
    assert model.unet_config.get("use_linear_in_transformer", False) == sd2
    assert (model.unet_config.get("num_head_channels"), model.unet_config.get("num_heads")) == ((64, None) if sd2 else (None, 8))
    assert (model.cond_stage_config.arch, model.cond_stage_config.layer) == (
        ("ViT-H-14", "penultimate") if sd2 else ("ViT-L-14", "last"))
    assert model.cond_stage_config.quick_gelu != sd2 and model.init_from is None
    assert model.parameterization == ("v" if name == "sd21_v" else "eps")


@pytest.mark.parametrize("experiment", ["sd15_finetune", "sd21_finetune"])
def test_finetune_experiments_require_a_local_checkpoint(compose_train, experiment):
    from omegaconf.errors import MissingMandatoryValue

    from ldm.utils.run import check_missing_values

    cfg = compose_train([f"experiment={experiment}", "data.train_shards=a.tar", "data.val_shards=b.tar"], tiny_data=False)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accumulate_grad_batches > 1
    assert cfg.model.unet_config.use_checkpoint and cfg.model.ema_decay == 0.9999
    assert cfg.model.optimizer.lr == 1e-4 and cfg.model.scheduler.warmup_steps == 10_000
    with pytest.raises((MissingMandatoryValue, ValueError), match="init_from"):
        check_missing_values(cfg)


def test_mismatches_are_reported_by_name(tmp_path):
    sd2_file, sd1_file = tmp_path / "sd2.safetensors", tmp_path / "sd1.safetensors"
    save_sd_single_file(randomized_model(sd2=True), sd2_file)
    save_sd_single_file(randomized_model(sd2=False), sd1_file)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches:\n.*proj_in.weight: checkpoint \(32, 32\) vs model \(32, 32, 1, 1\)"):
        latent_diffusion_from_checkpoint(init_from=str(sd2_file), **model_kwargs(sd2=False))
    state = load_file(str(sd1_file))
    del state["first_stage_model.decoder.conv_out.bias"]
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    del state[sd_ema_key("out.2.bias")]  # an EMA copy with a hole is refused too
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="model_ema.diffusion_modelout2bias"):
        latent_diffusion_from_checkpoint(init_from=str(tmp_path / "broken.safetensors"), **model_kwargs(sd2=False))
    state[sd_ema_key("out.2.bias")] = torch.zeros(4)
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        latent_diffusion_from_checkpoint(init_from=str(tmp_path / "broken.safetensors"), **model_kwargs(sd2=False))
    assert err.value.missing == ["first_stage_model.decoder.conv_out.bias"]
    assert err.value.unexpected == ["first_stage_model.loss.logvar"]
    save_reference_folder(tmp_path / "v", sd2=True)  # a v-prediction folder into an eps model
    with pytest.raises(ValueError, match="prediction_type: folder 'v_prediction' vs model 'epsilon'"):
        latent_diffusion_from_checkpoint(init_from=str(tmp_path / "v"), **dict(model_kwargs(sd2=True), parameterization="eps"))


def _malicious_ckpt(path: Path, marker: Path) -> Path:
    return write_malicious_ckpt(path, marker, key="model.diffusion_model.out.2.bias")


def test_malicious_ckpt_is_refused_and_its_payload_never_runs(tmp_path):
    from ldm.models.diffusion import load_latent_diffusion

    control_marker = tmp_path / "control_marker"
    control = _malicious_ckpt(tmp_path / "control.ckpt", control_marker)
    torch.load(control, weights_only=False)  # the payload is live: plain unpickling runs it
    assert control_marker.exists()

    marker = tmp_path / "marker"
    evil = _malicious_ckpt(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load .*evil.ckpt"):
        load_latent_diffusion(str(evil))
    with pytest.raises(UnsafeCheckpointError, match="execute code"):
        latent_diffusion_from_checkpoint(init_from=str(evil), **model_kwargs(sd2=False))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), "--model", "sd15", "--from", "sd",
         "--to", "diffusers", str(evil), str(tmp_path / "out")], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "UnsafeCheckpointError" in result.stderr and "Refusing to load" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_script_sd_to_diffusers_and_to_ldm(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from convert_checkpoint import main

    from ldm.models.diffusion import load_latent_diffusion

    source = randomized_model(sd2=False)
    save_sd_single_file(source, tmp_path / "sd.safetensors")
    main(["--model", "sd15", "--from", "sd", "--to", "diffusers", "--no-ema", "--dtype", "fp16",
          str(tmp_path / "sd.safetensors"), str(tmp_path / "diffusers"), *TINY_SD15_OVERRIDES])
    written = load_file(str(tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in written.values())
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "diffusers" / "unet", torch_dtype=torch.float16)
    assert torch.equal(unet.state_dict()["conv_out.weight"], source.unet.state_dict()["out.2.weight"].half())
    main(["--model", "sd15", "--from", "diffusers", "--to", "ldm", str(tmp_path / "diffusers"),
          str(tmp_path / "model.ckpt"), *TINY_SD15_OVERRIDES])
    loaded = load_latent_diffusion(str(tmp_path / "model.ckpt"))
    assert torch.equal(loaded.unet.state_dict()["out.2.weight"], source.unet.state_dict()["out.2.weight"].half().float())
    with pytest.raises(SystemExit):
        main(["--model", "sd15", "--from", "sd", "--to", "ldm", str(tmp_path / "sd.safetensors"), str(tmp_path / "model.ckpt")])


def test_project_checkpoint_round_trips_through_load_latent_diffusion(tmp_path):
    from ldm.models.diffusion import load_latent_diffusion

    model = randomized_model(sd2=True)
    save_project_checkpoint(model, tmp_path / "m.ckpt")
    loaded = load_latent_diffusion(str(tmp_path / "m.ckpt"))
    assert loaded.hparams.parameterization == "v"
    loaded_state = loaded.state_dict()
    assert all(torch.equal(loaded_state[k], v) for k, v in model.state_dict().items()
               if not k.startswith("first_stage_model.latent_"))  # NaN: stage 1 never measured them
