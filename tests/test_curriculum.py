"""Curriculum callback: phase validation, the data switch at the exact step (the batches training_step sees),
the LR multiplier on a schedule, the timestep range, resume in the right phase, and DDP ranks switching together."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import ldm.models.diffusion as diffusion_module
from ldm.callbacks.curriculum import Curriculum, parse_phases
from ldm.data.webdataset import WebDataModule
from ldm.models.diffusion import LatentDiffusion
from ldm.optim import _WarmupThen, warmup_constant, warmup_cosine
from tests.test_ddp import ddp_shards  # noqa: F401  (fixture: 4 train / 2 val shards of 32 px shapes)

# f=2 autoencoder x 2 U-Net levels: any side divisible by 4; 16 px -> 8x8 latents, 32 px -> 16x16
DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0, norm_num_groups=4)
UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[2], num_head_channels=16, use_spatial_transformer=True, context_dim=128,
            use_linear_in_transformer=True, legacy=False)
LR = 1e-3
BATCHES_PER_EPOCH = 5  # the configured epoch; phase boundaries cut it


class RecordingLDM(LatentDiffusion):
    """Records, per training batch: the optimizer step, the image batch shape and the LR of this step's update."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[tuple[int, tuple[int, ...], float]] = []

    def training_step(self, batch, batch_idx):
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.seen.append((self.trainer.global_step, tuple(batch["image"].shape), lr))
        return super().training_step(batch, batch_idx)


def tiny_ldm(scheduler=None, timestep_range=None) -> RecordingLDM:
    torch.manual_seed(0)
    model = RecordingLDM(unet_config=UNET, cond_stage_config={"arch": "ldm-tiny-clip"},
                         first_stage_config={"ddconfig": DDCONFIG, "embed_dim": 4}, ema_decay=None,
                         latent_norm="none", cond_drop_prob=0.0, timestep_range=timestep_range,
                         optimizer=functools.partial(torch.optim.AdamW, lr=LR),
                         scheduler=scheduler or functools.partial(warmup_constant, warmup_steps=0))
    model.first_stage_model.weights_loaded = True  # random weights are fine for shapes and schedules
    return model


@pytest.fixture(scope="module")
def shards(tiny_data_root) -> tuple[str, str]:
    from tests.hydra_helpers import tiny_shards

    return tiny_shards({"source": "shapes", "kwargs": {"resolution": 32, "seed": 0}}, tiny_data_root)


def datamodule(shards, batch_size=2, batches_per_epoch=BATCHES_PER_EPOCH) -> WebDataModule:
    return WebDataModule(train_shards=shards[0], val_shards=None, image_size=32, batch_size=batch_size,
                         num_workers=0, shuffle_buffer=16, batches_per_epoch=batches_per_epoch)


def fit(model, data, phases, max_steps, root: Path, ckpt_path=None, accumulate=1, save_every=None, **trainer_kw):
    callbacks = [Curriculum(phases)]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0,
                                         every_n_train_steps=save_every))
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer = L.Trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(save_every),
                        accumulate_grad_batches=accumulate, default_root_dir=root, **{**options, **trainer_kw})
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return trainer


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("phases, message", [
    ([], "non-empty list"),
    ({"start_step": 0}, "non-empty list"),
    ([{"start_step": 5}], "must start at step 0"),
    ([{"start_step": 0}, {"start_step": 0}], "sorted by start_step"),
    ([{"start_step": 0}, {"start_step": 10}, {"start_step": 5}], r"phase 1 starts at 10, phase 2 at 5"),
    ([{"start_step": 0, "resoluton": 32}], r"unknown key\(s\) \['resoluton'\]"),
    ([{"resolution": 32}], "has no start_step"),
    ([{"start_step": -1}], "start_step must be an integer >= 0"),
    ([{"start_step": 0, "resolution": 0}], "resolution must be a positive integer"),
    ([{"start_step": 0, "batch_size": 2.5}], "batch_size must be a positive integer"),
    ([{"start_step": 0, "lr_scale": 0}], "lr_scale must be a positive number"),
    ([{"start_step": 0, "timestep_range": [500, 100]}], r"timestep_range must be \[t_min, t_max\)"),
    ([{"start_step": 0, "timestep_range": [0, 10, 20]}], r"timestep_range must be \[t_min, t_max\)"),
])
def test_bad_phases_are_refused_with_the_problem_named(phases, message):
    with pytest.raises(ValueError, match=message):
        parse_phases(phases)


def test_phase_index_follows_the_start_steps():
    curriculum = Curriculum([{"start_step": 0}, {"start_step": 3}, {"start_step": 7}])
    assert [curriculum.phase_index(s) for s in range(10)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("phases, trainer_kw, message", [
    ([{"start_step": 0, "resolution": 18}], {}, "phase 0: resolution 18: .*not divisible by the model's total "
                                                "downsampling 4"),
    ([{"start_step": 0, "timestep_range": [0, 1001]}], {}, "exceeds the schedule's 1000 timesteps"),
    ([{"start_step": 0, "batch_size": 4}], {"limit_val_batches": 1, "val_check_interval": 2},
     "check_val_every_n_epoch=null"),
])
def test_run_level_problems_stop_the_fit_before_a_step(shards, tmp_path, phases, trainer_kw, message):
    model = tiny_ldm()
    data = WebDataModule(train_shards=shards[0], val_shards=shards[1], image_size=32, batch_size=2, num_workers=0,
                         batches_per_epoch=BATCHES_PER_EPOCH)
    with pytest.raises(ValueError, match=message):
        fit(model, data, phases, 2, tmp_path, **trainer_kw)
    assert model.seen == []


# ----------------------------------------------------------------------------------------------- the datamodule
def test_reconfigure_train_changes_only_the_training_stream(shards):
    from ldm.data.latents import LatentDataModule
    from ldm.data.stages import SkipCounter

    data = WebDataModule(train_shards=shards[0], val_shards=shards[1], image_size=32, batch_size=2, num_workers=0,
                         samples_per_epoch=24)
    data.setup("fit")
    assert data.train_stream() == {"image_size": 32, "batch_size": 2, "batches_per_epoch": 12}
    assert data.reconfigure_train(image_size=16, batch_size=4, max_batches_per_epoch=5)
    assert data.train_stream() == {"image_size": 16, "batch_size": 4, "batches_per_epoch": 5}  # min(24 / 4, 5)
    assert data.reconfigure_train(image_size=16, batch_size=4, max_batches_per_epoch=9)  # the epoch: 6 batches
    assert not data.reconfigure_train(image_size=16, batch_size=4, max_batches_per_epoch=7)  # still 6: no change
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and len(data.train_dataloader()) == 6
    assert next(iter(data.val_dataloader()))["image"].shape[-1] == 32  # validation keeps the configured size
    assert data.reconfigure_train() and data.train_stream()["image_size"] == 32  # None: the configured values
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        data.reconfigure_train(batch_size=0)

    latents = LatentDataModule(train_shards="unused-{000000..000001}.tar", val_shards=None, batch_size=2,
                               batches_per_epoch=3)
    with pytest.raises(ValueError, match="cannot change its image_size"):
        latents.reconfigure_train(image_size=16)
    assert latents.reconfigure_train(batch_size=8)
    assert latents._sample_stages(SkipCounter("train"), train=True)[-1].batch_size == 8


# ----------------------------------------------------------------------------------------------- the switch
# epochs of 5 (8) batches, cut at the phase start after 3 steps = 3 (6) batches
@pytest.mark.parametrize("accumulate, batches_per_epoch", [(1, 5), (2, 8)])
def test_resolution_and_batch_switch_at_the_phase_step(shards, tmp_path, accumulate, batches_per_epoch):
    phases = [{"start_step": 0, "resolution": 16, "batch_size": 4}, {"start_step": 3}]  # then the configured 32 px x 2
    model = tiny_ldm()
    trainer = fit(model, datamodule(shards, batches_per_epoch=batches_per_epoch), phases, 7, tmp_path,
                  accumulate=accumulate)
    assert trainer.global_step == 7
    steps = [step for step, _, _ in model.seen]
    assert steps == [s for s in range(7) for _ in range(accumulate)]  # every step's batches, nothing skipped
    for step, shape, _ in model.seen:
        assert shape == ((4, 3, 16, 16) if step < 3 else (2, 3, 32, 32)), f"step {step}"
    assert trainer.reload_dataloaders_every_n_epochs == 0  # the user's value is back after the fit


def test_lr_scale_multiplies_the_schedule_from_its_phase(shards, tmp_path):
    schedule = _WarmupThen(warmup_steps=2, total_steps=8, shape="cosine", min_ratio=0.0)
    model = tiny_ldm(scheduler=functools.partial(warmup_cosine, total_steps=8, warmup_steps=2))
    fit(model, datamodule(shards), [{"start_step": 0}, {"start_step": 3, "lr_scale": 0.25}], 8, tmp_path)
    lrs = [lr for _, _, lr in model.seen]
    expected = [LR * schedule(s) * (0.25 if s >= 3 else 1.0) for s in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_timestep_range_follows_the_phases_and_stays_out_of_checkpoints(shards, tmp_path, monkeypatch):
    drawn = []
    original = diffusion_module.sample_timesteps

    def recording(batch, num_timesteps, t_min=0, t_max=None, **kwargs):
        t = original(batch, num_timesteps, t_min, t_max, **kwargs)
        drawn.append((t_min, t_max, t))
        return t

    monkeypatch.setattr(diffusion_module, "sample_timesteps", recording)
    phases = [{"start_step": 0, "timestep_range": [0, 100]}, {"start_step": 2, "timestep_range": [900, 1000]},
              {"start_step": 4}]
    model = tiny_ldm()
    fit(model, datamodule(shards, batch_size=8), phases, 6, tmp_path, save_every=5)
    assert [(lo, hi) for lo, hi, _ in drawn] == [(0, 100)] * 2 + [(900, 1000)] * 2 + [(0, 1000)] * 2
    assert all(int(t.min()) >= 0 and int(t.max()) < 100 for _, _, t in drawn[:2])
    assert all(int(t.min()) >= 900 for _, _, t in drawn[2:4])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 5 and saved["hyper_parameters"]["timestep_range"] is None  # configured value


# ----------------------------------------------------------------------------------------------- resume
PHASES = [{"start_step": 0, "resolution": 16, "batch_size": 4}, {"start_step": 3, "lr_scale": 0.5}]
TOTAL = 9  # epochs: steps 0-2 (cut at the boundary), 3-7, 8


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    model = tiny_ldm()
    fit(model, datamodule(shards), PHASES, TOTAL, tmp_path_factory.mktemp("uninterrupted"))
    return [(step, shape, lr) for step, shape, lr in model.seen]


@pytest.mark.parametrize("stop", [2, 3, 5])  # inside the cut epoch, at the boundary (its last batch), after it
def test_resume_continues_in_the_right_phase(shards, tmp_path, uninterrupted, stop):
    first = tiny_ldm()
    fit(first, datamodule(shards), PHASES, stop, tmp_path / "first", save_every=1)
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == stop

    resumed = tiny_ldm()
    fit(resumed, datamodule(shards), PHASES, TOTAL, tmp_path / "resumed", ckpt_path=str(ckpt))
    seen = [(step, shape) for step, shape, _ in resumed.seen]
    assert seen == [(step, shape) for step, shape, _ in uninterrupted if step >= stop]
    assert all(shape == (2, 3, 32, 32) for step, shape in seen if step >= 3)  # phase 2 after the resume
    lrs = [lr for _, _, lr in resumed.seen]
    assert lrs == pytest.approx([LR * (0.5 if step >= 3 else 1.0) for step, _, _ in resumed.seen])  # scaled once


# ----------------------------------------------------------------------------------------------- configs
def flops_per_image(model: LatentDiffusion, side: int) -> int:
    """FLOPs of one training image at ``side`` px: encoder, text encoder, U-Net forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = {"image": torch.zeros(1, 3, side, side), "caption": ["a red circle"]}
    with FlopCounterMode(display=False) as counter:
        model.diffusion_step(batch)["loss"].backward()
    return counter.get_total_flops()


def test_shapes_curriculum_and_its_baseline_have_equal_training_flops(compose_train):
    import hydra

    ddconfig = compose_train(["model=autoencoder_f4_tiny"], tiny_data=False).model.ddconfig
    budgets, flops = {}, {}
    for name in ("shapes_curriculum", "shapes64_ldm"):
        cfg = compose_train([f"experiment={name}"], tiny_data=False)
        assert cfg.data.image_size == 64 and cfg.model.unet_config.model_channels == 64  # the quickstart U-Net
        if not flops:  # the same model in both: count once
            untrained_autoencoder = {"ckpt_path": None, "ddconfig": ddconfig, "embed_dim": 4}
            model = hydra.utils.instantiate(cfg.model, first_stage_config=untrained_autoencoder, _convert_="all")
            flops = {side: flops_per_image(model, side) for side in (32, 64)}
        phases = cfg.callbacks.curriculum.phases if "curriculum" in cfg.callbacks else [{"start_step": 0}]
        if name == "shapes_curriculum":
            assert [p.resolution for p in Curriculum(phases).phases] == [32, None]  # 32 px, then the configured 64
        ends = [p["start_step"] for p in phases[1:]] + [cfg.trainer.max_steps]
        budgets[name] = sum((end - p["start_step"]) * p.get("batch_size", cfg.data.batch_size)
                            * flops[p.get("resolution", cfg.data.image_size)] for p, end in zip(phases, ends))
    assert budgets["shapes_curriculum"] == pytest.approx(budgets["shapes64_ldm"], rel=0.01)


# ----------------------------------------------------------------------------------------------- evaluation
def test_evaluate_generates_at_the_requested_size(tmp_path, monkeypatch):
    """scripts/evaluate.py height/width: a model trained by the curriculum is scored at its final resolution."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from tests.hydra_helpers import CONFIG_DIR, ROOT
    from tests.script_loader import load_script

    model = tiny_ldm()
    hparams = {k: v for k, v in model.hparams.items()}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, tmp_path / "ldm.ckpt")
    evaluate_script = load_script("evaluate")
    grids = []
    monkeypatch.setattr(evaluate_script, "make_grid", lambda images, **kw: grids.append(images.shape) or _Saveable())
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("eval", overrides=[f"ckpt={tmp_path / 'ldm.ckpt'}", "n_per_prompt=1", "sampler=euler",
                                         "steps=1", "height=16", "width=24", f"out={tmp_path / 'eval'}", "device=cpu"])
    with open_dict(cfg):
        cfg.paths.update(root_dir=str(ROOT), output_dir=str(tmp_path), work_dir=str(tmp_path))
    metrics = evaluate_script.evaluate(cfg)
    assert grids == [(18, 3, 16, 24)] and metrics["num_images"] == 18  # [N, 3, H, W]: 18 prompts x 1


class _Saveable:
    def save(self, path):
        pass


# ----------------------------------------------------------------------------------------------- DDP
class ShapeLog(L.Callback):
    """Writes ``{out_dir}/shapes-rank{R}.json``: [global step, image batch shape] of every training batch."""

    def __init__(self, out_dir: str):
        self.out_dir, self.seen = Path(out_dir), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append([trainer.global_step, list(batch["image"].shape)])

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"shapes-rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


@pytest.mark.slow  # ~1 min on 2 cores: a 1-step autoencoder, then train.py with 2 gloo processes
def test_ddp_ranks_switch_together(tmp_path, tiny_data_root, ddp_shards):
    from tests.hydra_helpers import compose_train_config
    from tests.test_ddp import check_ranks_agree, run_ddp
    from train import train

    ae_dir = tmp_path / "autoencoder"
    train(compose_train_config(["experiment=quickstart_autoencoder", "trainer.max_steps=1", "logger=csv",
                                "trainer.limit_val_batches=0"], ae_dir, tiny_data_root))
    run_dir = tmp_path / "ldm"
    run_dir.mkdir()
    result = run_ddp("shapes_curriculum", run_dir, ddp_shards, [
        f"model.first_stage_config.ckpt_path='{ae_dir / 'checkpoints' / 'last.ckpt'}'",
        "callbacks.curriculum.phases=[{start_step:0,resolution:16,batch_size:4},{start_step:2,batch_size:2}]",
        "data.image_size=32", f"+callbacks.shapes._target_={__name__}.ShapeLog",
        f"+callbacks.shapes.out_dir='{run_dir / 'probe'}'",
    ])
    check_ranks_agree(run_dir, result)  # same weights, optimizer and step on both ranks; one checkpoint
    logs = [json.loads((run_dir / "probe" / f"shapes-rank{r}.json").read_text()) for r in (0, 1)]
    assert logs[0] == logs[1] == [[0, [4, 3, 16, 16]], [1, [4, 3, 16, 16]], [2, [2, 3, 32, 32]]]
