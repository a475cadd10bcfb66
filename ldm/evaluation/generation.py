"""Generate images for a prompt set and score them (used by scripts/evaluate.py and the quickstart)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm.data.digits import DIGIT_WORDS
from ldm.data.synthetic import canonical_prompts, detailed_prompts
from ldm.diffusion.samplers import nfe
from ldm.evaluation.prompt_accuracy import digits_accuracy, expected_digit, expected_shape_attributes, shapes_accuracy
from ldm.pipeline import SamplingConfig, text_to_image


def prompt_set(name: str, prompt_file: str | None = None) -> list[str]:
    """The prompts of a named evaluation set."""
    if name == "shapes":
        return canonical_prompts()
    if name == "shapes_detailed":
        return detailed_prompts()
    if name == "digits":
        return [f"a handwritten digit {w}" for w in DIGIT_WORDS]
    if name == "file":
        if not prompt_file:
            raise ValueError("prompt_set=file needs prompt_file=PATH (one prompt per line).")
        lines = Path(prompt_file).read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"{prompt_file} contains no prompts.")
        return prompts
    raise ValueError(f"Unknown prompt_set={name!r}; choose shapes, shapes_detailed, digits or file.")


def score(images: torch.Tensor, prompts: Sequence[str], shape_aliases: Mapping[str, str] | None = None) -> dict:
    """Pick the reader that understands the prompts: shapes (color + shape) or digits (class)."""
    if all(expected_shape_attributes(p, shape_aliases) for p in prompts):
        return shapes_accuracy(images, prompts, shape_aliases)
    if all(expected_digit(p) is not None for p in prompts):
        return digits_accuracy(images, prompts)
    raise ValueError("The prompts name neither a palette color + shape nor a digit: no reader can score them.")


def generate(model, prompts: Sequence[str], config: SamplingConfig) -> torch.Tensor:
    """``text_to_image`` batch by batch under a progress bar; identical images (image i uses seed ``seed + i``)."""
    chunks = []
    bar = tqdm(total=len(prompts), desc=f"generate ({config.sampler}, {config.steps} steps)", unit="img")
    for start in range(0, len(prompts), config.batch_size):
        chunk = list(prompts[start:start + config.batch_size])
        chunks.append(text_to_image(model, chunk, replace(config, seed=config.seed + start, progress=False)))
        bar.update(len(chunk))
    bar.close()
    return torch.cat(chunks)  # [N, 3, H, W] in [0, 1]


def evaluate_prompts(model, prompts: Sequence[str], n_per_prompt: int, config: SamplingConfig,
                     shape_aliases: Mapping[str, str] | None = None) -> tuple[dict, torch.Tensor, list[str]]:
    """Generate ``n_per_prompt`` images per prompt and score them (``shape_aliases``: extra shape words, e.g.
    {"wedge": "triangle"}). Returns (metrics, images, prompts)."""
    expanded = [p for p in prompts for _ in range(n_per_prompt)]
    start = time.perf_counter()
    images = generate(model, expanded, config)  # [N, 3, H, W] in [0, 1]
    seconds = time.perf_counter() - start
    metrics = score(images, expanded, shape_aliases)
    metrics.update({
        "sampler": config.sampler, "steps": config.steps, "nfe": nfe(config.sampler, config.steps),
        "cfg_scale": config.cfg_scale, "spacing": config.spacing, "seconds": round(seconds, 2),
        "images_per_second": round(len(expanded) / seconds, 2),
    })
    return metrics, images, expanded


def markdown_table(metrics: dict) -> str:
    """A two-column Markdown table of the scalar metrics (``None``: not computed), then ``notes`` as a list."""
    rows = ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, (dict, list)):
            continue
        if value is None:
            value = "not computed"
        rows.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if metrics.get("notes"):
        rows += [""] + [f"- {note}" for note in metrics["notes"]]
    return "\n".join(rows)


def write_report(metrics: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "metrics.json", out_dir / "metrics.md"
    json_path.write_text(json.dumps(metrics, indent=2))
    md_path.write_text(markdown_table(metrics) + "\n")
    return json_path, md_path
