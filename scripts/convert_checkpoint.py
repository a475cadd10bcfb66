"""Convert Stable Diffusion weights between the original single file, diffusers folders and this project.

    # original SD 1.5 file -> diffusers folder (EMA U-Net, fp16 weights)
    python scripts/convert_checkpoint.py --model sd15 --from sd --to diffusers \
        v1-5-pruned.safetensors out/sd15-diffusers --dtype fp16
    # diffusers SD 2.1 (768, v-prediction) -> checkpoint of this project (fine-tune / sample with it)
    python scripts/convert_checkpoint.py --model sd21_v --from diffusers --to ldm sd21/ out/sd21_v.ckpt
    # a fine-tuned checkpoint of this project -> original single file (raw and EMA weights kept)
    python scripts/convert_checkpoint.py --from ldm --to sd last.ckpt out/finetuned.safetensors --keep-ema
    # a smaller U-Net or other changes: Hydra overrides of the model config
    python scripts/convert_checkpoint.py --model sd15 --from sd --to ldm in.ckpt out.ckpt model.ema_decay=null

Formats: ``sd`` (original single file: .safetensors, or .ckpt read with torch.load(weights_only=True)),
``diffusers`` (folder with unet/, vae/, text_encoder/), ``ldm`` (this project's checkpoint). Files are
never unpickled: a .ckpt holding code is refused before anything runs. The architecture comes from
``--model`` (configs/model/NAME.yaml) or, for ``--from ldm``, from the checkpoint itself.
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

import torch
from tqdm import tqdm

from ldm.checkpoints import load_state_dict
from ldm.convert.checkpoint import (
    checkpoint_format,
    load_weights,
    save_project_checkpoint,
    save_sd_single_file,
)

FORMATS = ("sd", "diffusers", "ldm")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
log = logging.getLogger("convert_checkpoint")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("src", type=Path, help="input file or diffusers folder")
    parser.add_argument("dst", type=Path, help="output file (.safetensors for sd, .ckpt for ldm) or folder (diffusers)")
    parser.add_argument("--from", dest="src_format", choices=FORMATS, required=True)
    parser.add_argument("--to", dest="dst_format", choices=FORMATS, required=True)
    parser.add_argument("--model", help="architecture: configs/model/NAME.yaml (sd15, sd21_base, sd21_v); "
                                        "not needed with --from ldm")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA U-Net weights when the input has them (default), else the raw ones")
    parser.add_argument("--keep-ema", action="store_true",
                        help="sd/ldm outputs: keep raw and EMA weights side by side (a lossless conversion)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating weights of sd/diffusers outputs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the model config, e.g. model.ema_decay=null")
    args = parser.parse_args(argv)
    if args.src_format != "ldm" and not args.model:
        parser.error(f"--from {args.src_format} needs --model (sd15 | sd21_base | sd21_v or another configs/model name).")
    if args.dst.exists() and not args.overwrite:
        parser.error(f"{args.dst} exists; pass --overwrite to replace it.")
    if args.keep_ema and args.dst_format == "diffusers":
        parser.error("--keep-ema applies to sd and ldm outputs; a diffusers folder holds one U-Net (choose with --ema).")
    return args


def model_config(name: str, overrides: Sequence[str], keep_ema: bool, dst_format: str) -> dict:
    """The composed ``model=name`` config (as train.py composes it), as plain containers."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(config_name="train", overrides=[f"model={name}", *overrides]).model
    cfg = OmegaConf.to_container(cfg, resolve=True)
    if dst_format != "ldm" and not keep_ema:
        cfg["ema_decay"] = None  # one U-Net is written: skip the EMA copy (saves its memory)
    return cfg


def build_model(args: argparse.Namespace, state: Optional[dict]):
    """The LatentDiffusion with the input's weights."""
    import hydra

    from ldm.models.diffusion import load_latent_diffusion

    if args.src_format == "ldm":
        model = load_latent_diffusion(str(args.src))
        if args.ema and not args.keep_ema and model.ema_unet is not None:
            model.unet.load_state_dict(model.ema_unet.state_dict())
        return model
    cfg = model_config(args.model, args.overrides, args.keep_ema, args.dst_format)
    model = hydra.utils.instantiate(cfg, _convert_="all", init_from=None)
    report = load_weights(model, state if state is not None else args.src, use_ema=args.ema and not args.keep_ema)
    log.info(report.summary())
    return model


def write(model, args: argparse.Namespace) -> None:
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.dst_format == "sd":
        save_sd_single_file(model, args.dst, include_ema=args.keep_ema, dtype=dtype)
    elif args.dst_format == "diffusers":
        from ldm.convert.diffusers_folder import save_diffusers_folder

        save_diffusers_folder(model, args.dst, use_ema=False, dtype=dtype)  # the chosen weights are in model.unet
    else:
        if dtype is not None:
            log.warning("--dtype is ignored for ldm outputs: training checkpoints keep fp32 weights.")
        save_project_checkpoint(model, args.dst)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    found = checkpoint_format(args.src)
    if (found == "diffusers") != (args.src_format == "diffusers"):
        raise SystemExit(f"--from {args.src_format}, but {args.src} is a {'folder' if found == 'diffusers' else 'file'}.")
    steps = tqdm(total=3, desc="convert", unit="step")
    state = None
    if args.src_format == "sd":  # read (safely) first: a bad or unsafe file fails before the model is built
        steps.set_postfix_str(f"reading {args.src.name}")
        state = load_state_dict(args.src)
    steps.update()
    steps.set_postfix_str("building the model and loading weights")
    model = build_model(args, state)
    del state
    steps.update()
    steps.set_postfix_str(f"writing {args.dst}")
    write(model, args)
    steps.update()
    steps.close()
    print(f"Wrote {args.dst} ({args.dst_format}).")
    return args.dst


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    main()
