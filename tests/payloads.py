"""A pickle whose unpickling runs code: shared by the tests that check checkpoints are loaded safely."""

from __future__ import annotations

from pathlib import Path

import torch


class Payload:
    """Unpickling this object calls ``open(marker, "w")``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_malicious_ckpt(path: Path, marker: Path, key: str = "weight", **extra) -> Path:
    """A checkpoint whose ``state_dict[key]`` creates ``marker`` when fully unpickled."""
    torch.save({"state_dict": {key: Payload(marker)}, **extra}, path)
    return path
