"""Installable package `ldm`: latent diffusion training with Hydra + Lightning."""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="ldm",
    version="0.1.0",
    description="Train Stable-Diffusion-style latent diffusion models from scratch: Hydra configs, "
    "Lightning, WebDataset shards, open_clip text conditioning; runs on one CPU or many GPUs.",
    long_description=README.read_text() if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ldm", "ldm.*"]),
    include_package_data=True,
    install_requires=[
        # torch/torchvision are installed first, together (see Makefile); any torch >= 2.1 works.
        "torch>=2.1",
        "torchvision>=0.16",
        "lightning>=2.2",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "webdataset>=0.2.86",
        "open_clip_torch>=2.24",
        "wandb>=0.16",
        "tensorboard>=2.14",
        "torchmetrics>=1.3",
        "torch-fidelity>=0.3",  # torchmetrics' InceptionV3 FID features (weights from a local file)
        "einops>=0.7",
        "safetensors>=0.4",
        "rich>=13",
        "tqdm>=4.66",
        "pillow>=10",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "scikit-image>=0.22",
        "matplotlib>=3.7",
        "hydra-optuna-sweeper>=1.2",
        "hydra-submitit-launcher>=1.2",
    ],
    extras_require={
        "dev": ["pytest>=7", "diffusers>=0.27", "transformers>=4.40", "peft>=0.10"],
        "lora": ["peft>=0.10"],
    },
)
