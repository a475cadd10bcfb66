"""Tiny open_clip architectures for 32-64 px images, registered through open_clip's own config registry.

After :func:`register_clip_configs` (called by every ``ldm`` entry point that builds a CLIP model), the
names below work anywhere open_clip takes a model name (``open_clip.create_model("ldm-tiny-clip")``,
``open_clip.get_tokenizer(...)``). They keep the CLIP BPE tokenizer (vocab 49408) and the 77-token
context of SD, so a text tower trained here conditions the U-Net exactly like SD 2.x's OpenCLIP.

| name              | image | patch | vision width x layers | text width x layers (heads) | embed |
|-------------------|-------|-------|-----------------------|-----------------------------|-------|
| ldm-tiny-clip     | 32    | 4     | 128 x 4               | 128 x 4 (4)                 | 128   |
| ldm-tiny-clip-rn  | 32    | -     | ResNet 1-1-1-1, w 16  | 128 x 4 (4)                 | 128   |
| ldm-tiny-clip-64  | 64    | 8     | 128 x 4               | 128 x 4 (4)                 | 128   |
| ldm-small-clip    | 64    | 8     | 256 x 6               | 256 x 6 (4)                 | 256   |

``ldm-tiny-clip-rn`` pairs the ``ldm-tiny-clip`` text tower with open_clip's ``ModifiedResNet`` image tower (CLIP's
RN50 design: bottleneck blocks, attention pooling) at one block per stage and base width 16. On 32 px shapes it
learns shapes far sooner than the patch-4 ViT (zero-shot 0.98 against 0.61 after 600 steps, in half the time:
BENCHMARKS.md), and its text tower is the same, so either checkpoint conditions a U-Net built with either name.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import open_clip
from torch import nn

from ldm.modules.clip_attention import take_attention_products_in_fp32


def _config(image_size: int, patch: int, width: int, layers: int, heads: int, embed_dim: int) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch, "width": width, "layers": layers,
                       "head_width": width // heads, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads,
                     "layers": layers, "mlp_ratio": 4.0},
    }


TINY_CLIP_CONFIGS: dict[str, dict] = {
    "ldm-tiny-clip": _config(image_size=32, patch=4, width=128, layers=4, heads=4, embed_dim=128),
    "ldm-tiny-clip-64": _config(image_size=64, patch=8, width=128, layers=4, heads=4, embed_dim=128),
    "ldm-small-clip": _config(image_size=64, patch=8, width=256, layers=6, heads=4, embed_dim=256),
}
TINY_CLIP_CONFIGS["ldm-tiny-clip-rn"] = {  # ModifiedResNet image tower (layers as a list), ldm-tiny-clip's text tower
    **TINY_CLIP_CONFIGS["ldm-tiny-clip"],
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64},
}

_registry_dir: Path | None = None


def register_clip_configs() -> None:
    """Make the tiny architectures known to open_clip (idempotent, cheap after the first call).

    open_clip reads architecture JSON files from the folders given to ``open_clip.add_model_config``;
    the configs are written once per process to a private temporary folder (removed at exit).
    """
    global _registry_dir
    if _registry_dir is not None and all(name in open_clip.list_models() for name in TINY_CLIP_CONFIGS):
        return
    _registry_dir = Path(tempfile.mkdtemp(prefix="ldm_open_clip_configs_"))
    atexit.register(shutil.rmtree, _registry_dir, ignore_errors=True)
    for name, cfg in TINY_CLIP_CONFIGS.items():
        (_registry_dir / f"{name}.json").write_text(json.dumps(cfg, indent=2))
    open_clip.add_model_config(_registry_dir)


@functools.lru_cache(maxsize=None)  # configs do not change once registered; the text cache asks once per batch
def same_text_tower(arch_a: str, arch_b: str) -> bool:
    """Whether two open_clip architectures build identical text towers (text config and embedding size), so
    text-tower weights trained under one name load into the other. False if either name is unknown."""
    register_clip_configs()
    configs = [open_clip.get_model_config(arch) for arch in (arch_a, arch_b)]
    if any(cfg is None for cfg in configs):
        return False
    a, b = ({"embed_dim": cfg.get("embed_dim"), "text_cfg": cfg.get("text_cfg"), "quick_gelu": cfg.get("quick_gelu", False)}
            for cfg in configs)
    return a == b


# A tiny stand-in for the image tower of a text-only model: open_clip's CLIP class always builds
# one, and the real tower of e.g. ViT-H-14 (630M parameters) would be built only to be deleted.
_STUB_VISION = {"image_size": 4, "patch_size": 4, "width": 8, "layers": 1, "head_width": 8}


@contextmanager
def _quiet_random_init_warning():
    """Silence open_clip's root-logger warning about random init: weights are loaded by the caller."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def create_clip_model(
    arch: str,
    text_only: bool = False,
    quick_gelu: bool = False,
    context_length: int | None = None,
) -> open_clip.CLIP:
    """A randomly initialised open_clip ``CLIP`` (never downloads anything).

    With ``text_only`` the image tower is removed (``del model.visual``, as SD 2.x's
    FrozenOpenCLIPEmbedder does), leaving the text keys ``transformer.*``, ``token_embedding``,
    ``positional_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``.
    """
    register_clip_configs()
    if open_clip.get_model_config(arch) is None:
        raise ValueError(
            f"Unknown open_clip architecture {arch!r}. Use an open_clip name (e.g. 'ViT-H-14', "
            f"'ViT-L-14-quickgelu') or one of ldm's tiny configs {list(TINY_CLIP_CONFIGS)}."
        )
    overrides = {"vision_cfg": dict(_STUB_VISION)} if text_only else {}
    with _quiet_random_init_warning():
        model = open_clip.create_model(
            arch,
            pretrained=None,
            pretrained_image=False,
            pretrained_text=False,
            force_quick_gelu=quick_gelu,
            force_context_length=context_length,
            **overrides,
        )
    if type(model) is not open_clip.CLIP:
        raise ValueError(
            f"open_clip builds {arch!r} as {type(model).__name__}; ldm supports architectures with open_clip's "
            f"built-in text transformer and CLIP BPE tokenizer (class CLIP), e.g. ViT-L-14, ViT-H-14, "
            f"ViT-bigG-14, ldm-tiny-clip."
        )
    if text_only:
        del model.visual
    run_sequence_first(model)
    take_attention_products_in_fp32(model)  # bf16-mixed on a CPU: the attention product in fp32 (clip_attention.py)
    return model


def run_sequence_first(model: nn.Module, sequence_first: bool = True) -> int:
    """Switch every open_clip ``Transformer`` in ``model`` whose blocks use ``nn.MultiheadAttention`` to the
    sequence-first layout (tokens [L, B, D] between blocks, as open_clip ran before 2.24; ``sequence_first=False``:
    back to batch-first); the number of transformers switched.

    Batch-first, ``nn.MultiheadAttention`` transposes its input to [L, B, D] and projects that strided view. When
    the projection weight needs no gradient (a frozen tower, or any tower under ``no_grad`` and autocast) torch's
    ``matmul`` cannot fold the strided batch into one matrix product and runs ``bmm`` on the weight expanded L
    times; in CPU bf16 that expansion is copied (ViT-L/14's text tower, 4 prompts of 77 tokens: 1.9 s against
    0.09 s sequence-first, ``benchmarks/text_encoder.py``). The weights, their names and the outputs are the same
    in either layout (``Transformer.forward`` transposes at its ends; ``text_transformer`` reads ``batch_first``).
    """
    switched = 0
    for transformer in model.modules():
        if not isinstance(transformer, open_clip.transformer.Transformer) or transformer.batch_first != sequence_first:
            continue
        attentions = [getattr(block, "attn", None) for block in transformer.resblocks]
        if not all(isinstance(attn, nn.MultiheadAttention) for attn in attentions):
            continue  # another attention class: leave its layout to open_clip
        transformer.batch_first = not sequence_first
        for attn in attentions:
            attn.batch_first = not sequence_first
        switched += 1
    return switched
