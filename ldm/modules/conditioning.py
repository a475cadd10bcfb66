"""Text conditioning: an open_clip text tower that turns prompts into the U-Net's cross-attention context.

``OpenCLIPTextEncoder`` reproduces SD 2.x's ``FrozenOpenCLIPEmbedder`` (same module tree and keys
under ``cond_stage_model.``: ``model.transformer.resblocks.*``, ``model.token_embedding``,
``model.positional_embedding``, ``model.ln_final``, ``model.text_projection``, ``model.logit_scale``)
and also reads SD 1.x's transformers-layout CLIP text model (see ``ldm.convert.text_encoder``).

    context = ln_final(h_L)      layer="last"         (SD 1.x: CLIP ViT-L/14 last_hidden_state)
    context = ln_final(h_{L-1})  layer="penultimate"  (SD 2.x: OpenCLIP ViT-H/14)
    pooled  = ln_final(h_L)[EOT] @ text_projection   (CLIP text embedding, Radford et al. 2021)

Nothing is downloaded unless an open_clip tag is named: weights are random with ``pretrained=None``,
read from a local file (open_clip, SD single-file, transformers or ldm stage-0 checkpoint), or
fetched by open_clip for a tag (with a clear error asking for a local file when offline).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import open_clip
import torch
from torch import nn

from ldm.checkpoints import load_checkpoint
from ldm.convert.text_encoder import extract_open_clip_text_state
from ldm.modules.clip_configs import create_clip_model, register_clip_configs, same_text_tower

log = logging.getLogger(__name__)

LAYERS = ("last", "penultimate")


class PromptTokenizer:
    """CLIP BPE tokenization to a fixed length with SOT / EOT markers, warning on truncation.

    Pads with 0 (open_clip, SD 2.x) or with the EOT id (``pad_with_eot``: transformers' CLIP
    tokenizer as used by SD 1.x). A prompt longer than ``context_length`` is cut (its EOT kept) and
    a warning naming the prompt is emitted once per distinct prompt, for the first
    ``max_warnings`` distinct prompts; ``num_truncated`` counts every truncation.
    """

    max_warnings = 20

    def __init__(self, arch: str, context_length: int = 77, pad_with_eot: bool = False):
        register_clip_configs()
        tokenizer = open_clip.get_tokenizer(arch, context_length=context_length)
        if not isinstance(tokenizer, open_clip.SimpleTokenizer):
            raise ValueError(f"{arch!r} uses {type(tokenizer).__name__}; only the CLIP BPE tokenizer is supported.")
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.sot, self.eot = tokenizer.sot_token_id, tokenizer.eot_token_id
        self.pad = self.eot if pad_with_eot else 0
        self._warned: set[str] = set()
        self.num_truncated = 0  # every truncation, repeats included

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts -> token ids [B, context_length] (int64, CPU)."""
        if isinstance(prompts, str):
            raise TypeError("Pass a list of prompts, not a single string (e.g. [prompt]).")
        tokens = torch.full((len(prompts), self.context_length), self.pad, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids = [self.sot, *self.tokenizer.encode(prompt), self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length - 1] + [self.eot]
                self._warn_truncated(prompt)
            tokens[i, : len(ids)] = torch.tensor(ids)
        return tokens

    def _warn_truncated(self, prompt: str) -> None:
        self.num_truncated += 1
        if prompt in self._warned or len(self._warned) >= self.max_warnings:
            return
        self._warned.add(prompt)
        shown = prompt if len(prompt) <= 300 else prompt[:300] + "..."
        last = len(self._warned) == self.max_warnings
        warnings.warn(
            f"Prompt longer than {self.context_length} tokens (start/end markers included) was truncated: {shown!r}"
            + (f" (warning {self.max_warnings} of {self.max_warnings}: further truncated prompts are only counted "
               f"in tokenizer.num_truncated)" if last else ""),
            stacklevel=3,
        )


def text_transformer(model: open_clip.CLIP, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run an open_clip text tower on tokens [B, L] (any L up to its context length).

    Returns the penultimate hidden states [B, L, D] (before ``ln_final``), the last hidden states
    after ``ln_final`` [B, L, D] and the pooled text embedding [B, E] (EOT token, projected; not
    normalised). Under the causal mask, dropping trailing padding changes none of them at the
    positions kept.
    """
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)  # [B, L, D]
    attn_mask = model.attn_mask[:length, :length]
    batch_first = getattr(model.transformer, "batch_first", True)
    if not batch_first:  # sequence-first (clip_configs.run_sequence_first; open_clip before 2.24)
        x = x.transpose(0, 1).contiguous()  # [L, B, D]
    blocks = model.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x, attn_mask=attn_mask)
    penultimate, last = x, blocks[-1](x, attn_mask=attn_mask)
    if not batch_first:
        penultimate, last = penultimate.transpose(0, 1), last.transpose(0, 1)
    last = model.ln_final(last)
    eot = last[torch.arange(last.shape[0], device=last.device), tokens.argmax(dim=-1)]  # [B, D]
    proj = model.text_projection
    pooled = eot @ proj if isinstance(proj, nn.Parameter) else proj(eot)
    return penultimate, last, pooled


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_pretrained(arch: str, pretrained: str) -> tuple[str, bool]:
    """A local file path, or an open_clip tag fetched by open_clip -> (local path, tag needs QuickGELU)."""
    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser()), False
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is neither an existing file nor an open_clip tag of {arch!r} "
            f"(tags: {tags or 'none'}). Pass the path of a local weights file (.safetensors / .bin / .ckpt)."
        )
    if _offline() and not cfg.get("hf_hub"):
        raise RuntimeError(
            f"The open_clip tag {arch}/{pretrained} downloads from {cfg.get('url')}, but HF_HUB_OFFLINE is set. "
            f"Download the file on a connected machine and pass its local path as pretrained=..."
        )
    try:
        path = open_clip.download_pretrained(cfg)
    except Exception as err:  # hub/network errors come in many types
        raise RuntimeError(
            f"Could not fetch open_clip weights {arch}/{pretrained} ({type(err).__name__}: {err}). Offline "
            f"machines need a local file: download it elsewhere and pass its path as pretrained=..."
        ) from err
    return path, bool(cfg.get("quick_gelu", False))


class OpenCLIPTextEncoder(nn.Module):
    """Prompts -> context [B, L, width] for cross-attention, pooled [B, embed_dim], tokens [B, L].

    Args:
        arch: open_clip architecture ("ViT-H-14", "ViT-L-14-quickgelu", "ldm-tiny-clip", ...).
        pretrained: None (random init), a local file (open_clip / SD / transformers / stage-0 ckpt),
            or an open_clip tag such as "laion2b_s32b_b79k".
        layer: "last" or "penultimate" hidden states (both through ``ln_final``, SD 2.x semantics).
        freeze: eval mode, no gradients, encoding under ``no_grad``.
        context_length: tokens per prompt (77 in every SD version).
        pad_with_eot: pad with the EOT id as SD 1.x's tokenizer does (False: zeros, SD 2.x).
        quick_gelu: QuickGELU activations (OpenAI CLIP weights, e.g. SD 1.x's ViT-L/14).
    """

    def __init__(
        self,
        arch: str = "ldm-tiny-clip",
        pretrained: Optional[str] = None,
        layer: str = "last",
        freeze: bool = True,
        context_length: int = 77,
        pad_with_eot: bool = False,
        quick_gelu: bool = False,
    ):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}.")
        path, tag_quick_gelu = resolve_pretrained(arch, pretrained) if pretrained else (None, False)
        self.arch = arch
        self.layer = layer
        self.model = create_clip_model(arch, text_only=True, quick_gelu=quick_gelu or tag_quick_gelu,
                                       context_length=context_length)
        if self.model.text_pool_type != "argmax":
            raise ValueError(f"{arch!r} pools text with {self.model.text_pool_type!r}; only EOT (argmax) pooling is supported.")
        self.tokenizer = PromptTokenizer(arch, context_length, pad_with_eot)
        if path is not None:
            self.load_pretrained(path)
        self.frozen = bool(freeze)
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    @property
    def width(self) -> int:
        """Context feature size D (the U-Net's ``context_dim``)."""
        return self.model.transformer.width

    @property
    def embed_dim(self) -> int:
        """Size of the pooled (projected) text embedding."""
        proj = self.model.text_projection
        return proj.shape[1] if isinstance(proj, nn.Parameter) else proj.out_features

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    def train(self, mode: bool = True) -> "OpenCLIPTextEncoder":
        """A frozen encoder stays in eval mode."""
        return super().train(mode and not getattr(self, "frozen", False))

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, path: str) -> None:
        """Load the text tower from a local checkpoint (safe loading, image-tower keys ignored)."""
        ckpt = load_checkpoint(path)
        hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
        trained_arch = hparams.get("arch")
        if trained_arch is not None and trained_arch != self.arch and not same_text_tower(trained_arch, self.arch):
            raise ValueError(f"{path} was trained with arch={trained_arch!r}, whose text tower differs from "
                             f"{self.arch!r}'s; build the encoder with arch={trained_arch!r}.")
        state, layout = extract_open_clip_text_state(ckpt.get("state_dict", ckpt))
        if layout.startswith("transformers") and not self._uses_quick_gelu():
            warnings.warn(f"{path} is in the transformers CLIP layout, usually OpenAI weights trained with QuickGELU, "
                          f"but {self.arch!r} uses GELU: pass quick_gelu=True (or arch 'ViT-L-14-quickgelu') unless "
                          f"these weights were trained with GELU.")
        expected = self.model.state_dict()
        if "text_projection" not in state:  # transformers CLIPTextModel has no projection
            self._fill_missing_projection(state, path)
        if "logit_scale" not in state:  # not used for conditioning; keep the init value
            state["logit_scale"] = expected["logit_scale"]
        state.pop("logit_bias", None)
        self._shorten_context(state, expected["positional_embedding"].shape[0], path)
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{path} ({layout}) does not fit arch {self.arch!r}: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}. Check arch (and quick_gelu for OpenAI weights)."
            )
        shapes = [k for k in expected if state[k].shape != expected[k].shape]
        if shapes:
            k = shapes[0]
            raise ValueError(f"{path} ({layout}) does not fit arch {self.arch!r}: {k} has shape "
                             f"{tuple(state[k].shape)}, the model {tuple(expected[k].shape)}.")
        self.model.load_state_dict(state)
        log.info(f"Loaded text encoder {self.arch} from {path} ({layout}).")

    @staticmethod
    def _shorten_context(state: dict, length: int, path: str) -> None:
        """Fit weights trained with a longer context to ``length`` tokens: keep the first ``length``
        positional embeddings. Under the causal mask the kept positions encode exactly as before."""
        trained = state.get("positional_embedding")
        if trained is not None and trained.shape[0] > length:
            state["positional_embedding"] = trained[:length].clone()
            log.info(f"{path}: context {trained.shape[0]} -> {length} tokens (first {length} positions kept).")

    def _uses_quick_gelu(self) -> bool:
        return isinstance(self.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)

    def _fill_missing_projection(self, state: dict, path: str) -> None:
        width, embed = self.model.text_projection.shape
        if width != embed:
            raise ValueError(f"{path} has no text_projection and width {width} != embed_dim {embed}: cannot fill it.")
        warnings.warn(f"{path} has no text projection (transformers CLIPTextModel): using the identity, so "
                      f"`pooled` equals transformers' pooler_output. Conditioning (`context`) is unaffected.")
        state["text_projection"] = torch.eye(width, dtype=self.model.token_embedding.weight.dtype)

    # ------------------------------------------------------------------ encoding
    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens [B, L] -> {"context": [B, L, D], "pooled": [B, E]}."""
        penultimate, last, pooled = text_transformer(self.model, tokens)
        context = last if self.layer == "last" else self.model.ln_final(penultimate)
        return {"context": context, "pooled": pooled}

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts -> [B, L] token ids on the encoder's device."""
        tokens, device = self.tokenizer(prompts), self.model.token_embedding.weight.device
        if device.type == "cuda":  # pinned + non-blocking: the copy does not wait for the queued GPU work
            tokens = tokens.pin_memory()
        return tokens.to(device, non_blocking=True)

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """prompts -> {"context": [B, L, D], "pooled": [B, E], "tokens": [B, L]}; "" is the unconditional prompt."""
        tokens = self.tokenize(prompts)
        with torch.no_grad() if self.frozen else torch.enable_grad():
            out = self(tokens)
        return {**out, "tokens": tokens}

    def null_context(self, batch: int) -> torch.Tensor:
        """Context of the empty prompt, broadcast to [batch, L, D] (a view: do not write into it)."""
        return self.encode([""])["context"].expand(batch, -1, -1)
