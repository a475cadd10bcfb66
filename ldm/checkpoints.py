"""Safe checkpoint reading: safetensors, or ``torch.load(weights_only=True)``; never plain unpickling.

A ``.ckpt`` that needs arbitrary Python objects (e.g. a pickle with a code payload) is refused with
a message naming the file; its payload never runs because the restricted unpickler rejects the
global before calling it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, Path]


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint contains Python objects that only a full (unsafe) unpickle could build."""


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint not found: {path}. Check the path (relative paths are "
                                f"resolved from the current directory: {Path.cwd()}).")


def load_checkpoint(path: PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load a whole checkpoint dict safely (Lightning ``.ckpt``, ``.pt``, ``.pth`` or ``.safetensors``).
    ``mmap=True`` maps tensor storages instead of reading them: a cheap look at a big file's metadata."""
    path = Path(path)
    _check_exists(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {"state_dict": load_file(str(path), device=str(map_location))}
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it contains Python objects that are not plain tensors/containers "
            f"({str(err).splitlines()[0]}). Loading it would execute code from the file. If you trust "
            f"its origin, convert it to safetensors in a sandbox; this project never unpickles arbitrary objects."
        ) from err


def load_state_dict(path: PathLike, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """Return the tensor state dict of a checkpoint (unwrapping Lightning's / SD's ``state_dict`` key)."""
    ckpt = load_checkpoint(path, map_location)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict.")
    return state


def save_safetensors(state_dict: dict[str, torch.Tensor], path: PathLike, metadata: dict | None = None) -> None:
    """Write tensors to ``path`` atomically (write to a temporary name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
