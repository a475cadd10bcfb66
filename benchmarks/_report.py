"""Shared by the benchmark scripts: the speed-comparison flags, and appending a result table to BENCHMARKS.md with
command, machine and date."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from ldm.utils.host_memory import keep_freed_memory  # its defaults are configs/extras' host_malloc


def append_markdown(path: Path, title: str, body: str) -> None:
    """Append ``body`` under a heading with the command line, machine and date."""
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"torch {torch.__version__}, torch threads: {torch.get_num_threads()}")
    command = "python " + shlex.join(sys.argv)
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n## {title} ({stamp})\n\n`{command}`\n\nMachine: {machine}\n\n{body}\n")
    print(f"Appended to {path}", file=sys.stderr)


def add_speed_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every ours-vs-diffusers speed comparison shares (applied to both networks alike)."""
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (1 gives stable numbers on a machine shared with other jobs)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock, or this process's CPU time (robust to other jobs on a shared CPU)")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this Markdown file")
    add_malloc_flag(parser)


def add_malloc_flag(parser: argparse.ArgumentParser) -> None:
    """``--malloc-defaults``: opt out of keeping freed host memory, which :func:`keep_host_memory` applies."""
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="leave glibc's malloc at its defaults (by default freed host memory is kept for reuse, "
                             "as train.py does: configs/extras/default.yaml host_malloc)")


def keep_host_memory(args: argparse.Namespace) -> bool:
    """Keep freed host memory for reuse as train.py does, unless ``--malloc-defaults``; True where applied."""
    return not args.malloc_defaults and keep_freed_memory()


def add_alternating_cpu_flags(parser: argparse.ArgumentParser) -> None:
    """``--rounds``, ``--threads``, ``--malloc-defaults`` and ``--append`` of the scripts that time variants in
    alternating rounds on a CPU; :func:`start_alternating_cpu_run` applies them."""
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median over them)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_malloc_flag(parser)
    parser.add_argument("--append", type=Path, default=None, help="append the table to this Markdown file")


def start_alternating_cpu_run(args: argparse.Namespace) -> bool:
    """Set torch's threads (``--threads``) and keep freed host memory (unless ``--malloc-defaults``); True where kept."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return keep_host_memory(args)


def malloc_label(kept: bool) -> str:
    """``"host memory kept"`` or ``"glibc malloc defaults"``, for a table header."""
    return "host memory kept" if kept else "glibc malloc defaults"


def apply_speed_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the clock against the device and set threads / TF32 as the flags ask."""
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work; time a GPU with the wall clock")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.host_memory_kept = keep_host_memory(args)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def device_label(device_type: str) -> str:
    """``"NVIDIA H100 ..."`` on CUDA, ``"cpu (2 threads)"`` otherwise: what the table header names."""
    return torch.cuda.get_device_name() if device_type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def enabled_speed_flags(args: argparse.Namespace) -> str:
    """The ``add_speed_flags`` switches that are on (``"channels_last, compile"``), or ``"none"``."""
    switches = (("channels_last", args.channels_last), ("compile", args.compile), ("bf16", args.bf16),
                ("host memory kept", getattr(args, "host_memory_kept", False)))
    return ", ".join(name for name, on in switches if on) or "none"


def host_malloc_label(cfg) -> str:
    """How a run composed from ``cfg`` set up glibc's malloc (``extras.host_malloc``), for a table header."""
    malloc = (cfg.get("extras") or {}).get("host_malloc")
    if not malloc:
        return "glibc malloc defaults"
    return f"host memory kept (mmap threshold {malloc.mmap_threshold_mb} MiB, trim {malloc.trim_threshold_mb} MiB)"


def load_average() -> str:
    """The 1/5/15-minute load averages (``"0.51 1.02 1.41"``): how shared the machine was."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
