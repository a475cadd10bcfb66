"""Training precision for a CPU run: bf16-mixed where the CPU multiplies bf16 in hardware (AMX), else fp32.

On a CPU with AMX (Intel Sapphire Rapids and later) oneDNN runs bf16 matrix products and convolutions several
times faster than fp32 ones (BENCHMARKS.md, "bf16-mixed on a CPU with AMX"); elsewhere (most laptops: AVX2, or
ARM) bf16 would be emulated and slower, so those CPUs keep fp32. Configs ask for it with the trainer's
accelerator, so the same experiment on a GPU (``trainer=gpu``) keeps that trainer's bf16-mixed::

    trainer:
      precision: ${cpu_precision:${trainer.accelerator}}   # AMX CPU: bf16-mixed; other CPU: 32-true; GPU: bf16-mixed

``trainer.precision=32-true`` on the command line overrides it as usual.
"""

from __future__ import annotations

import sys
from pathlib import Path


def cpu_has_amx_bf16() -> bool:
    """True when this CPU has AMX with bf16 tiles (Linux: the ``amx_bf16`` flag of /proc/cpuinfo; elsewhere
    torch's own probe of AMX tiles)."""
    if sys.platform.startswith("linux"):
        try:
            return " amx_bf16" in Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def cpu_precision(accelerator: str = "cpu") -> str:
    """Lightning ``precision`` for ``accelerator``: on the CPU ``"bf16-mixed"`` with AMX-BF16, else ``"32-true"``;
    on an accelerator (``gpu``, ``cuda``, or ``auto`` with CUDA present) ``"bf16-mixed"``, as ``configs/trainer/gpu.yaml``."""
    if accelerator != "cpu":
        import torch

        if accelerator != "auto" or torch.cuda.is_available():
            return "bf16-mixed"
    return "bf16-mixed" if cpu_has_amx_bf16() else "32-true"
