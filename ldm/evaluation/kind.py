"""Which training stage wrote a checkpoint: decides what ``scripts/evaluate.py`` measures."""

from __future__ import annotations

from pathlib import Path

from ldm.checkpoints import UnsafeCheckpointError, load_checkpoint

KINDS = ("diffusion", "autoencoder")


def _hyper_parameters(path: Path) -> dict:
    """The checkpoint's ``hyper_parameters`` (memory-mapped, so tensors are not read; safe loading)."""
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except RuntimeError as err:  # a pre-zip (legacy) file cannot be memory-mapped: read it whole
        if isinstance(err, UnsafeCheckpointError):
            raise
        ckpt = load_checkpoint(path)
    return dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}


def checkpoint_kind(path: str | Path, kind: str = "auto") -> str:
    """``"diffusion"`` (a LatentDiffusion checkpoint) or ``"autoencoder"`` (a stage-1 AutoencoderKL one).

    ``kind`` other than ``"auto"`` is returned as given after validation.
    """
    if kind != "auto":
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; choose auto, {', '.join(KINDS)}.")
        return kind
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint not found: ckpt={path}.")
    if path.suffix == ".safetensors":
        raise ValueError(f"{path} is a bare safetensors file with no hyper-parameters: evaluate the Lightning "
                         f"checkpoint (checkpoints/last.ckpt) of the run instead.")
    hparams = _hyper_parameters(path)
    if "unet_config" in hparams:
        return "diffusion"
    if "ddconfig" in hparams:
        return "autoencoder"
    if "arch" in hparams:
        raise ValueError(f"{path} is a stage-0 CLIP checkpoint: pass it as clip_ckpt=... (CLIP score and FID "
                         f"features) and give a diffusion or autoencoder checkpoint as ckpt=...")
    raise ValueError(f"Cannot tell what {path} is (no unet_config or ddconfig hyper-parameters): set "
                     f"kind=diffusion or kind=autoencoder, or pass a checkpoint written by train.py.")
