"""Whole latent-diffusion checkpoints: original SD single files and diffusers folders <-> ``LatentDiffusion``.

Original SD single file (CompVis / Stability)                  this project's ``LatentDiffusion.state_dict()``
  model.diffusion_model.*                                        model.diffusion_model.*              (same)
  model_ema.diffusion_model<U-Net key without dots>              model_ema.shadow.diffusion_model.<key>
  model_ema.num_updates (int32), model_ema.decay                 model_ema.num_updates, (ema_decay of the config)
  first_stage_model.{encoder,decoder,quant_conv,post_quant_conv}.*   same
  cond_stage_model.transformer.text_model.* (SD 1.x, transformers CLIP)   cond_stage_model.model.* (open_clip)
  cond_stage_model.model.*                  (SD 2.x, open_clip)           cond_stage_model.model.*
  betas, alphas_cumprod, posterior_* ... (DDPM buffers)          checked against the configured schedule

SD's EMA names come from CompVis ``LitEma``, which registers every parameter of the wrapped
``DiffusionWrapper`` as a buffer named with its dots removed. Import is strict: every tensor the model
needs must come from the file except the project-only ones listed in ``LoadReport.filled`` (latent
normalisation buffers, a fresh EMA, the text projection SD 1.x files lack); missing, unexpected and
wrongly shaped tensors are all reported by name in one ``CheckpointMismatchError``.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union
from unittest import mock

import open_clip
import torch

from ldm.checkpoints import load_state_dict, save_safetensors
from ldm.convert.text_encoder import hf_text_to_open_clip, open_clip_text_to_hf

if TYPE_CHECKING:
    from ldm.models.diffusion import LatentDiffusion

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model.model."  # open_clip layout (SD 2.x, this project)
TEXT_HF = "cond_stage_model.transformer."  # + text_model.* : transformers layout (SD 1.x)
SD_EMA = "model_ema."
EMA_SHADOW = "model_ema.shadow.diffusion_model."
EMA_COUNT = "model_ema.num_updates"
_VAE_PARTS = tuple(f"{VAE}{p}." for p in ("encoder", "decoder", "quant_conv", "post_quant_conv"))
# DDPM buffers of CompVis' LatentDiffusion (recomputed from the config, compared on import) and other
# derived tensors of the original layout that this project does not store.
SD_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
)
_SD_DERIVED = (*SD_SCHEDULE_BUFFERS, "model_ema.decay", f"{TEXT_HF}text_model.embeddings.position_ids")
# Project-only tensors a foreign checkpoint never holds: kept at the model's own (config-derived) values.
_PROJECT_ONLY = ("latent_shift", "latent_scale", "latent_mix", "latent_unmix", "latent_stats_ready",
                 f"{VAE}latent_mean", f"{VAE}latent_std")

StateDict = dict[str, torch.Tensor]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the configured architecture; lists every offending tensor by name."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple, tuple]], limit: int = 25):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def listing(items: list) -> str:
            shown = "\n    ".join(str(i) for i in items[:limit])
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            return f"\n    {shown}{more}"

        parts = [f"{source} does not fit the configured model (a partial load is never accepted):"]
        if missing:
            parts.append(f"  {len(missing)} missing tensors:{listing(missing)}")
        if unexpected:
            parts.append(f"  {len(unexpected)} unexpected tensors:{listing(unexpected)}")
        if mismatched:
            rows = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched]
            parts.append(f"  {len(mismatched)} shape mismatches:{listing(rows)}")
        parts.append("Check that model=... (sd15 | sd21_base | sd21_v) matches the checkpoint, and --ema/init_ema.")
        super().__init__("\n".join(parts))


@dataclass
class LoadReport:
    """What a load did: tensors read, tensors kept at the model's values (and why), file tensors ignored."""

    source: str
    loaded: int = 0
    filled: dict[str, str] = field(default_factory=dict)  # model key -> reason
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        reasons = sorted(set(self.filled.values()))
        kept = f"; kept {len(self.filled)} project-only tensors ({'; '.join(reasons)})" if self.filled else ""
        skipped = f"; ignored {len(self.ignored)} file tensors this model does not store" if self.ignored else ""
        return f"Loaded {self.loaded} tensors from {self.source}{kept}{skipped}."


# ---------------------------------------------------------------------------------------------- layouts
def sd_ema_key(unet_key: str) -> str:
    """``input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight`` (CompVis LitEma)."""
    return SD_EMA + f"diffusion_model.{unet_key}".replace(".", "")


def _ema_names(unet_keys: Iterable[str]) -> dict[str, str]:
    names = {key: sd_ema_key(key) for key in unet_keys}
    if len(set(names.values())) != len(names):
        raise ValueError("Two U-Net keys share one dotless EMA name; this topology cannot use SD's EMA layout.")
    return names


def sd_to_project(state: Mapping[str, torch.Tensor], unet_keys: Iterable[str], use_ema: bool,
                  source: str = "checkpoint") -> tuple[StateDict, list[str]]:
    """Original single-file tensors -> project keys (what the file holds) and the derived keys skipped.

    ``use_ema``: the U-Net gets the EMA weights (``model_ema.*``) when the file has them, else the raw
    ones. The project's EMA shadow gets the file's EMA weights when present, else the U-Net's.
    """
    ema_names = _ema_names(unet_keys)
    sd_ema = {k: state[name] for k, name in ema_names.items() if name in state}
    if sd_ema and len(sd_ema) < len(ema_names):
        absent = sorted(name for name in ema_names.values() if name not in state)
        raise CheckpointMismatchError(source, absent, [], [])
    known_ema = set(ema_names.values()) | {"model_ema.decay"}
    out: StateDict = {}
    ignored: list[str] = []
    hf_text: StateDict = {}
    for key, value in state.items():
        if key in _SD_DERIVED:
            ignored.append(key)
        elif key.startswith(TEXT_HF):
            hf_text[key[len(TEXT_HF):]] = value
        elif key not in known_ema:  # EMA weights are placed below; anything else is checked by name later
            out[key] = value
    if hf_text:
        out.update({TEXT + k: v for k, v in hf_text_to_open_clip(hf_text).items()})
    raw = {k: out.pop(UNET + k) for k in ema_names if UNET + k in out}
    unet = sd_ema if (use_ema and sd_ema) else raw
    out.update({UNET + k: v for k, v in unet.items()})
    out.update({EMA_SHADOW + k: v for k, v in (sd_ema or unet).items()})
    return out, ignored


def project_to_sd(state: Mapping[str, torch.Tensor], text_layout: str, ema_decay: Optional[float],
                  context_length: int = 77) -> StateDict:
    """Project tensors -> the original single-file layout (``text_layout``: "hf" for SD 1.x, "open_clip")."""
    if text_layout not in ("hf", "open_clip"):
        raise ValueError(f"text_layout must be 'hf' (SD 1.x) or 'open_clip' (SD 2.x), got {text_layout!r}.")
    out: StateDict = {}
    text: StateDict = {}
    for key, value in state.items():
        if key.startswith(UNET) or key.startswith(_VAE_PARTS):
            out[key] = value
        elif key.startswith(TEXT):
            text[key[len(TEXT):]] = value
        elif key.startswith(EMA_SHADOW):
            out[sd_ema_key(key[len(EMA_SHADOW):])] = value
        elif key == EMA_COUNT:
            out[key] = value.to(torch.int32)  # LitEma: torch.tensor(0, dtype=torch.int)
    if text_layout == "hf":
        out.update({TEXT_HF + k: v for k, v in open_clip_text_to_hf(text).items()})
        out[f"{TEXT_HF}text_model.embeddings.position_ids"] = torch.arange(context_length, dtype=torch.int64)[None]
    else:
        out.update({TEXT + k: v for k, v in text.items()})
    if ema_decay is not None and any(k.startswith(EMA_SHADOW) for k in state):
        out["model_ema.decay"] = torch.tensor(ema_decay, dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------- checking
def uses_quick_gelu(model: LatentDiffusion) -> bool:
    """True for OpenAI CLIP text towers (QuickGELU), stored by SD 1.x in the transformers layout."""
    return isinstance(model.cond_stage_model.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def project_only_keys(model: LatentDiffusion, converted: Mapping[str, torch.Tensor],
                      text_layers_dropped: bool = False) -> dict[str, str]:
    """Model keys a foreign checkpoint may lack, each with the reason it keeps the model's value."""
    expected = model.state_dict()
    allowed = {k: "latent normalisation from the config" for k in _PROJECT_ONLY if k in expected}
    if not any(k.startswith(EMA_SHADOW) for k in converted):
        allowed.update({k: "EMA starts from the loaded U-Net" for k in expected if k.startswith("model_ema.")})
    elif EMA_COUNT in expected and EMA_COUNT not in converted:
        allowed[EMA_COUNT] = "EMA update count starts at 0"
    if f"{TEXT}token_embedding.weight" in converted:
        for name in ("text_projection", "logit_scale"):
            if TEXT + name not in converted:
                allowed[TEXT + name] = "transformers CLIPTextModel has no projection (identity: pooled = pooler_output)"
    if text_layers_dropped:
        last = len(model.cond_stage_model.model.transformer.resblocks) - 1
        prefix = f"{TEXT}transformer.resblocks.{last}."
        allowed.update({k: "final text block unused by the penultimate layer" for k in expected if k.startswith(prefix)})
    return allowed


def check_state(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                fillable: Iterable[str], source: str) -> None:
    """Raise ``CheckpointMismatchError`` unless ``converted`` covers ``expected`` (up to ``fillable``)."""
    fillable = set(fillable)
    missing = sorted(k for k in expected if k not in converted and k not in fillable)
    unexpected = sorted(k for k in converted if k not in expected)
    mismatched = [(k, tuple(converted[k].shape), tuple(expected[k].shape))
                  for k in sorted(set(converted) & set(expected)) if converted[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)


def check_schedule(model: LatentDiffusion, state: Mapping[str, torch.Tensor], source: str) -> None:
    """The file's ``alphas_cumprod`` (when stored) must equal the configured noise schedule's."""
    stored = state.get("alphas_cumprod")
    if stored is None or stored.device.type == "meta" or model.schedule.alphas_cumprod.device.type == "meta":
        return
    ours = model.schedule.alphas_cumprod.float().cpu()
    if stored.shape != ours.shape or not torch.allclose(stored.float().cpu(), ours, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"{source} was trained with another noise schedule ({stored.numel()} steps, alpha_bar_T="
            f"{stored[-1].item():.6g}) than model.schedule ({ours.numel()} steps, alpha_bar_T={ours[-1].item():.6g}). "
            f"Set model.schedule to the checkpoint's (SD: scaled_linear, 0.00085 .. 0.012, 1000 steps)."
        )


def apply_state(model: LatentDiffusion, converted: StateDict, source: str, ignored: Iterable[str] = (),
                text_layers_dropped: bool = False) -> LoadReport:
    """Load project-layout tensors strictly, completing only the project-only tensors; returns the report."""
    expected = model.state_dict()
    ignored = list(ignored)
    if model.model_ema is None:  # EMA disabled in the config: the file's EMA tensors are not needed
        ignored += [k for k in converted if k.startswith("model_ema.")]
        converted = {k: v for k, v in converted.items() if not k.startswith("model_ema.")}
    fillable = project_only_keys(model, converted, text_layers_dropped)
    check_state(converted, expected, fillable, source)
    report = LoadReport(source, loaded=len(converted), ignored=ignored)
    full = dict(converted)
    for key, reason in fillable.items():
        if key in converted:
            continue
        report.filled[key] = reason
        if key.startswith(EMA_SHADOW):
            full[key] = converted[UNET + key[len(EMA_SHADOW):]]
        elif key == TEXT + "text_projection":
            width, embed = expected[key].shape
            if width != embed:
                raise ValueError(f"{source} has no text_projection and width {width} != embed_dim {embed}.")
            full[key] = torch.eye(width, dtype=expected[key].dtype)
        else:
            full[key] = expected[key]
    model.load_state_dict(full, strict=True)
    model.first_stage_model.weights_loaded = True
    log.info(report.summary())
    return report


# ---------------------------------------------------------------------------------------------- files
def load_sd_single_file(model: LatentDiffusion, source: Union[str, Path, Mapping[str, torch.Tensor]],
                        use_ema: bool = True) -> LoadReport:
    """Load an original SD single file (``.safetensors``, or ``.ckpt`` read with ``weights_only``; or its
    tensors, already read) into ``model``."""
    state, name = _read(source)
    return _load_sd_state(model, state, name, use_ema)


def _load_sd_state(model: LatentDiffusion, state: Mapping[str, torch.Tensor], name: str, use_ema: bool) -> LoadReport:
    if not any(k.startswith((UNET, SD_EMA + "diffusion_model")) for k in state):
        raise ValueError(f"{name} holds no U-Net (model.diffusion_model.*): not a Stable Diffusion single file.")
    check_schedule(model, state, name)
    converted, ignored = sd_to_project(state, list(model.unet.state_dict()), use_ema, name)
    return apply_state(model, converted, name, ignored)


def _read(source: Union[str, Path, Mapping[str, torch.Tensor]]) -> tuple[Mapping[str, torch.Tensor], str]:
    if isinstance(source, Mapping):
        return source, "the given state dict"
    return load_state_dict(source), str(source)


def save_sd_single_file(model: LatentDiffusion, path: Union[str, Path], text_layout: Optional[str] = None,
                        include_ema: bool = True, dtype: Optional[torch.dtype] = None) -> None:
    """Write ``model`` as an original SD single file (safetensors). ``text_layout`` defaults to "hf"
    (SD 1.x) for QuickGELU (OpenAI CLIP) text towers and "open_clip" (SD 2.x) otherwise. The format has no slot
    for an EMA text encoder: with ``include_ema`` a trained text encoder's EMA is written as ``cond_stage_model``
    (the weights sampling uses), without it the raw weights."""
    state = {k: v for k, v in model.state_dict().items() if include_ema or not k.startswith("model_ema.")}
    if include_ema and model.cond_stage_ema is not None:
        state.update({"cond_stage_model." + k: v for k, v in model.cond_stage_ema.shadow.state_dict().items()})
    layout = text_layout or ("hf" if uses_quick_gelu(model) else "open_clip")
    decay = model.model_ema.decay if model.model_ema is not None else None
    out = project_to_sd(state, layout, decay, model.cond_stage_model.context_length)
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() and k != "model_ema.decay" else v for k, v in out.items()}
    save_safetensors(out, path, metadata={"format": "pt", "layout": "stable-diffusion-single-file"})


def save_project_checkpoint(model: LatentDiffusion, path: Union[str, Path]) -> None:
    """Write a self-contained checkpoint of this project (``load_latent_diffusion`` /
    ``LatentDiffusion.load_from_checkpoint`` read it with ``weights_only=True``)."""
    import lightning

    hparams = copy.deepcopy(dict(model.hparams))
    hparams["first_stage_config"] = {**model.first_stage_model.config, "ckpt_path": None}
    hparams["cond_stage_config"] = {**hparams.get("cond_stage_config", {}), "pretrained": None}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__}, path)


def checkpoint_format(path: Union[str, Path]) -> str:
    """"diffusers" for a folder with ``unet/``, "sd" for a file (SD single file or a project checkpoint)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise FileNotFoundError(f"{path} is a folder without unet/: not a diffusers model folder.")
        return "diffusers"
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint not found: {path}.")
    return "sd"


def load_weights(model: LatentDiffusion, source: Union[str, Path, Mapping[str, torch.Tensor]],
                 use_ema: bool = True) -> LoadReport:
    """Load an SD single file, a checkpoint of this project (``train.py``'s ``*.ckpt``) or a diffusers folder;
    ``source`` may also be the tensors of a file, already read with ``ldm.checkpoints.load_state_dict``."""
    if not isinstance(source, Mapping) and checkpoint_format(source) == "diffusers":
        from ldm.convert.diffusers_folder import load_diffusers_folder

        return load_diffusers_folder(model, source)
    state, name = _read(source)
    if any(k.startswith(EMA_SHADOW) or k == "latent_scale" for k in state):  # this project's own layout
        if use_ema and any(k.startswith(EMA_SHADOW) for k in state):
            state = {**state, **{UNET + k[len(EMA_SHADOW):]: v for k, v in state.items() if k.startswith(EMA_SHADOW)}}
        return apply_state(model, dict(state), name)
    return _load_sd_state(model, state, name, use_ema)


def latent_diffusion_from_checkpoint(init_from: Optional[str] = None, init_ema: bool = True,
                                     **model_kwargs: Any) -> LatentDiffusion:
    """``LatentDiffusion(**model_kwargs)`` with weights from ``init_from`` (see ``load_weights``), or random.

    The Hydra target of ``model=sd15|sd21_base|sd21_v``; ``init_ema`` picks the file's EMA U-Net.
    """
    from ldm.models.diffusion import LatentDiffusion

    model = LatentDiffusion(**model_kwargs)
    if init_from:
        report = load_weights(model, init_from, use_ema=init_ema)
        log.info(report.summary())
    return model


@contextmanager
def meta_device() -> Iterator[None]:
    """Build modules without allocating their tensors (torch's meta device).

    open_clip's factory moves every model to an explicit device ("cpu" unless told otherwise), so it is
    pointed at the meta device as well.
    """
    create = functools.partial(open_clip.create_model, device="meta")
    with torch.device("meta"), mock.patch.object(open_clip, "create_model", create):
        yield
