"""SIGUSR2 widens a CPU run's torch threads (scripts/pipeline.sh hands stage 0's core to stage 1 this way)."""

import os
import signal

import pytest
import torch

from ldm.utils.cpu_threads import WIDEN_SIGNAL, usable_cores, widen_on_signal, widen_threads


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_widen_threads_raises_and_never_lowers(one_thread):
    assert widen_threads(2) == (1, 2)
    assert torch.get_num_threads() == 2
    assert widen_threads(1) == (2, 2)  # a smaller target leaves the count alone
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(WIDEN_SIGNAL is None, reason="no SIGUSR2 on this OS")
@pytest.mark.skipif(usable_cores() < 2, reason="needs two usable cores to widen")
def test_signal_widens_to_all_usable_cores(one_thread):
    previous = signal.getsignal(WIDEN_SIGNAL)
    try:
        assert widen_on_signal()
        os.kill(os.getpid(), WIDEN_SIGNAL)  # the handler runs in the main thread before the next bytecode
        assert torch.get_num_threads() == usable_cores()
    finally:
        signal.signal(WIDEN_SIGNAL, previous)


def test_train_script_installs_the_handler_before_its_heavy_imports():
    source = open(os.path.join(os.path.dirname(__file__), "..", "train.py")).read()
    assert source.index("widen_on_signal()") < source.index("import hydra")
