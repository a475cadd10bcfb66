"""SIGKILL a training run (at a random step, then while it overwrites last.ckpt), resume with
``ckpt_path=last`` and finish: every last.ckpt on disk loads, and a resumed run starts from exactly
the saved model, EMA, optimizer, scheduler and step."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldm.utils.checkpoint_io import temporary_path
from tests.probes import checkpoint_state

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 8
SAVE_EVERY = 2


def _args(run_dir: Path, log_dir: Path, shards: tuple[str, str], extra: list[str]) -> list[str]:
    return [
        "experiment=quickstart_autoencoder", f"trainer.max_steps={MAX_STEPS}", "trainer.limit_val_batches=0",
        "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
        f"data.train_shards='{shards[0]}'", f"data.val_shards='{shards[1]}'", "data.build=null",
        "data.num_workers=0", "data.batch_size=4", "data.samples_per_epoch=64",
        "callbacks.rich_progress_bar=null", "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=0", f"callbacks.model_checkpoint.every_n_train_steps={SAVE_EVERY}",
        "+callbacks.probe._target_=tests.probes.StateProbe", f"+callbacks.probe.out_dir='{run_dir / 'probe'}'",
        "logger=csv", "extras.print_config=false", "optimized_metric=null",
        f"hydra.run.dir='{run_dir}'", f"paths.log_dir='{log_dir}'",
        *extra,
    ]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def _run_until_marker_then_kill(args: list[str], cwd: Path, marker: Path, timeout: float = 180) -> str:
    """Start train.py, wait until it writes ``marker`` (it then stalls), SIGKILL it; returns the marker text."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"run ended (rc {proc.returncode}) before the kill point:\n"
                                     f"{proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("run never reached the kill point")
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no handler, no cleanup, no final checkpoint
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -9
    return marker.read_text()


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _resumed_start(run_dir: Path) -> dict:
    return json.loads((run_dir / "probe" / "start-rank0.json").read_text())


def _assert_resumed_exactly(run_dir: Path, saved: dict) -> None:
    start = _resumed_start(run_dir)
    expected = checkpoint_state(saved)
    assert start["global_step"] == expected["global_step"]
    assert {k: start["model"][k] for k in expected["model"]} == expected["model"]  # weights, EMA/latent buffers
    assert start["optimizers"] == expected["optimizers"] and start["schedulers"] == expected["schedulers"]


def test_sigkill_at_random_step_and_during_save_then_resume(tmp_path, tiny_data_root):
    from hydra import compose, initialize_config_dir

    from tests.hydra_helpers import CONFIG_DIR, tiny_shards

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        build = compose("train", overrides=["experiment=quickstart_autoencoder"]).data.build
    shards = tiny_shards(dict(build), tiny_data_root)
    log_dir = tmp_path / "logs"
    seed = int(os.environ.get("LDM_FAULT_SEED", random.randrange(2**32)))  # set it to replay a failure
    kill_step = random.Random(seed).randint(SAVE_EVERY + 1, MAX_STEPS - SAVE_EVERY - 1)
    print(f"LDM_FAULT_SEED={seed}: first run killed after step {kill_step}")

    # 1) killed after optimizer step `kill_step`: last.ckpt is the previous save and loads
    first = log_dir / "quickstart_autoencoder" / "runs" / "first"
    first.mkdir(parents=True)
    _run_until_marker_then_kill(
        _args(first, log_dir, shards, ["+callbacks.stall._target_=tests.probes.StallAtStep",
                                       f"+callbacks.stall.step={kill_step}", f"+callbacks.stall.marker='{first / 'KILL'}'"]),
        first, first / "KILL",
    )
    last_first = first / "checkpoints" / "last.ckpt"
    saved_first = _load(last_first)
    assert saved_first["global_step"] == (kill_step - 1) // SAVE_EVERY * SAVE_EVERY, f"killed at step {kill_step}"

    # 2) resume, save once, then get killed half-way through overwriting last.ckpt
    second = log_dir / "quickstart_autoencoder" / "runs" / "second"
    second.mkdir(parents=True)
    what = _run_until_marker_then_kill(
        _args(second, log_dir, shards, ["ckpt_path=last",
                                        "trainer.plugins=[{_target_:tests.probes.StallingCheckpointIO,stall_on_save:2,"
                                        f"marker:'{second / 'KILL'}'}}]"]),
        second, second / "KILL",
    )
    _assert_resumed_exactly(second, saved_first)
    last_second = second / "checkpoints" / "last.ckpt"
    assert temporary_path(last_second).exists() and "half of" in what  # the kill really hit a write
    saved_second = _load(last_second)  # the previous last.ckpt survived the killed overwrite
    assert saved_second["global_step"] == saved_first["global_step"] + SAVE_EVERY

    # 3) resume again (newest last.ckpt) and finish
    third = log_dir / "quickstart_autoencoder" / "runs" / "third"
    third.mkdir(parents=True)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *_args(third, log_dir, shards, ["ckpt_path=last"])],
                            cwd=third, env=_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_resumed_exactly(third, saved_second)
    final = _load(third / "checkpoints" / "last.ckpt")
    assert final["global_step"] == MAX_STEPS
    end = json.loads((third / "probe" / "end-rank0.json").read_text())
    assert end["global_step"] == MAX_STEPS and end["batches"] == MAX_STEPS - saved_second["global_step"]
