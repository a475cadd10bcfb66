"""Let a running CPU job take over cores that another job has freed, on a signal.

``scripts/pipeline.sh`` trains stage 0 (CLIP) and stage 1 (autoencoder) side by side, one torch thread each
(``OMP_NUM_THREADS=1``). Stage 0 finishes long before stage 1; the script then sends ``SIGUSR2`` to stage 1,
which from its next operation on runs on every core the process may use. By hand::

    OMP_NUM_THREADS=1 python train.py experiment=quickstart_autoencoder &
    kill -USR2 %1          # later: use all cores from now on

``SIGUSR2`` rather than ``SIGUSR1``: Lightning uses ``SIGUSR1`` for SLURM requeueing. The handler only raises
the thread count (``torch.set_num_threads``), never lowers it, so a stray signal is harmless.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

WIDEN_SIGNAL = getattr(signal, "SIGUSR2", None)  # None on Windows: nothing is installed there


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def widen_threads(cores: int | None = None) -> tuple[int, int]:
    """Raise torch's intra-op thread count to ``cores`` (default: all usable); returns (before, after)."""
    import torch

    before = torch.get_num_threads()
    target = cores or usable_cores()
    if target > before:
        torch.set_num_threads(target)
    return before, torch.get_num_threads()


def _on_widen_signal(signum, frame) -> None:
    before, after = widen_threads()
    log.info(f"Signal {signal.Signals(signum).name}: torch threads {before} -> {after}.")


def widen_on_signal() -> bool:
    """Install the ``SIGUSR2`` handler that widens the thread count; False where it cannot be installed
    (no ``SIGUSR2`` on this OS, or not called from the main thread, as in some Hydra launchers)."""
    if WIDEN_SIGNAL is None or threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(WIDEN_SIGNAL, _on_widen_signal)
    return True
