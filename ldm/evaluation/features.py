"""Image feature networks for FID / KID, passed to torchmetrics as a custom ``feature`` module.

Every extractor maps images ``[B, 3, H, W]`` float in ``[0, 1]`` (any size; resized inside) to features
``[B, D]`` and carries ``num_features`` (torchmetrics reads it instead of probing with a 299 px image) and
``name`` (recorded in the metrics JSON and in the metric keys, e.g. ``fid_clip``).

- ``CLIPImageFeatures``: the image tower of the project's stage-0 CLIP (``CLIPModule`` checkpoint);
  the projected, unnormalised image embedding. Works offline; numbers compare only between runs that
  used the same CLIP checkpoint.
- ``InceptionFeatures``: the standard FID network (TF-ported InceptionV3, pool3 2048-d, through
  torchmetrics / torch-fidelity) built from a local weights file; comparable with published FIDs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.checkpoints import load_checkpoint, load_state_dict
from ldm.models.clip import CLIPModule

# torch-fidelity's converted TF Inception weights (the file torchmetrics would download)
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def load_clip_module(path: str | Path, map_location: str = "cpu") -> CLIPModule:
    """A trained stage-0 ``CLIPModule`` from its Lightning checkpoint (safe load, eval mode, frozen)."""
    ckpt = load_checkpoint(path, map_location)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    if "arch" not in hparams or not any(k.startswith("model.visual.") for k in state):
        raise ValueError(
            f"{path} is not a stage-0 CLIP checkpoint (needs an `arch` hyper-parameter and `model.visual.*` "
            f"weights). Pass the checkpoints/last.ckpt of a `python train.py experiment=quickstart_clip` run "
            f"as clip_ckpt=..."
        )
    module = CLIPModule(arch=hparams["arch"], quick_gelu=bool(hparams.get("quick_gelu", False)))
    module.load_state_dict(state)
    module.requires_grad_(False)
    return module.eval()


class CLIPImageFeatures(nn.Module):
    """The image embedding ``[B, E]`` of a CLIP image tower (Kynkäänniemi et al. 2023 use CLIP features
    for FID because Inception features track ImageNet classes rather than image quality)."""

    def __init__(self, clip: CLIPModule, name: str = "clip"):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.num_features = int(clip.model.visual.output_dim)
        self.name = name

    def train(self, mode: bool = True) -> CLIPImageFeatures:
        return super().train(False)  # a fixed feature network

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.clip.preprocess(images.float() * 2.0 - 1.0)  # [B, 3, S, S] normalised for CLIP
        return self.clip.model.encode_image(x, normalize=False).float()  # [B, E]


class InceptionFeatures(nn.Module):
    """Pool3 features ``[B, 2048]`` of the FID InceptionV3 (Heusel et al. 2017), from a local weights file."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"inception_weights={weights_path} does not exist. Download torch-fidelity's "
                f"{INCEPTION_WEIGHTS_FILE} (the FID InceptionV3) on a connected machine and pass its local path, "
                f"or leave inception_weights=null to use the CLIP image features (clip_ckpt=...)."
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
            raise ModuleNotFoundError(f"Inception features need torchmetrics' image extras: {err}") from err
        load_state_dict(path)  # refuses pickled code before torch-fidelity's own torch.load reads the file
        try:
            self.inception = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
            )
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                "inception_weights needs the `torch-fidelity` package (torchmetrics' Inception implementation): "
                "`pip install torch-fidelity`, or leave inception_weights=null to use CLIP features."
            ) from err
        self.num_features = 2048
        self.name = "inception"

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # [B, 3, H, W], what the TF port expects
        return self.inception(uint8).float()  # [B, 2048]


def build_feature_extractor(
    inception_weights: str | None = None, clip: CLIPModule | None = None, clip_ckpt: str | None = None
) -> tuple[nn.Module | None, str | None]:
    """(feature module, description) for FID/KID: Inception when weights are given, else the CLIP image tower.

    ``clip`` is an already loaded stage-0 model (shared with the CLIP score); otherwise ``clip_ckpt`` is read.
    The description is ``"inception-2048"`` or ``"clip:<path>"``; ``(None, None)`` when neither is configured.
    """
    if inception_weights:
        return InceptionFeatures(inception_weights), "inception-2048"
    if clip is None and clip_ckpt:
        clip = load_clip_module(clip_ckpt)
    if clip is not None:
        return CLIPImageFeatures(clip), f"clip:{clip_ckpt}" if clip_ckpt else "clip"
    return None, None
