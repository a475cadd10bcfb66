"""What ``num_workers: auto`` means: DataLoader worker processes that do not take cores from the training step.

On a GPU the step runs on the card and the host's cores are free for decoding: one worker per core a training
process can spare (keeping one for the process itself), at most ``MAX_AUTO_WORKERS``.

On a CPU the step's intra-op threads (``torch.get_num_threads()``, all cores by default) already use the cores.
A loader worker on one of them does not overlap with the step: it preempts one compute thread, and every
parallel region then waits for that thread, so the step stalls for the worker's whole time slice and the
process switches and batch transfers come on top. Loading in the training process (0 workers) costs only its
own CPU time. Measured on a 2-core CPU (BENCHMARKS.md, "Loader workers on the CPU"): the quickstart's
``Trainer.fit`` on image shards kept 89.8 % of the bare step's samples/s with 1 worker and 94.4 % with 0. So on
a CPU ``auto`` starts workers only on cores torch leaves idle, e.g. ``OMP_NUM_THREADS=1`` on a 2-core machine
gives 1 worker (``scripts/pipeline.sh`` trains stages 0 and 1 side by side that way).

An integer ``data.num_workers`` is used as given.
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.utils.cpu_threads import usable_cores

AUTO = "auto"
MAX_AUTO_WORKERS = 8


def auto_num_workers(on_cpu: bool, processes: int = 1) -> int:
    """Loader workers per training process, for ``processes`` training processes on this machine."""
    processes = max(1, processes)
    if on_cpu:
        idle = usable_cores() - torch.get_num_threads() * processes
        return max(0, min(MAX_AUTO_WORKERS, idle // processes))
    return max(1, min(MAX_AUTO_WORKERS, usable_cores() // processes - 1))


def trainer_runs_on_cpu(trainer: Any) -> bool:
    """True when ``trainer`` (a Lightning Trainer, or None outside one) trains on the CPU."""
    if trainer is None:
        return not torch.cuda.is_available()
    from lightning.pytorch.accelerators import CPUAccelerator

    return isinstance(trainer.accelerator, CPUAccelerator)


def check_num_workers(num_workers: Any) -> int | str:
    """``num_workers`` as configured: a count >= 0 or ``"auto"``; anything else raises with the fix."""
    if num_workers == AUTO:
        return AUTO
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0 or 'auto', got {num_workers!r}")
    return num_workers
