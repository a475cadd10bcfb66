"""diffusers model folders <-> ``LatentDiffusion``.

    folder/unet/{config.json, diffusion_pytorch_model.safetensors}   diffusers UNet2DConditionModel
    folder/vae/{config.json, diffusion_pytorch_model.safetensors}    diffusers AutoencoderKL
    folder/text_encoder/{config.json, model.safetensors}             transformers CLIPTextModel
    folder/scheduler/scheduler_config.json                           DDIMScheduler (prediction type, betas)

Weights are renamed by ``ldm.convert.{unet,vae,text_encoder}``; configs are written through diffusers' /
transformers' own config classes, so ``from_pretrained`` reads them. diffusers' SD 2.x text encoders stop
one block early (their last hidden state *is* SD 2.x's penultimate layer through the final LayerNorm); the
export does the same for ``layer="penultimate"``, and the import keeps the unused final block of the
open_clip tower at its current values. No tokenizer is written (see docs/parity.md).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

from ldm.checkpoints import load_state_dict, save_safetensors
from ldm.convert.checkpoint import (
    EMA_SHADOW,
    TEXT,
    UNET,
    VAE,
    LoadReport,
    StateDict,
    apply_state,
    meta_device,
    uses_quick_gelu,
)
from ldm.convert.text_encoder import hf_text_to_open_clip, open_clip_text_to_hf
from ldm.convert.unet import diffusers_unet_config, unet_key_map
from ldm.convert.vae import (
    diffusers_to_sd_vae,
    diffusers_vae_config,
    sd_to_diffusers_vae,
)

if TYPE_CHECKING:
    from ldm.models.diffusion import LatentDiffusion

log = logging.getLogger(__name__)

_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
# UNet2DConditionModel config fields that change the function but not the tensor shapes
_UNET_FIELDS = ("attention_head_dim", "use_linear_projection", "cross_attention_dim", "layers_per_block",
                "down_block_types", "up_block_types", "only_cross_attention", "resnet_time_scale_shift")


def _weights_file(folder: Path, component: str, variant: Optional[str]) -> Path:
    stem = _WEIGHT_STEMS[component]
    names = ([f"{stem}.{variant}.safetensors", f"{stem}.{variant}.bin"] if variant else []) + [
        f"{stem}.safetensors", f"{stem}.bin"]
    for name in names:
        if (folder / component / name).is_file():
            return folder / component / name
    if list((folder / component).glob(f"{stem}*.index.json")):
        raise ValueError(f"{folder / component} holds sharded weights; merge them into one {stem}.safetensors first.")
    raise FileNotFoundError(f"No weights in {folder / component}: expected one of {names}.")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _check_configs(model: LatentDiffusion, folder: Path) -> None:
    """Refuse folders whose configs disagree with the model on what the shapes cannot show."""
    want = diffusers_unet_config(model.hparams.unet_config)
    have = _read_json(folder / "unet" / "config.json")
    levels = len(want["block_out_channels"])
    bad = []
    for name in _UNET_FIELDS:
        if name not in have:
            continue
        a, b = have[name], want[name]
        if name in ("attention_head_dim", "layers_per_block", "only_cross_attention"):
            a, b = _per_level(a, levels), _per_level(b, levels)
        if a != b:
            bad.append(f"{name}: folder {have[name]} vs model {want[name]}")
    prediction = _read_json(folder / "scheduler" / "scheduler_config.json").get("prediction_type")
    expected = PREDICTION_TYPES[model.hparams.parameterization]
    if prediction is not None and prediction != expected:
        bad.append(f"scheduler prediction_type: folder {prediction!r} vs model {expected!r} "
                   f"(model.parameterization={model.hparams.parameterization!r})")
    if bad:
        raise ValueError(f"{folder} describes another architecture than the configured model:\n  "
                         + "\n  ".join(bad) + "\nPick the matching model=... (sd15 | sd21_base | sd21_v).")
    scaling = _read_json(folder / "vae" / "config.json").get("scaling_factor")
    ours = model.latent_scale.float()
    if scaling is not None and not bool((model.latent_shift == 0).all() & (ours - scaling).abs().le(1e-6).all()):
        warnings.warn(f"{folder}/vae/config.json has scaling_factor={scaling}, the model latent_scale "
                      f"{ours.tolist()} (latent_norm={model.latent_norm!r}); set model.scale_factor={scaling}.")


def read_diffusers_folder(folder: Union[str, Path], unet_params: dict,
                          variant: Optional[str] = None) -> tuple[StateDict, int]:
    """Project-layout tensors of ``unet/``, ``vae/`` and ``text_encoder/``, and the text encoder's block count.

    Tensors with no counterpart keep a ``<component>/`` prefix, so a strict check reports them by name.
    """
    folder = Path(folder)
    to_sd = {v: k for k, v in unet_key_map(unet_params).items()}
    out: StateDict = {}
    for key, value in load_state_dict(_weights_file(folder, "unet", variant)).items():
        out[UNET + to_sd[key] if key in to_sd else f"unet/{key}"] = value
    vae = diffusers_to_sd_vae(load_state_dict(_weights_file(folder, "vae", variant)))
    out.update({VAE + k: v for k, v in vae.items()})
    text = hf_text_to_open_clip(load_state_dict(_weights_file(folder, "text_encoder", variant)))
    out.update({TEXT + k: v for k, v in text.items()})
    layers = {int(m[1]) for k in text if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    return out, len(layers)


def load_diffusers_folder(model: LatentDiffusion, folder: Union[str, Path], variant: Optional[str] = None) -> LoadReport:
    """Load a diffusers folder into ``model`` strictly (names of missing / unexpected / misshaped tensors)."""
    folder = Path(folder)
    _check_configs(model, folder)
    state, text_layers = read_diffusers_folder(folder, model.hparams.unet_config, variant)
    blocks = len(model.cond_stage_model.model.transformer.resblocks)
    dropped = model.cond_stage_model.layer == "penultimate" and text_layers == blocks - 1
    return apply_state(model, state, str(folder), text_layers_dropped=dropped)


def _text_config(model: LatentDiffusion, layers: int):
    from transformers import CLIPTextConfig

    tower = model.cond_stage_model.model
    block = tower.transformer.resblocks[0]
    config = CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings, hidden_size=tower.transformer.width,
        intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=layers,
        num_attention_heads=block.attn.num_heads, max_position_embeddings=tower.positional_embedding.shape[0],
        hidden_act="quick_gelu" if uses_quick_gelu(model) else "gelu", layer_norm_eps=tower.ln_final.eps,
        projection_dim=model.cond_stage_model.embed_dim, bos_token_id=model.cond_stage_model.tokenizer.sot,
        eos_token_id=model.cond_stage_model.tokenizer.eot, pad_token_id=model.cond_stage_model.tokenizer.pad,
    )
    config.architectures = ["CLIPTextModel"]
    return config


def _vae_scaling(model: LatentDiffusion) -> dict:
    if model.latent_norm == "whiten":
        raise ValueError("latent_norm='whiten' mixes the latent channels, which a diffusers VAE config "
                         "(scaling_factor, latents_mean, latents_std) cannot express: export a model trained with "
                         "latent_norm='per_channel' or 'global'.")
    shift, scale = model.latent_shift.float().cpu(), model.latent_scale.float().cpu()
    if bool((shift == 0).all() and (scale == scale[0]).all()):
        return {"scaling_factor": float(scale[0])}
    warnings.warn("Per-channel latent normalisation: written as vae latents_mean / latents_std with scaling_factor 1; "
                  "SD 1.x / 2.x pipelines of diffusers read only scaling_factor.")
    return {"scaling_factor": 1.0, "latents_mean": shift.tolist(), "latents_std": (1.0 / scale).tolist()}


def save_diffusers_folder(model: LatentDiffusion, folder: Union[str, Path], use_ema: bool = True,
                          dtype: Optional[torch.dtype] = None) -> None:
    """Write ``model`` as a diffusers folder: unet/, vae/, text_encoder/ (CLIPTextModel), scheduler/.

    ``use_ema``: export the EMA U-Net when the model has one (and the EMA text encoder when it was trained).
    """
    import diffusers

    vae_scaling = _vae_scaling(model)  # before anything is written: a whitened model cannot be exported
    folder = Path(folder)
    state = model.state_dict()
    cast = (lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t)
    prefix = EMA_SHADOW if use_ema and model.model_ema is not None else UNET
    unet_params = dict(model.hparams.unet_config)
    unet = {k: cast(state[prefix + k]) for k in unet_key_map(unet_params)}
    names = unet_key_map(unet_params)
    with meta_device():
        diffusers.UNet2DConditionModel(**diffusers_unet_config(unet_params)).save_config(folder / "unet")
    save_safetensors({names[k]: v for k, v in unet.items()}, folder / "unet" / "diffusion_pytorch_model.safetensors",
                     metadata={"format": "pt"})

    first = model.first_stage_model.config
    vae = {k[len(VAE):]: cast(v) for k, v in state.items() if k.startswith(VAE) and not k.startswith(VAE + "latent_")}
    with meta_device():
        diffusers.AutoencoderKL(**diffusers_vae_config(first["ddconfig"], first["embed_dim"]),
                                **vae_scaling).save_config(folder / "vae")
    save_safetensors(sd_to_diffusers_vae(vae), folder / "vae" / "diffusion_pytorch_model.safetensors",
                     metadata={"format": "pt"})

    blocks = len(model.cond_stage_model.model.transformer.resblocks)
    layers = blocks - 1 if model.cond_stage_model.layer == "penultimate" else blocks
    tower = model.sampling_text_encoder(use_ema).model.state_dict()  # open_clip keys, as under TEXT
    text = open_clip_text_to_hf({k: cast(v) for k, v in tower.items()})
    text = {k: v for k, v in text.items() if not k.startswith(f"text_model.encoder.layers.{blocks - 1}.") or layers == blocks}
    _text_config(model, layers).save_pretrained(folder / "text_encoder")
    save_safetensors(text, folder / "text_encoder" / "model.safetensors", metadata={"format": "pt"})

    schedule = dict(model.hparams.schedule or {})
    kind = schedule.get("kind", "scaled_linear")
    diffusers.DDIMScheduler(
        num_train_timesteps=model.schedule.num_timesteps, beta_start=schedule.get("beta_start", 0.00085),
        beta_end=schedule.get("beta_end", 0.012), beta_schedule=_BETA_SCHEDULES[kind], clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=PREDICTION_TYPES[model.hparams.parameterization],
        rescale_betas_zero_snr=bool(schedule.get("zero_terminal_snr", False)),
    ).save_pretrained(folder / "scheduler")
    log.info(f"Wrote diffusers folder {folder} (unet/, vae/, text_encoder/, scheduler/).")
