"""Image-set metrics on torchmetrics: FID, KID, CLIP score, and autoencoder reconstruction quality.

All images are float ``[N, 3, H, W]`` in ``[0, 1]``. Features are extracted once per image (by a module
from :mod:`ldm.evaluation.features`) and handed to torchmetrics' FID and KID through an identity
``feature`` module, so the two metrics share one forward pass of the feature network.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance  # module paths: importable without torch-fidelity
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from ldm.models.clip import CLIPModule
from ldm.models.first_stage import FirstStage


class _PrecomputedFeatures(nn.Module):
    """Identity ``feature`` module: the metric's input already is the feature matrix [N, D]."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def metric_keys(tag: str | None, prefix: str = "") -> dict[str, str]:
    """Report keys of :func:`fid_kid` results naming the feature network, e.g. ``fid -> fid_clip``
    (``prefix="r"``: ``rfid_clip``, the reconstruction FID)."""
    suffix = f"_{tag}" if tag else ""
    return {"fid": f"{prefix}fid{suffix}", "kid_mean": f"{prefix}kid{suffix}_mean",
            "kid_std": f"{prefix}kid{suffix}_std"}


@torch.no_grad()
def extract_features(
    feature: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu", desc: str = "features"
) -> torch.Tensor:
    """Features ``[N, D]`` (float64, CPU) of every image batch ``[B, 3, H, W]`` in [0, 1]."""
    feature = feature.to(device).eval()
    chunks = [feature(images.to(device)).double().cpu() for images in tqdm(batches, desc=desc, leave=False)]
    if not chunks:
        raise ValueError(f"No images to extract {desc} from.")
    return torch.cat(chunks)


def fid_kid(
    real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0
) -> dict[str, float]:
    """FID (Heusel et al. 2017: ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2)) and KID (Binkowski et
    al. 2018: unbiased MMD^2 with the kernel (x.y / D + 1)^3, mean and std over random subsets).

    real / fake: features [N, D] / [M, D]. The KID subset size is capped at min(N, M).
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"Need feature matrices [N, D] and [M, D]; got {tuple(real.shape)} and {tuple(fake.shape)}.")
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID/KID need at least 2 real and 2 generated images; got {len(real)} and {len(fake)}.")
    dim = real.shape[1]
    fid = FrechetInceptionDistance(feature=_PrecomputedFeatures(dim))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with warnings.catch_warnings():  # "KID stores all features": known, and they are small here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_PrecomputedFeatures(dim), subsets=kid_subsets,
                                      subset_size=min(kid_subset_size, len(real), len(fake)))
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


@torch.no_grad()
def clip_score(
    clip: CLIPModule, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64
) -> float:
    """CLIP score (Hessel et al. 2021, torchmetrics' definition): max(100 * mean cos(E_image, E_text), 0)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
    if len(images) == 0:
        raise ValueError("CLIP score needs at least one image.")
    clip = clip.eval()
    total = 0.0
    for start in tqdm(range(0, len(images), batch_size), desc="clip score", leave=False):
        x = images[start:start + batch_size].to(clip.device) * 2.0 - 1.0  # [B, 3, H, W] in [-1, 1]
        img = clip.image_features(x)  # [B, E], unit norm
        txt = clip.text_features(list(prompts[start:start + batch_size]))  # [B, E], unit norm
        total += float((100.0 * (img * txt).sum(dim=-1)).sum())
    return max(total / len(images), 0.0)


@torch.no_grad()
def reconstruction_metrics(
    autoencoder: FirstStage,
    batches: Iterable[torch.Tensor],
    feature: nn.Module | None = None,
    device: torch.device | str = "cpu",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict[str, float]:
    """PSNR / SSIM (data range 1) of deterministic reconstructions decode(mode(encode(x))), plus ``fid`` /
    ``kid_mean`` / ``kid_std`` of the reconstructions against their inputs (rFID) when a feature network is given."""
    autoencoder = autoencoder.to(device).eval()
    psnr = PeakSignalNoiseRatio(data_range=1.0).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    real_feats, rec_feats, count = [], [], 0
    if feature is not None:
        feature = feature.to(device).eval()
    for images in tqdm(batches, desc="reconstruct", leave=False):
        x = images.to(device)  # [B, 3, H, W] in [0, 1]
        z = autoencoder.encode(x * 2.0 - 1.0).mode()  # [B, C, h, w]
        rec = ((autoencoder.decode(z).float() + 1.0) / 2.0).clamp(0.0, 1.0)  # [B, 3, H, W]
        psnr.update(rec, x)
        ssim.update(rec, x)
        count += len(x)
        if feature is not None:
            real_feats.append(feature(x).double().cpu())
            rec_feats.append(feature(rec).double().cpu())
    if count == 0:
        raise ValueError("No images to reconstruct.")
    metrics = {"psnr": float(psnr.compute()), "ssim": float(ssim.compute()), "num_images": count}
    if feature is not None:
        metrics.update(fid_kid(torch.cat(real_feats), torch.cat(rec_feats), kid_subsets, kid_subset_size))
    return metrics
