"""Samplers compared on one latent-diffusion checkpoint: prompt accuracy against network evaluations and time.

Every run of ``--runs`` (``sampler:steps``) generates ``--n-per-prompt`` images for each prompt of a prompt
set with the same seeds (image i uses seed ``--seed + i`` in every run) and the same guidance, and scores
them with the prompt-accuracy reader of ``ldm.evaluation.generation.evaluate_prompts`` (shapes: colour and
shape must both match). One untimed warm-up batch runs first, then the runs in one process, so the wall
times are comparable. NFE counts U-Net evaluations per image (CFG doubles the batch, not the count).

    python benchmarks/samplers.py --ckpt logs/quickstart_ldm/runs/<date>/checkpoints/last.ckpt
    python benchmarks/samplers.py --ckpt last.ckpt --runs ddim:50 dpmpp_2m:10 --cfg-scale 3 --n-per-prompt 4
    python benchmarks/samplers.py --ckpt last.ckpt --device cuda --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import append_markdown  # noqa: E402  (benchmarks/_report.py)
from ldm.diffusion.samplers import nfe  # noqa: E402
from ldm.evaluation.generation import evaluate_prompts, prompt_set  # noqa: E402
from ldm.models.diffusion import load_latent_diffusion  # noqa: E402
from ldm.pipeline import SamplingConfig, text_to_image  # noqa: E402
from ldm.utils.sampling_io import resolve_device  # noqa: E402

DEFAULT_RUNS = ["ddim:50", "dpmpp_2m:10", "dpmpp_2m:20", "euler_a:20", "heun:10"]


def parse_run(spec: str) -> tuple[str, int]:
    """``"dpmpp_2m:20"`` -> ``("dpmpp_2m", 20)``; unknown samplers and bad step counts are refused."""
    name, sep, steps = spec.partition(":")
    if not sep or not steps.isdigit():
        raise argparse.ArgumentTypeError(f"{spec!r} is not SAMPLER:STEPS (e.g. dpmpp_2m:20).")
    try:
        nfe(name, int(steps))  # validates the name and the step count
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name, int(steps)


def run_all(model, prompts: list[str], runs: list[tuple[str, int]], n_per_prompt: int,
            base: SamplingConfig) -> list[dict]:
    """``evaluate_prompts`` for every (sampler, steps) with otherwise identical settings; one metrics dict each."""
    warmup = replace(base, sampler=runs[0][0], steps=2, progress=False)
    text_to_image(model, prompts[:base.batch_size], warmup)  # lazy initialisation, kernel selection
    results = []
    for sampler, steps in runs:
        metrics, _, _ = evaluate_prompts(model, prompts, n_per_prompt, replace(base, sampler=sampler, steps=steps))
        results.append(metrics)
        print(f"{sampler:>10} {steps:>3} steps: accuracy {_accuracy(metrics):.3f}, {metrics['seconds']:.1f} s",
              file=sys.stderr)
    return results


def _accuracy(metrics: dict) -> float:
    """Prompt accuracy of the shapes reader, class accuracy of the digits reader."""
    return metrics["prompt_accuracy"] if "prompt_accuracy" in metrics else metrics["class_accuracy"]


def table(results: list[dict]) -> str:
    def fmt(value):
        return "–" if value is None else f"{value:.3f}"

    lines = ["| sampler | steps | NFE | prompt accuracy | color accuracy | shape accuracy | wall (s) | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for m in results:
        lines.append(
            f"| {m['sampler']} | {m['steps']} | {m['nfe']} | {_accuracy(m):.3f} | {fmt(m.get('color_accuracy'))} "
            f"| {fmt(m.get('shape_accuracy'))} | {m['seconds']:.1f} | {m['images_per_second']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    defaults = SamplingConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, type=Path, help="LatentDiffusion checkpoint (a *_ldm run's .ckpt)")
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in DEFAULT_RUNS],
                        metavar="SAMPLER:STEPS", help=f"runs in order (default: {' '.join(DEFAULT_RUNS)})")
    parser.add_argument("--prompt-set", default="shapes", choices=["shapes", "digits", "file"])
    parser.add_argument("--prompt-file", default=None, help="one prompt per line (with --prompt-set file)")
    parser.add_argument("--n-per-prompt", type=int, default=12, help="images per prompt and run")
    parser.add_argument("--cfg-scale", type=float, default=defaults.cfg_scale, help="classifier-free guidance scale")
    parser.add_argument("--spacing", default=defaults.spacing, help="sigma spacing: karras|leading|trailing|linspace")
    parser.add_argument("--eta", type=float, default=defaults.eta, help="ancestral noise of ddim and euler_a")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i in every run")
    parser.add_argument("--batch-size", type=int, default=64, help="images per sampling batch")
    parser.add_argument("--no-ema", action="store_true", help="sample with the raw U-Net, not its EMA")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--append", type=Path, default=None, metavar="PATH",
                        help="append the table, command, machine and date to this Markdown file")
    args = parser.parse_args()
    if args.n_per_prompt < 1 or args.batch_size < 1:
        parser.error("--n-per-prompt and --batch-size must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    model = load_latent_diffusion(str(args.ckpt)).to(device)
    prompts = prompt_set(args.prompt_set, args.prompt_file)
    base = SamplingConfig(cfg_scale=args.cfg_scale, spacing=args.spacing, eta=args.eta, seed=args.seed,
                          batch_size=args.batch_size, use_ema=not args.no_ema)
    results = run_all(model, prompts, args.runs, args.n_per_prompt, base)

    unet = "EMA" if model.ema_unet is not None and not args.no_ema else "raw"
    settings = (f"{args.ckpt.name}, {len(prompts)} {args.prompt_set} prompts x {args.n_per_prompt} images, "
                f"cfg scale {args.cfg_scale}, {args.spacing} spacing, eta {args.eta} (ddim, euler_a), "
                f"seed {args.seed}, batch {args.batch_size}, {unet} U-Net, {device}")
    body = f"{settings}\n\n{table(results)}"
    print(f"\n{body}")
    if args.append is not None:
        append_markdown(args.append, "samplers", body)


if __name__ == "__main__":
    main()
