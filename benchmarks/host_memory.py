"""Page faults and time of the bare training step with glibc's malloc at its defaults and with freed host memory
kept for reuse (``extras.host_malloc``, :mod:`ldm.utils.host_memory`), each in several fresh processes.

Whether glibc ends up handing the step's activations back to the OS (and page-faulting them in again next step)
is decided per process, by the order and sizes of its earlier allocations, so one process per setting says
little: the script starts ``--processes`` child processes per setting, alternating, and each counts its minor page
faults (``getrusage``) over the timed steps of

- ``--driver bare`` (default): the bare step of ``loop_overhead.py`` (``diffusion_step``, backward, optimizer, EMA;
  the experiment's data, batches in memory), or
- ``--driver fit``: ``Trainer.fit`` as ``train.py`` composes it (callbacks, logger, the experiment's data module
  and loader workers; warm-up past the shuffle buffer's fill by default). Faults are the training process's own:
  loader worker processes are not counted.

    python benchmarks/host_memory.py --processes 6 --threads 2
    python benchmarks/host_memory.py --driver fit --processes 4 --threads 2
    python benchmarks/host_memory.py --processes 4 --overrides data=shapes32_latents data.train_shards=...  # a cache
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import append_markdown, load_average  # noqa: E402  (benchmarks/_report.py)

SETTINGS = {"glibc defaults": ["extras.host_malloc=null"], "host memory kept": []}
DRIVERS = {"bare": "bare step", "fit": "`Trainer.fit`"}


def child(args: argparse.Namespace) -> None:
    """One process: compose, apply the extras as train.py does, time the driver; prints one JSON line."""
    import hydra
    from loop_overhead import (bare_seconds_per_step, build_model, clocks, compose_config, fit_seconds_per_step,
                               preload_batches, steady_state_warmup, throughput_overrides)
    from ldm.utils.run import apply_extras

    def clocks_and_faults(device: torch.device) -> tuple[float, float, int]:
        return (*clocks(device), resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([*throughput_overrides(args.experiment), *args.overrides], Path(tmp))
        apply_extras(cfg)
        model = build_model(cfg, args.autoencoder_experiment)
        if args.driver == "fit":
            datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
            warmup = args.warmup if args.warmup is not None else steady_state_warmup(cfg.data, cfg.data.batch_size)
            wall, _, faults = fit_seconds_per_step(cfg, model, datamodule, args.steps, warmup, clocks_and_faults)
        else:
            batches = preload_batches(cfg, 4)
            warmup = args.warmup if args.warmup is not None else 5
            bare_seconds_per_step(model, batches, warmup, 0, cfg.trainer)  # warm-up (allocator, kernels)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall, _ = bare_seconds_per_step(model, batches, args.steps, 0, cfg.trainer)
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    print(json.dumps({"ms": wall * 1e3, "faults": faults, "warmup": warmup}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="quickstart_ldm")
    parser.add_argument("--autoencoder-experiment", default="quickstart_autoencoder")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra train.py overrides (key=value)")
    parser.add_argument("--driver", choices=("bare", "fit"), default="bare",
                        help="the bare step on batches in memory, or Trainer.fit on the experiment's data module")
    parser.add_argument("--processes", type=int, default=4, help="fresh processes per setting (alternating)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: 5 bare; fit: 3 + the shuffle buffer's fill)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in each process")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this Markdown file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's own defaults
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for i in range(args.processes):
        for name, extra in SETTINGS.items():
            command = [sys.executable, __file__, "--child", "--driver", args.driver, "--experiment", args.experiment,
                       "--autoencoder-experiment", args.autoencoder_experiment, "--steps", str(args.steps),
                       "--overrides", *args.overrides, *extra]
            for flag, value in (("--warmup", args.warmup), ("--threads", args.threads)):
                if value is not None:
                    command += [flag, str(value)]
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{name} process {i + 1} failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"process {i + 1}, {name}: {runs[name][-1]['ms']:.1f} ms/step, "
                  f"{runs[name][-1]['faults']:.0f} page faults/step", file=sys.stderr, flush=True)

    driver = DRIVERS[args.driver]
    warmup = runs["host memory kept"][0]["warmup"]
    lines = [f"{driver} of `experiment={args.experiment}`"
             f"{' ' + ' '.join(args.overrides) if args.overrides else ''}, {args.processes} fresh processes per "
             f"setting (alternating), {args.steps} timed steps after {warmup} warm-up each, "
             f"{torch.get_num_threads()} threads; load average at the end {load_average()}", "",
             "| malloc | ms per step (each process) | median | page faults per step (each process) |",
             "|---|---|---:|---|"]
    for name, results in runs.items():
        ms = ", ".join(f"{r['ms']:.0f}" for r in results)
        faults = ", ".join(f"{r['faults']:.0f}" for r in results)
        lines.append(f"| {name} | {ms} | {statistics.median(r['ms'] for r in results):.1f} | {faults} |")
    body = "\n".join(lines)
    print(body)
    if args.append:
        append_markdown(args.append, f"Host memory kept for reuse: {driver} in fresh processes", body)


if __name__ == "__main__":
    main()
