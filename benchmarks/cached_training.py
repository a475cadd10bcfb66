"""Whole-loop training throughput from cached latents + text against online encoding, same model, same images.

``cached_latents.py`` times the bare training step on one batch in memory; this script times what a user gets:
``Trainer.fit`` as ``train.py`` composes it (``configs/train.yaml`` + ``experiment=...``: callbacks, CSV logger,
the experiment's data-loader workers), reading

- **online**: the experiment's image shards (``data=shapes32``: PNG decode in the loader, autoencoder encoder and
  text encoder every step), and
- **cached**: the same shards encoded once by ``scripts/encode_latents.py``'s ``encode_split`` through this very
  model's first stage and text encoder (latent moments + text embeddings in float16, ``data=shapes32_latents``:
  no encoder runs),

alternating the two in rounds on one model in one process. Each fit times ``--steps`` optimizer steps after
``--warmup`` (from the first timed batch to the end of the last, so loading between batches counts; setup,
validation and the final checkpoint do not). The default warm-up runs past the online stream's shuffle-buffer
fill (``loop_overhead.steady_state_warmup``), for both inputs; a cache small enough to be held in memory
(``data.in_memory: auto``, :mod:`ldm.data.latent_memory`) is read at setup, outside the window, as in a real run.
The cache is also timed streamed (``data.in_memory=false``). The first stage is the experiment's autoencoder
architecture at a seeded random init (the weights do not change the cost).

    python benchmarks/cached_training.py                              # quickstart_ldm, 2 image shards
    python benchmarks/cached_training.py --steps 30 --rounds 3 --append BENCHMARKS.md
    python benchmarks/cached_training.py --overrides model.compile=true   # both inputs with a compiled U-Net
    python benchmarks/cached_training.py --overrides extras.host_malloc=null   # glibc's malloc defaults
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from loop_overhead import (build_model, compose_config, fit_seconds_per_step,  # noqa: E402  (benchmarks/)
                           loader_in_use, steady_state_warmup, throughput_overrides)
from _report import append_markdown, host_malloc_label, load_average  # noqa: E402
from encode_latents import encode_split  # noqa: E402  (scripts/encode_latents.py)
from ldm.models.text_cache import text_encoder_identity  # noqa: E402
from ldm.utils.run import apply_extras  # noqa: E402
from ldm.data.shards import brace_pattern  # noqa: E402
from ldm.data.webdataset import missing_local_shards  # noqa: E402


def image_shards(image_cfg, shards: int) -> list[str]:
    """The first ``shards`` train shards of ``image_cfg.data``, built first if this is a fresh clone."""
    hydra.utils.instantiate(image_cfg.data, _convert_="all").prepare_data()  # builds the embedded shards on first use
    urls, missing = missing_local_shards(image_cfg.data.train_shards)
    if missing:
        raise FileNotFoundError(f"image shards missing: {missing[:3]}")
    return urls[:shards]


def write_cache(model, urls: list[str], image_size: int, out: Path) -> str:
    """Encode the image shards ``urls`` with the model's own encoders into ``out``; the latent shards' pattern."""
    # scripts/encode_latents.py's own defaults (configs/encode_latents.yaml), so a new option reaches the benchmark
    defaults = OmegaConf.load(ROOT / "configs" / "encode_latents.yaml")
    encode_cfg = OmegaConf.create({"batch_size": defaults.batch_size, "caption_memory_mb": defaults.caption_memory_mb,
                                   "out": str(out), "force": True, "precision": "fp32", "progress": False,
                                   "data": {"image_size": image_size}})
    text = (model.cond_stage_model.eval(), text_encoder_identity(model.cond_stage_model))
    summary = encode_split("train", urls, model.first_stage_model.eval(), encode_cfg,
                           model.first_stage_identity(), torch.device("cpu"), text)
    return summary["pattern"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="quickstart_ldm")
    parser.add_argument("--autoencoder-experiment", default="quickstart_autoencoder")
    parser.add_argument("--latents-data", default="shapes32_latents", help="the latent data config of the cache")
    parser.add_argument("--shards", type=int, default=2, help="image shards encoded and read by both (2,000 each)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps at the start of every fit (default: past the shuffle buffer's fill)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median over them)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="extra train.py overrides for every input (key=value, e.g. model.compile=true)")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        base = throughput_overrides(args.experiment) + args.overrides
        image_cfg = compose_config(base, Path(tmp) / "online")
        apply_extras(image_cfg)  # as train.py: e.g. host memory kept for reuse (extras.host_malloc)
        model = build_model(image_cfg, args.autoencoder_experiment)
        urls = image_shards(image_cfg, args.shards)
        pattern = write_cache(model, urls, int(image_cfg.data.image_size), Path(tmp) / "latents")
        prefix = Path(urls[0]).name.rsplit("-", 1)[0]  # "train" of train-000000.tar
        image_pattern = brace_pattern(Path(urls[0]).parent, prefix, len(urls))
        image_cfg = compose_config(base + [f"data.train_shards='{image_pattern}'", "data.val_shards=null"],
                                   Path(tmp) / "online")
        cache = base + [f"data={args.latents_data}", f"data.train_shards='{pattern}'", "data.val_shards=null"]
        cached_cfg = compose_config(cache, Path(tmp) / "cached")
        streamed_cfg = compose_config(cache + ["data.in_memory=false"], Path(tmp) / "streamed")
        model.train()
        if args.warmup is None:
            args.warmup = steady_state_warmup(image_cfg.data, int(image_cfg.data.batch_size))
        cfgs = {"online (images, both encoders every step)": image_cfg,
                "cached latents + text, as configured": cached_cfg,
                "cached latents + text, streamed (`data.in_memory=false`)": streamed_cfg}
        seconds = {name: [] for name in cfgs}
        workers: dict[str, str] = {}
        for r in range(args.rounds):
            for name in (list(cfgs) if r % 2 == 0 else list(reversed(cfgs))):
                cfg = cfgs[name]
                datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
                wall, _ = fit_seconds_per_step(cfg, model, datamodule, args.steps, args.warmup)
                seconds[name].append(wall)
                workers[name] = loader_in_use(datamodule)
                print(f"round {r + 1} {name}: {wall * 1e3:.0f} ms per step", flush=True)
        batch = int(image_cfg.data.batch_size)

    online, cached, _ = (statistics.median(v) for v in seconds.values())
    lines = [f"`Trainer.fit` of `experiment={args.experiment}` (callbacks, CSV logger, data workers "
             f"{image_cfg.data.num_workers}: {' / '.join(workers.values())}), batch {batch}, "
             f"{args.shards} image shards and their cache; median of "
             f"{args.rounds} alternating rounds of {args.steps} steps after {args.warmup} warm-up"
             f"{'; overrides: ' + ' '.join(args.overrides) if args.overrides else ''}. "
             f"{host_malloc_label(image_cfg)}; torch threads: {torch.get_num_threads()}; load average at the end: "
             f"{load_average()}.", "",
             "| input | s per step (rounds) | samples/s | vs online |", "|---|---|---:|---:|"]
    for name, values in seconds.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.3f} ({', '.join(f'{v:.3f}' for v in values)}) | {batch / med:.1f} "
                     f"| {online / med:.2f}x |")
    print("\n".join(lines))
    if args.append:
        append_markdown(args.append, "Training from cached latents vs online encoding, whole loop", "\n".join(lines))
    print(f"cached (as configured) / online samples/s: {online / cached:.2f}x")


if __name__ == "__main__":
    main()
