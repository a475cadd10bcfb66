"""Stage-2 training step from cached latents (and text embeddings, ``ldm.data.latents``) against online encoding.

The same ``LatentDiffusion`` (composed through Hydra as ``train.py`` would, first stage at a seeded random
init: weights do not change the cost) runs full training steps (``diffusion_step``: posterior sample or
encoder forward, text encoder or cached text, U-Net forward + backward, AdamW step, EMA update) on one batch
held in memory, alternating three inputs in one process: images [B, 3, H, W] (encoded every step, as
``data=shapes32``), their cached posterior moments [B, C, h, w] in float16 (as ``data=shapes32_latents``), and
the moments plus the captions' cached text embeddings (context [B, L, D], pooled [B, P] in float16, as a cache
written with ``scripts/encode_latents.py text_encoder=...``). The table gives the median step times, samples/s
and the speed-up of each cache over online encoding.

With ``--loader`` it also times the data modules (decode + collation, workers=0) on the same images written as
shards, as a latent cache and as a latent + text cache, so the step gain can be set against the loading cost.

    python benchmarks/cached_latents.py                          # quickstart + sd-like, CPU
    python benchmarks/cached_latents.py --configs sd15 --iters 3 --warmup 1   # SD-1.5 at full size (~20 GB)
    python benchmarks/cached_latents.py --configs sd15 --iters 3 --warmup 1 --bf16   # as bf16-mixed trains it
    python benchmarks/cached_latents.py --configs quickstart --iters 20 --threads 1 --loader
    python benchmarks/cached_latents.py --device cuda --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ldm.utils.resolvers  # noqa: E402,F401  (registers the resolvers the configs use)
from ldm.models.text_cache import text_encoder_identity  # noqa: E402
from _report import add_malloc_flag, append_markdown, keep_host_memory, malloc_label  # noqa: E402  (benchmarks/)

# name -> (train.py overrides, autoencoder experiment for the first stage or None, image side, batch)
CONFIGS = {
    # the quickstart: configs/model/ldm_tiny.yaml + the f=4 autoencoder of quickstart_autoencoder, 32 px -> 8x8x4
    "quickstart": (["experiment=quickstart_ldm"], "quickstart_autoencoder", 32, 64),
    # SD-1.5 topology (model=sd15: kl-f8 autoencoder, U-Net with attention at 3 levels) at reduced width:
    # autoencoder ch 32 (SD 128), U-Net 64 channels (SD 320), tiny text encoder; 128 px -> 16x16x4
    "sd-like": (["model=sd15", "model.unet_config.model_channels=64", "model.unet_config.context_dim=128",
                 "model.unet_config.use_checkpoint=false", "model.cond_stage_config.arch=ldm-tiny-clip",
                 "model.first_stage_config.ddconfig.ch=32", "model.first_stage_config.ddconfig.resolution=128",
                 "+model.first_stage_config.ddconfig.norm_num_groups=8"], None, 128, 4),
    # SD-1.5 at full size (model=sd15, random weights): kl-f8 VAE (ch 128; its encoder 273 GFLOP per 256 px image),
    # U-Net 860M (541.6 GFLOP per training image, fwd + bwd), ViT-L/14 text encoder; 256 px -> 32x32x4, as
    # MosaicML's SD-2 runs at 256 px. About 20 GB of host memory at batch 4 (weights, grads, AdamW, EMA).
    "sd15": (["model=sd15"], None, 256, 4),
}
CAPTIONS = ["a red circle", "a small green square in the top left on a white background", "a blue triangle", ""]


def compose_model_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose("train", overrides=overrides).model


def build_model(name: str, device: torch.device):
    """(LatentDiffusion, AdamW) of config ``name``, first stage at a seeded random init."""
    overrides, ae_experiment, _, _ = CONFIGS[name]
    cfg = compose_model_config(overrides)
    if ae_experiment is not None:  # the stage-1 architecture of that experiment, without a checkpoint file
        ae = compose_model_config([f"experiment={ae_experiment}"])
        with open_dict(cfg):
            cfg.first_stage_config = {"ddconfig": OmegaConf.to_container(ae.ddconfig), "embed_dim": ae.embed_dim}
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg, _convert_="all").to(device)
    model.train()
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    return model, optimizer


def make_batches(model, image_size: int, batch: int, device: torch.device) -> dict[str, dict]:
    """One image batch and the cached batches made from it (fp16 posterior moments and text embeddings, as the
    cache stores them)."""
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, image_size, image_size, generator=generator) * 2 - 1).to(device)  # [B, 3, H, W]
    with torch.no_grad():
        posterior = model.first_stage_model.encode(images)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    cached = {"latent_mean": posterior.mean.half(), "latent_logvar": posterior.logvar.half(),  # [B, C, h, w] each
              "caption": captions, "latent_source": [model.first_stage_identity()] * batch}  # checked every step
    text = model.cond_stage_model.encode(captions)
    with_text = {**cached, "text_context": text["context"].half(),  # [B, L, D]
                 "text_pooled": text["pooled"].half(),  # [B, P]
                 "text_source": [text_encoder_identity(model.cond_stage_model)] * batch}  # checked every step
    return {"images": {"image": images, "caption": captions}, "cached latents": cached, "latents + text": with_text}


def train_step(model, optimizer, batch: dict, bf16: bool = False) -> None:
    """What Lightning runs per batch for LatentDiffusion (without its bookkeeping); with ``bf16`` the forward runs
    under bf16 autocast and the backward outside it, as ``trainer.precision=bf16-mixed`` does."""
    optimizer.zero_grad(set_to_none=True)
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        loss = model.diffusion_step(batch)["loss"]
    loss.backward()
    optimizer.step()
    if model.model_ema is not None:
        model.model_ema.update(model.model)


def bench_step(name: str, args, device: torch.device) -> dict:
    model, optimizer = build_model(name, device)
    _, _, image_size, batch = CONFIGS[name]
    batch = args.batch_size or batch
    batches = make_batches(model, image_size, batch, device)
    times = {k: [] for k in batches}
    for i in range(args.warmup + args.iters):
        order = list(batches) if i % 2 == 0 else list(reversed(batches))  # alternate who goes first
        for key in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, optimizer, batches[key], args.bf16)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    latent = list(batches["cached latents"]["latent_mean"].shape[1:])
    return {"config": name, "batch": batch, "image": image_size, "latent": "x".join(map(str, latent)),
            "unet_M": sum(p.numel() for p in model.unet.parameters()) / 1e6,
            "ae_M": sum(p.numel() for p in model.first_stage_model.encoder.parameters()) / 1e6,
            "text_M": sum(p.numel() for p in model.cond_stage_model.parameters()) / 1e6,
            "ms": {k: v * 1e3 for k, v in med.items()}, "sps": {k: batch / v for k, v in med.items()},
            "speedup": {k: med["images"] / v for k, v in med.items() if k != "images"}}


def bench_loaders(args, device: torch.device) -> list[dict]:
    """Samples/s of WebDataModule (PNG decode) vs LatentDataModule (safetensors decode), same 32 px shapes."""
    from ldm.data.latents import LatentDataModule, latent_record
    from ldm.data.shards import write_shards
    from ldm.data.synthetic import ShapesSource
    from ldm.data.webdataset import WebDataModule

    import webdataset as wds

    model, _ = build_model("quickstart", device)
    identity = {"encoder_sha256": "benchmark"}
    text_identity = text_encoder_identity(model.cond_stage_model)
    n, batch = args.loader_samples, CONFIGS["quickstart"][3]
    with tempfile.TemporaryDirectory() as tmp:
        images = write_shards(ShapesSource(n, resolution=32, seed=0), tmp, prefix="train", progress=False)
        reader = WebDataModule(None, images.pattern, image_size=32, batch_size=batch)
        reader.setup("validate")
        latents, with_text = str(Path(tmp) / "latents-000000.tar"), str(Path(tmp) / "text-000000.tar")
        with (wds.TarWriter(latents, encoder=False, mtime=0) as sink,
              wds.TarWriter(with_text, encoder=False, mtime=0) as text_sink):
            for b in reader.val_dataloader():
                with torch.no_grad():
                    posterior = model.first_stage_model.encode(b["image"].to(device))
                    text = model.cond_stage_model.encode(b["caption"])
                for i, (key, caption) in enumerate(zip(b["key"], b["caption"])):
                    mean, logvar = posterior.mean[i], posterior.logvar[i]  # [C, h, w]
                    sink.write(latent_record(key, mean, logvar, caption, {}, identity, 32))
                    row = {"text_context": text["context"][i], "text_pooled": text["pooled"][i]}  # [L, D], [P]
                    text_sink.write(latent_record(key, mean, logvar, caption, {}, identity, 32, row, text_identity))
        modules = {"images (png)": WebDataModule(None, images.pattern, image_size=32, batch_size=batch),
                   "cached latents (safetensors)": LatentDataModule(None, latents, batch_size=batch),
                   "latents + text (safetensors)": LatentDataModule(None, with_text, batch_size=batch)}
        rates = {k: [] for k in modules}
        for _ in range(args.loader_repeats):
            for key, dm in modules.items():
                dm.setup("validate")
                start, count = time.perf_counter(), 0
                for b in dm.val_dataloader():
                    count += len(b["caption"])
                rates[key].append(count / (time.perf_counter() - start))
    return [{"loader": k, "samples": n, "sps": statistics.median(v)} for k, v in rates.items()]


def _rate(samples_per_s: float) -> str:
    """Whole samples/s from 100, one decimal from 1, three significant figures below 1: 128, 95.1, 0.0803."""
    if samples_per_s >= 100:
        return f"{samples_per_s:.0f}"
    return f"{samples_per_s:.1f}" if samples_per_s >= 1 else f"{samples_per_s:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["quickstart", "sd-like"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="override every config's batch size")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per input kind")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (1 gives stable numbers on a machine shared with other jobs)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over the forward (bf16-mixed)")
    add_malloc_flag(parser)
    parser.add_argument("--loader", action="store_true", help="also time both data modules (32 px shapes)")
    parser.add_argument("--loader-samples", type=int, default=2048)
    parser.add_argument("--loader-repeats", type=int, default=3)
    parser.add_argument("--append", type=Path, default=None, metavar="BENCHMARKS.md",
                        help="append the tables to this file with command, machine and date")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory_kept = keep_host_memory(args)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    setup = f"{'bf16 autocast' if args.bf16 else 'fp32'}, {malloc_label(memory_kept)}"
    lines = [f"Device: {where}; {setup}. Median of {args.iters} training steps per input after {args.warmup} warm-up, "
             "alternating images (both encoders every step), cached latents (text encoder every step) and cached "
             "latents + text (no encoder) on the same model in one process. Speed-up: over images.", "",
             "| config | batch | image px | latent | U-Net | AE encoder | text encoder | step, images | "
             "step, latents | "
             "step, latents + text | samples/s, images | samples/s, latents | samples/s, latents + text | "
             "speed-up, latents | speed-up, latents + text |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    kinds = ("images", "cached latents", "latents + text")
    for name in args.configs:
        r = bench_step(name, args, device)
        row = (f"| {r['config']} | {r['batch']} | {r['image']} | {r['latent']} | {r['unet_M']:.1f}M | "
               f"{r['ae_M']:.2f}M | {r['text_M']:.2f}M | " + " | ".join(f"{r['ms'][k]:.1f} ms" for k in kinds) + " | "
               + " | ".join(_rate(r["sps"][k]) for k in kinds) + " | "
               + " | ".join(f"{r['speedup'][k]:.2f}x" for k in kinds[1:]) + " |")
        lines.append(row)
        print(row, flush=True)
    if args.loader:
        loader_lines = ["", f"Loaders, workers=0, 32 px shapes, batch {CONFIGS['quickstart'][3]} "
                        f"(median of {args.loader_repeats} passes):", "", "| loader | samples | samples/s |",
                        "|---|---|---|"]
        loader_lines += [f"| {r['loader']} | {r['samples']} | {r['sps']:.0f} |" for r in bench_loaders(args, device)]
        print("\n".join(loader_lines))
        lines += loader_lines
    if args.append:
        append_markdown(args.append, "Cached latents and text vs online encoding (stage-2 training step)",
                        "\n".join(lines))


if __name__ == "__main__":
    main()
