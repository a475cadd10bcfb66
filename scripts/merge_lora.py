"""Fold a LoRA adapter into its base model and write a plain checkpoint of this project.

    # the adapter file of a model.lora run on top of the base checkpoint it was trained from
    python scripts/merge_lora.py BASE.ckpt merged.ckpt --lora RUN/checkpoints/lora_adapter.safetensors [--scale 1.0]
    # or the run's own Lightning checkpoint (it holds the base weights and the adapters)
    python scripts/merge_lora.py RUN/checkpoints/last.ckpt merged.ckpt

The merged U-Net is ``W + scale * (alpha / rank) * B A`` on every adapted layer (ldm/lora.py): the model the adapter
was trained in, without adapters and without EMA. It samples, evaluates and fine-tunes like any ``*_ldm``
checkpoint. Files are read safely (safetensors, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

from ldm.convert.checkpoint import save_project_checkpoint  # noqa: E402
from ldm.finetune import latent_diffusion_from_ldm_checkpoint  # noqa: E402
from ldm.lora import SPEC_KEYS, has_lora, load_lora_state_dict, merge_lora, read_adapter  # noqa: E402
from ldm.models.diffusion import LatentDiffusion, load_latent_diffusion  # noqa: E402
from ldm.utils.sampling_io import file_hash  # noqa: E402

log = logging.getLogger("merge_lora")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("ckpt", type=Path, help="the base checkpoint, or the Lightning checkpoint of a model.lora run")
    parser.add_argument("out", type=Path, help="the merged checkpoint to write (.ckpt)")
    parser.add_argument("--lora", type=Path, help="adapter file (lora_adapter.safetensors) trained on ckpt")
    parser.add_argument("--scale", type=float, default=1.0, help="strength of the adapter (1 = as trained)")
    return parser.parse_args(argv)


def model_with_adapter(ckpt: Path, lora: Optional[Path]) -> LatentDiffusion:
    """The model the adapter was trained in, adapters in place (not merged yet)."""
    if lora is None:
        model = load_latent_diffusion(str(ckpt))
        if not has_lora(model.unet):
            raise ValueError(f"{ckpt} holds no LoRA adapters: pass the adapter with --lora, or the checkpoint of a "
                             f"model.lora run.")
        return model
    state, info = read_adapter(lora)
    base = info.get("base") or {}
    if base.get("sha256") and base["sha256"] != file_hash(ckpt, length=64):
        log.warning(f"{ckpt} is not the file the adapter was trained on ({base.get('path')}, sha256 "
                    f"{base['sha256'][:10]}...): the merged model may be off.")
    spec = {k: info[k] for k in SPEC_KEYS if k in info}
    model = latent_diffusion_from_ldm_checkpoint(str(ckpt), init_ema=base.get("weights", "ema") == "ema",
                                                 lora=spec, ema_decay=None)
    load_lora_state_dict(model.unet, state, source=str(lora))
    return model


def main(argv: Optional[Sequence[str]] = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    model = model_with_adapter(args.ckpt, args.lora)
    merge_lora(model.unet, args.scale)
    model.hparams["lora"] = None
    save_project_checkpoint(model, args.out)
    log.info(f"Merged checkpoint (adapter scale {args.scale}) written to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
