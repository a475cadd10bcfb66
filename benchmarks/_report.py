"""Shared by the benchmark scripts: append a result table to BENCHMARKS.md with command, machine and date."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch


def append_markdown(path: Path, title: str, body: str) -> None:
    """Append ``body`` under a heading with the command line, machine and date."""
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"torch {torch.__version__}, torch threads: {torch.get_num_threads()}")
    command = "python " + shlex.join(sys.argv)
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n## {title} ({stamp})\n\n`{command}`\n\nMachine: {machine}\n\n{body}\n")
    print(f"Appended to {path}", file=sys.stderr)
