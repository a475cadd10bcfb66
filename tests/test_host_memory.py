"""Host memory kept for reuse (ldm/utils/host_memory.py): a step that allocates and frees the same blocks stops
page-faulting them in afresh, and the switch is applied by train.py's extras."""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.utils import host_memory
from ldm.utils.host_memory import keep_freed_memory
from ldm.utils.run import apply_extras

ROOT = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# A block just under the 32 MiB threshold: glibc's defaults serve it with its own mmap (then unmap it on free),
# with memory kept it comes from the heap. Prints the MiB that malloc holds in mmapped blocks for it.
MAPPED_MIB = textwrap.dedent(
    """
    import ctypes, sys, torch
    from ldm.utils.host_memory import keep_freed_memory
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    before = libc.mallinfo2().hblkhd
    block = torch.empty(31 << 18)  # 31 MiB of float32
    print((libc.mallinfo2().hblkhd - before) / 2**20)
    """
)

# One "training step" of allocations: 100 activations of 256 KiB-8 MiB (400 MiB, ~100,000 pages), each written
# (its pages touched) and all held until the "backward" ends, then freed; prints page faults per step.
STEP_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from ldm.utils.host_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    sizes = (torch.randint(64, 2048, (100,), generator=torch.Generator().manual_seed(0)) * 1024).tolist()
    def step():
        activations = [torch.empty(n).fill_(1.0) for n in sizes]  # n float32 = 4 n bytes
        del activations
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    """
)


def _run(script: str, mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return float(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_blocks_below_the_threshold_come_from_the_reusable_heap():
    assert _run(MAPPED_MIB, "default") >= 31  # the premise: glibc maps (and will unmap) such a block itself
    assert _run(MAPPED_MIB, "keep") == 0


@glibc_only
def test_a_repeated_step_with_memory_kept_does_not_fault_its_pages_in_again():
    # with glibc's defaults this step faults ~100,000 pages in most processes (in some, ~400: whether the freed
    # top of the heap can be trimmed depends on where earlier allocations landed)
    assert _run(STEP_FAULTS, "keep") < 1000


def test_thresholds_glibc_would_refuse_are_named():
    with pytest.raises(ValueError, match="mmap_threshold_mb=64"):
        keep_freed_memory(mmap_threshold_mb=64)
    with pytest.raises(ValueError, match="mmap_threshold_mb=0"):
        keep_freed_memory(mmap_threshold_mb=0)
    with pytest.raises(ValueError, match="trim_threshold_mb=-1"):
        keep_freed_memory(trim_threshold_mb=-1)


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert keep_freed_memory() is False


def test_train_extras_apply_the_configured_thresholds(monkeypatch):
    calls = []
    monkeypatch.setattr("ldm.utils.run.keep_freed_memory", lambda **kw: calls.append(kw))
    extras = OmegaConf.load(ROOT / "configs" / "extras" / "default.yaml")
    apply_extras(OmegaConf.create({"extras": {**OmegaConf.to_container(extras), "print_config": False}}))
    assert calls == [{"mmap_threshold_mb": 32, "trim_threshold_mb": 1024}]
    defaults = {k: p.default for k, p in inspect.signature(keep_freed_memory).parameters.items()}
    assert calls[0] == defaults  # the benchmarks call keep_freed_memory() to match train.py
    apply_extras(OmegaConf.create({"extras": {"host_malloc": None, "print_config": False}}))
    assert len(calls) == 1  # null: glibc's defaults


def test_benchmarks_keep_memory_as_train_does_unless_told(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _report  # benchmarks/_report.py

    calls = []
    monkeypatch.setattr(_report, "keep_freed_memory", lambda: calls.append("kept") or True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    _report.add_speed_flags(parser)
    args = parser.parse_args([])
    _report.apply_speed_flags(parser, args)
    assert calls == ["kept"] and "host memory kept" in _report.enabled_speed_flags(args)
    args = parser.parse_args(["--malloc-defaults"])
    _report.apply_speed_flags(parser, args)
    assert calls == ["kept"] and "host memory kept" not in _report.enabled_speed_flags(args)
    assert _report.host_malloc_label(OmegaConf.create({"extras": {"host_malloc": None}})) == "glibc malloc defaults"
