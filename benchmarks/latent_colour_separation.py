"""How far apart an autoencoder puts the shape colours in its latent space, as stage 2 sees it.

Reads cached latent shards of the shapes set (``scripts/encode_latents.py`` output: ``<key>.latents.safetensors``
with the posterior ``mean`` [C, h, w], and ``<key>.json`` with the shape's ``color`` and pixel ``bbox``). Each latent
is standardised per channel over the whole shard set (as ``LatentDiffusion`` normalises latents), and the C-vector
of the latent cell under the centre of the shape's bounding box stands for the shape's colour. Printed: the
per-channel spread and, per colour pair, the Euclidean distance between the two colours' mean vectors, closest
pairs first. Stage 2 must tell the closest pair apart from text alone; a small distance predicts colour mix-ups.

    python benchmarks/latent_colour_separation.py outputs/quickstart/latents/val-000000.tar
    python benchmarks/latent_colour_separation.py run_a/latents/val-000000.tar run_b/latents/val-000000.tar --pairs 5

With ``--probe``, also the 4-fold cross-validated accuracy of a logistic regression (scikit-learn) that reads the colour
from the standardised centre cell and from the whole latent: how linearly the layout carries colour.

Evidence so far (BENCHMARKS.md, "`make quickstart` with 1,800 stage-2 steps" and "Stage-1 KL weight, decoder
noise and whitened latents"): over the first five quickstart autoencoders the closest pair's distance ordered their
stage-2 prompt accuracies (the fifth predicted before its stage 2 ran); over six more it did not. A diagnostic, not a predictor.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import webdataset as wds
from safetensors.torch import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data.latents import LATENTS_KEY  # noqa: E402


def read_centre_cells(shard: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(all latent means [N, C, h, w], the cell under each bbox centre [N, C], colour names [N]) of one shard."""
    latents, cells, colours = [], [], []
    for raw in wds.DataPipeline(wds.SimpleShardList(str(shard)), wds.tarfile_to_samples()):
        if LATENTS_KEY not in raw or "json" not in raw:
            raise ValueError(f"{shard}: sample {raw['__key__']} has no {LATENTS_KEY}/json; pass latent shards "
                             "written by scripts/encode_latents.py")
        meta = json.loads(raw["json"])
        mean = load(raw[LATENTS_KEY])["mean"].float()  # [C, h, w]
        factor = meta["image_size"] // mean.shape[-1]
        x0, y0, x1, y1 = meta["bbox"]
        row = min(int((y0 + y1) / 2 / factor), mean.shape[-2] - 1)
        col = min(int((x0 + x1) / 2 / factor), mean.shape[-1] - 1)
        latents.append(mean)
        cells.append(mean[:, row, col])
        colours.append(meta["color"])
    return torch.stack(latents), torch.stack(cells), colours


def standardised(shards: list[Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(per-channel std [C], latents [N, C, h, w] and centre cells [N, C] in units of each channel's spread, colours)."""
    parts = [read_centre_cells(s) for s in shards]
    latents = torch.cat([p[0] for p in parts])
    cells = torch.cat([p[1] for p in parts])
    colours = [c for p in parts for c in p[2]]
    mean, std = latents.mean((0, 2, 3)), latents.std((0, 2, 3))
    latents = (latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return std, latents, (cells - mean) / std, colours


def centre_distances(cells: torch.Tensor, colours: list[str]) -> dict[tuple[str, str], float]:
    """{(colour a, colour b): distance of their mean standardised centre cells}, cells [N, C]."""
    names = sorted(set(colours))
    centres = {n: cells[[i for i, c in enumerate(colours) if c == n]].mean(0) for n in names}
    return {(a, b): float((centres[a] - centres[b]).norm()) for a, b in itertools.combinations(names, 2)}


def colour_distances(shards: list[Path]) -> tuple[torch.Tensor, dict[tuple[str, str], float]]:
    """(per-channel std of the latents [C], {(colour a, colour b): distance of their standardised mean cells})."""
    std, _, cells, colours = standardised(shards)
    return std, centre_distances(cells, colours)


def linear_probe(features: torch.Tensor, colours: list[str]) -> float:
    """4-fold cross-validated accuracy of a logistic regression from features [N, D] to the colour names."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    return float(cross_val_score(LogisticRegression(max_iter=2000), features.numpy(), colours, cv=4).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", type=Path,
                        help="latent shards; one autoencoder per argument (a shard, or a glob-expanded list "
                             "joined with commas)")
    parser.add_argument("--pairs", type=int, default=3, help="closest colour pairs to print")
    parser.add_argument("--probe", action="store_true", help="add the linear colour probe (needs scikit-learn)")
    args = parser.parse_args()
    probe_head = " linear colour probe (centre cell / whole latent) |" if args.probe else ""
    print(f"| latents | channel std | closest colour pairs (distance) |{probe_head}")
    print("|---|---|---|" + ("---|" if args.probe else ""))
    for spec in args.shards:
        shards = [Path(s) for s in str(spec).split(",")]
        std, latents, cells, colours = standardised(shards)  # the shards are read once
        closest = sorted(centre_distances(cells, colours).items(), key=lambda kv: kv[1])[: args.pairs]
        probe = ""
        if args.probe:
            probe = f" {linear_probe(cells, colours):.2f} / {linear_probe(latents.flatten(1), colours):.2f} |"
        print(f"| {spec} | {', '.join(f'{v:.2f}' for v in std)} | "
              f"{', '.join(f'{a}-{b} {d:.2f}' for (a, b), d in closest)} |{probe}")


if __name__ == "__main__":
    main()
