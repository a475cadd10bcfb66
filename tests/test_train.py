"""train.py end to end through Hydra: every experiment runs, resumes, sweeps and fails clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from train import train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
# The SD fine-tuning recipes run at reduced width (SD's topology rules kept: 4 levels, attention at 4,2,1,
# gradient checkpointing, bf16) on 64 px shapes, starting from a tiny original-layout single file.
TINY_SD = [
    "trainer=cpu", "data=shapes32", "data.image_size=64", "data.batch_size=2", "trainer.accumulate_grad_batches=1",
    "model.unet_config.model_channels=32", "model.unet_config.image_size=8", "model.unet_config.context_dim=128",
    "model.cond_stage_config.arch=ldm-tiny-clip", "model.first_stage_config.ddconfig.ch=32",
    "model.first_stage_config.ddconfig.resolution=64", "+model.first_stage_config.ddconfig.norm_num_groups=8",
]
TINY_SD_HEADS = {"sd15_finetune": [], "sd21_finetune": ["model.unet_config.num_head_channels=8"]}


@pytest.fixture(scope="session")
def stage_checkpoints(tiny_data_root, tmp_path_factory):
    """Tiny stage-0 (CLIP) and stage-1 (autoencoder) checkpoints that later stages can start from."""
    from tests.hydra_helpers import compose_train_config

    out = {}
    for name, experiment in (("clip", "quickstart_clip"), ("autoencoder", "quickstart_autoencoder")):
        run_dir = tmp_path_factory.mktemp(name)
        cfg = compose_train_config(
            [f"experiment={experiment}", "trainer.max_steps=2", "trainer.val_check_interval=2",
             "trainer.limit_val_batches=1", "logger=csv"],
            run_dir, tiny_data_root,
        )
        train(cfg)
        out[name] = str(run_dir / "checkpoints" / "last.ckpt")
        assert Path(out[name]).exists()
    return out


@pytest.fixture(scope="session")
def ldm_checkpoint(stage_checkpoints, tiny_data_root, tmp_path_factory):
    """An (untrained) quickstart_ldm checkpoint on the tiny stage-0/1 checkpoints: what fine-tuning recipes start from."""
    import hydra

    from ldm.convert.checkpoint import save_project_checkpoint
    from tests.hydra_helpers import compose_train_config

    run_dir = tmp_path_factory.mktemp("ldm")
    cfg = compose_train_config(["experiment=quickstart_ldm"], run_dir, tiny_data_root)
    _point_at_checkpoints(cfg, stage_checkpoints)
    save_project_checkpoint(hydra.utils.instantiate(cfg.model, _convert_="all"), run_dir / "base.ckpt")
    return str(run_dir / "base.ckpt")


def _point_at_checkpoints(cfg, checkpoints):
    with open_dict(cfg):
        model = cfg.model
        if "first_stage_config" in model:
            model.first_stage_config = {"ckpt_path": checkpoints["autoencoder"]}
        cond = model.get("cond_stage_config")
        if cond is not None and cond.get("pretrained"):
            cond.pretrained = checkpoints["clip"]


def _export_tiny_sd_file(cfg, path):
    """Point ``init_from`` at an original-layout single file holding random weights of the composed model."""
    import hydra

    from ldm.convert.checkpoint import save_sd_single_file

    with open_dict(cfg):
        cfg.init_from = None
        save_sd_single_file(hydra.utils.instantiate(cfg.model, _convert_="all"), path)
        cfg.init_from = str(path)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_fast_dev_run(experiment, compose_train, stage_checkpoints, request, tmp_path):
    tiny_sd = TINY_SD + TINY_SD_HEADS[experiment] if experiment in TINY_SD_HEADS else []
    cfg = compose_train([f"experiment={experiment}", "debug=fast_dev_run", "logger=csv", *tiny_sd])
    with open_dict(cfg):
        cfg.trainer.detect_anomaly = False  # anomaly mode is slow; fast_dev_run is the check here
        if not tiny_sd and OmegaConf.is_missing(cfg, "init_from"):
            cfg.init_from = request.getfixturevalue("ldm_checkpoint")  # fine-tuning recipes (quickstart_finetune, _lora)
    _point_at_checkpoints(cfg, stage_checkpoints)
    if tiny_sd:
        _export_tiny_sd_file(cfg, tmp_path / "tiny_sd.safetensors")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step >= 1
    assert any(k.startswith("train/") for k in metrics), metrics.keys()


def test_bf16_mixed_run_on_cpu(compose_train):
    cfg = compose_train(["experiment=quickstart_autoencoder", "trainer.max_steps=2", "trainer.precision=bf16-mixed",
                         "trainer.val_check_interval=2", "trainer.limit_val_batches=1"])
    metrics, objects = train(cfg)
    assert objects["trainer"].precision == "bf16-mixed"
    assert torch.isfinite(metrics["train/rec_loss"])
    assert Path(cfg.paths.output_dir, "checkpoints", "last.ckpt").exists()


@pytest.mark.parametrize("amx", [True, False])
def test_quickstart_precision_follows_the_cpu(compose_train, monkeypatch, amx):
    """``${cpu_precision:${trainer.accelerator}}``: on the CPU bf16-mixed with AMX-BF16, fp32 elsewhere; the command line
    still wins; with trainer=gpu bf16-mixed."""
    monkeypatch.setattr("ldm.utils.precision.cpu_has_amx_bf16", lambda: amx)
    for experiment in ("quickstart_autoencoder", "quickstart_ldm"):
        assert compose_train([f"experiment={experiment}"]).trainer.precision == ("bf16-mixed" if amx else "32-true")
    assert compose_train(["experiment=quickstart_ldm", "trainer.precision=32-true"]).trainer.precision == "32-true"
    assert compose_train(["experiment=quickstart_ldm", "trainer=gpu"]).trainer.precision == "bf16-mixed"  # GPU: as gpu.yaml


@pytest.mark.parametrize("flags, expected", [("fpu avx512_bf16 amx_bf16 amx_tile", True), ("fpu avx2 avx512_bf16", False)])
def test_amx_is_read_off_the_cpu_flags(monkeypatch, tmp_path, flags, expected):
    from ldm.utils import precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(precision.sys, "platform", "linux")
    monkeypatch.setattr(precision, "Path", lambda _path: cpuinfo)
    assert precision.cpu_has_amx_bf16() is expected
    assert precision.cpu_precision() == ("bf16-mixed" if expected else "32-true")


def test_resume_continues_step_count(compose_train):
    cfg = compose_train(["experiment=quickstart_autoencoder", "trainer.max_steps=3", "trainer.val_check_interval=3",
                         "trainer.limit_val_batches=1"])
    train(cfg)
    last = Path(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    saved_step = torch.load(last, weights_only=True)["global_step"]
    assert saved_step == 3
    with open_dict(cfg):
        cfg.trainer.max_steps = 5
        cfg.ckpt_path = str(last)
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 5


@pytest.mark.parametrize("workers", [0, 1])
def test_the_same_seed_trains_the_same_model(compose_train, workers):
    """seed fixes everything a run draws, the data order included (ldm/data/seeding.py): two runs end with the
    same weights; with another data seed alone (same init) they do not."""

    def weights(*overrides):
        cfg = compose_train(["experiment=quickstart_autoencoder", "trainer.max_steps=4", "trainer.limit_val_batches=0",
                             "seed=7", f"data.num_workers={workers}", "data.shuffle_buffer=50", *overrides])
        _, objects = train(cfg)
        return {k: v.clone() for k, v in objects["model"].state_dict().items()}

    def same(a, b):  # bit for bit; unmeasured statistics are NaN in both
        return all(torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)

    first, again, other_order = weights(), weights(), weights("data.seed=8")
    assert same(first, again)
    assert not same(first, other_order)


def _run_cli(args, tmp_path, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_experiment_fails_with_clear_message(tmp_path):
    result = _run_cli(["experiment=does_not_exist", f"paths.log_dir={tmp_path}"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert "experiment/does_not_exist" in result.stderr or "does_not_exist" in result.stderr
    assert "Available options" in result.stderr


def test_missing_required_value_names_the_key(tmp_path):
    result = _run_cli(["data=folder", f"paths.log_dir={tmp_path}"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert "data.train_shards" in result.stderr
    assert "Missing required config value" in result.stderr


def test_missing_shard_pattern_is_a_clear_error(tmp_path):
    result = _run_cli(["experiment=quickstart_autoencoder", f"paths.log_dir={tmp_path}",
                       f"data.train_shards='{tmp_path}/nothing-{{000000..000003}}.tar'", "data.build=null"],
                      tmp_path, timeout=120)
    assert result.returncode != 0
    assert "nothing-" in result.stderr and "make_shards.py" in result.stderr


def test_two_job_multirun_completes(tmp_path, tiny_data_root):
    from tests.hydra_helpers import tiny_shards
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        build = compose("train", overrides=["experiment=quickstart_autoencoder"]).data.build
    train_pat, val_pat = tiny_shards(dict(build), tiny_data_root)
    result = _run_cli(
        ["-m", "experiment=quickstart_autoencoder", "model.optimizer.lr=1e-3,2e-3", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "trainer.limit_val_batches=1", f"data.train_shards='{train_pat}'",
         f"data.val_shards='{val_pat}'", "data.build=null", "data.num_workers=0", "data.samples_per_epoch=64",
         "extras.print_config=false", "callbacks.rich_progress_bar=null", f"paths.log_dir={tmp_path}/logs"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(Path(tmp_path, "logs").glob("quickstart_autoencoder/multiruns/*/*/checkpoints/last.ckpt"))
    assert len(runs) == 2
