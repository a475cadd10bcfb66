"""`trainer=ddp_cpu`: two gloo processes train both stages through train.py exactly as users run it (stage 2 from
the autoencoder's latent cache held in memory, as the quickstart trains it).

Each rank dumps fingerprints of its final weights, optimizer and scheduler state and its batch count
(tests.probes.StateProbe); the ranks must agree bit for bit, see the same number of batches, and
rank 0 alone must write the one checkpoint, whose weights are the ranks' weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.data.shards import brace_pattern, build_embedded_shards
from tests.probes import fingerprint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def ddp_shards(tmp_path_factory) -> dict[str, str]:
    """4 train and 2 val shards of 32 px shapes: every rank gets its own validation shard."""
    out = tmp_path_factory.mktemp("ddp_shards")
    spec = {"source": "shapes", "splits": {"train": 64, "val": 32}, "kwargs": {"resolution": 32, "seed": 0},
            "samples_per_shard": 16}
    build_embedded_shards(spec, out)
    return {"train": brace_pattern(out, "train", 4), "val": brace_pattern(out, "val", 2)}


def run_ddp(experiment: str, run_dir: Path, shards: dict[str, str], extra: list[str],
            image_data: bool = True) -> subprocess.CompletedProcess:
    args = [
        f"experiment={experiment}", "trainer=ddp_cpu", f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}", "trainer.limit_val_batches=1",
        "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
        f"data.train_shards='{shards['train']}'", f"data.val_shards='{shards['val']}'",
        *(["data.build=null"] if image_data else []),  # image data configs can build shards; latent ones cannot
        "data.num_workers=0", "data.batch_size=4", "data.val_batch_size=8", "data.samples_per_epoch=64",
        "callbacks.rich_progress_bar=null", "callbacks.model_checkpoint.save_top_k=0",
        "+callbacks.probe._target_=tests.probes.StateProbe", f"+callbacks.probe.out_dir='{run_dir / 'probe'}'",
        "logger=csv", "extras.print_config=false", f"hydra.run.dir='{run_dir}'", f"paths.log_dir='{run_dir}/logs'",
        *extra,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=300)


def check_ranks_agree(run_dir: Path, result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    ends = [json.loads((run_dir / "probe" / f"end-rank{r}.json").read_text()) for r in (0, 1)]
    assert [e["world_size"] for e in ends] == [2, 2]
    assert ends[0]["model"] == ends[1]["model"], "ranks ended with different weights"
    assert ends[0]["optimizers"] == ends[1]["optimizers"] and ends[0]["schedulers"] == ends[1]["schedulers"]
    assert ends[0]["batches"] == ends[1]["batches"] == STEPS and ends[0]["global_step"] == STEPS

    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # one file, no per-rank copies
    ckpt = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    saved = {k: ends[0]["model"][k] for k in ckpt["state_dict"]}
    assert saved == {k: fingerprint(v) for k, v in ckpt["state_dict"].items()}, "checkpoint differs from the ranks"
    assert "Global batch size 8 = 4 per device x 2 devices x 1 nodes x 1 accumulation" in result.stdout + result.stderr
    return ckpt


@pytest.mark.slow  # ~2 min on 2 cores: 2 runs x 3 processes, each importing Lightning (~10 s)
def test_ddp_cpu_trains_both_stages_in_lockstep(tmp_path, ddp_shards):
    ae_dir = tmp_path / "autoencoder"
    ae_dir.mkdir()
    # The autoencoder's discriminator (and, in discriminator steps, the decoder) take no part in some
    # backward passes: DDP must be told to look for unused parameters.
    result = run_ddp("quickstart_autoencoder", ae_dir, ddp_shards, ["trainer.strategy=ddp_spawn_find_unused_parameters_true"])
    ae_ckpt = check_ranks_agree(ae_dir, result)
    assert torch.isfinite(ae_ckpt["state_dict"]["latent_std"]).all()  # measured over both ranks' val shards

    # stage 2 as the quickstart trains it: from the autoencoder's latent cache, held in memory on each rank
    ae_last = ae_dir / "checkpoints" / "last.ckpt"
    cache_dir = tmp_path / "latents"
    encode = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "encode_latents.py"), f"ckpt='{ae_last}'", "data=shapes32",
         f"data.train_shards='{ddp_shards['train']}'", f"data.val_shards='{ddp_shards['val']}'", "data.build=null",
         f"out='{cache_dir}'", f"hydra.run.dir='{tmp_path / 'encode'}'"],
        cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300)
    assert encode.returncode == 0, encode.stderr[-4000:]
    ldm_dir = tmp_path / "ldm"
    ldm_dir.mkdir()
    cache = {"train": brace_pattern(cache_dir, "train", 4), "val": brace_pattern(cache_dir, "val", 2)}
    result = run_ddp("quickstart_ldm", ldm_dir, cache, [
        "data=latents", "data.in_memory=true", f"model.first_stage_config.ckpt_path='{ae_last}'",
        "callbacks.sample_grid=null", "model.ema_decay=0.9",
    ], image_data=False)
    ldm_ckpt = check_ranks_agree(ldm_dir, result)
    assert any(k.startswith("model_ema.") for k in ldm_ckpt["state_dict"])  # the EMA agrees across ranks too
    keys = [json.loads((ldm_dir / "probe" / f"end-rank{r}.json").read_text())["keys"] for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == STEPS * 4 and not set(keys[0]) & set(keys[1])  # one pass, split
