"""Evaluation: FID/KID/CLIP score behave as defined, evaluate.py writes every metric for diffusion and
autoencoder checkpoints, sweeps plot, and an offline W&B run of a short training reads back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from PIL import Image

from ldm.data.synthetic import ShapesSource
from ldm.evaluation.features import CLIPImageFeatures, InceptionFeatures, build_feature_extractor
from ldm.evaluation.generation import score
from ldm.evaluation.image_metrics import clip_score, extract_features, fid_kid
from ldm.evaluation.kind import checkpoint_kind
from ldm.evaluation.prompt_accuracy import normalised_entropy
from ldm.evaluation.wandb_offline import WandbLogError, find_offline_runs, read_offline_run, read_records
from ldm.models.clip import CLIPModule
from tests.script_loader import load_script
from train import train

ROOT = Path(__file__).resolve().parents[1]


evaluate_script = load_script("evaluate")
plot_sweep_script = load_script("plot_sweep")


def shapes_batch(n: int, split: str = "val") -> tuple[torch.Tensor, list[str]]:
    """n real ShapesSource renders [n, 3, 32, 32] in [0, 1] and their captions."""
    source = ShapesSource(num_samples=n, resolution=32, split=split)
    samples = [source[i] for i in range(n)]
    images = torch.stack([torch.from_numpy(np.array(s["image"])).permute(2, 0, 1) for s in samples])
    return images.float() / 255.0, [s["caption"] for s in samples]


@pytest.fixture(scope="module")
def random_clip() -> CLIPModule:
    torch.manual_seed(0)
    return CLIPModule(arch="ldm-tiny-clip").eval()


@pytest.fixture(scope="module")
def trained(tiny_data_root, tmp_path_factory) -> dict:
    """Tiny CLIP and autoencoder runs (CSV logger), then a tiny LDM run logged offline to W&B with sample grids."""
    from tests.hydra_helpers import compose_train_config

    out = {}
    for name, overrides in (
        ("clip", ["experiment=quickstart_clip", "logger=csv", "data.batch_size=8"]),
        ("autoencoder", ["experiment=quickstart_autoencoder", "logger=csv"]),
    ):
        run_dir = tmp_path_factory.mktemp(name)
        cfg = compose_train_config([*overrides, "trainer.max_steps=2", "trainer.val_check_interval=2",
                                    "trainer.limit_val_batches=1"], run_dir, tiny_data_root)
        train(cfg)
        out[name] = str(run_dir / "checkpoints" / "last.ckpt")
    run_dir = tmp_path_factory.mktemp("ldm")
    cfg = compose_train_config(
        ["experiment=quickstart_ldm", "logger=wandb", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "data.batch_size=8",
         "callbacks.sample_grid.every_n_steps=1", "callbacks.sample_grid.steps=2"],
        run_dir, tiny_data_root,
    )
    with open_dict(cfg):
        cfg.model.first_stage_config = {"ckpt_path": out["autoencoder"]}
        cfg.model.cond_stage_config.pretrained = out["clip"]
    train(cfg)
    wandb.finish()  # the run stays open until the process exits; finishing flushes its transaction log
    out["ldm"] = str(run_dir / "checkpoints" / "last.ckpt")
    out["ldm_run_dir"] = run_dir
    out["val_shards"] = str(cfg.data.val_shards)
    return out


def compose_eval(overrides: list[str], out: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(config_name="eval", overrides=[*overrides, f"out={out}", "device=cpu"])
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    return cfg


# ---------------------------------------------------------------------------------------------- metrics
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(random_clip):
    images, _ = shapes_batch(48)
    feature = CLIPImageFeatures(random_clip)
    real = extract_features(feature, images.split(16))
    assert real.shape == (48, feature.num_features)
    same = fid_kid(real, real, kid_subsets=10)
    darker = {f: fid_kid(real, extract_features(feature, (f * images).split(16)), kid_subsets=10) for f in (0.9, 0.5)}
    assert abs(same["fid"]) < 1e-4 * darker[0.9]["fid"]
    assert darker[0.9]["fid"] < darker[0.5]["fid"]  # a larger brightness shift is a larger distance
    assert darker[0.9]["kid_mean"] < darker[0.5]["kid_mean"]


def test_fid_needs_two_images_per_set(random_clip):
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid(torch.zeros(1, 8, dtype=torch.float64), torch.zeros(5, 8, dtype=torch.float64))


def test_clip_score_is_100_times_the_mean_cosine(random_clip):
    images, captions = shapes_batch(6)
    expected = 100 * torch.nn.functional.cosine_similarity(
        random_clip.model.encode_image(random_clip.preprocess(images * 2 - 1)),
        random_clip.model.encode_text(random_clip.tokenizer(captions)), dim=-1).mean()
    assert clip_score(random_clip, images, captions, batch_size=4) == pytest.approx(max(float(expected), 0), abs=1e-3)


def test_shapes_reader_scores_real_renders_as_correct():
    images, captions = shapes_batch(120)
    metrics = score(images, captions)
    assert metrics["prompt_accuracy"] >= 0.97
    # the varied captions name size, position and background often but not always: all read right on renders
    for detail in ("size", "position", "background"):
        assert metrics[f"{detail}_images"] > 30 and metrics[f"{detail}_accuracy"] == 1.0
    assert metrics["caption_accuracy"] == 1.0


def test_spread_of_unnamed_details_is_high_on_real_renders_and_zero_when_collapsed():
    source = ShapesSource(num_samples=400, resolution=32, split="val", caption_detail="short")
    samples = [source[i] for i in range(len(source))]
    images = torch.stack([torch.from_numpy(np.array(s["image"])).permute(2, 0, 1) for s in samples]).float() / 255
    prompts = [s["caption"] for s in samples]  # "a {color} {shape}": every detail unnamed
    real = score(images, prompts)
    for detail in ("size", "position", "background"):  # the renders are uniform in each detail
        assert real[f"{detail}_spread"] > 0.95 and real[f"{detail}_spread_images"] == 400
    centre = [i for i, s in enumerate(samples) if s["meta"]["position"] == "in the center"]
    collapsed = score(images[centre], [prompts[i] for i in centre])  # a model that always draws the centre
    assert len(centre) > 20 and collapsed["position_spread"] == 0.0 and collapsed["size_spread"] > 0.8
    named = score(images[:4], [f"{p} in the center" for p in prompts[:4]])
    assert "position_spread" not in named and "size_spread" in named  # only where the prompt leaves it out
    assert normalised_entropy(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(1.0)
    assert normalised_entropy(["a", "a", "b", "b"], ["a", "b", "c", "d"]) == pytest.approx(0.5)


def test_a_wrong_size_position_or_background_is_scored_wrong():
    source = ShapesSource(num_samples=40, resolution=32, split="val", caption_detail="full")
    samples = [source[i] for i in range(len(source))]
    images = torch.stack([torch.from_numpy(np.array(s["image"])).permute(2, 0, 1) for s in samples]).float() / 255
    other = {"small": "large", "medium": "small", "large": "small", "black": "white", "white": "gray", "gray": "black"}
    wrong = []
    for s in samples:  # "a {size} {color} {shape} {position} on a {background} background", each detail swapped
        meta = s["meta"]
        moved = "at the bottom" if meta["row"] == "top" else "at the top"
        wrong.append(f"a {other[meta['size']]} {meta['color']} {meta['shape']} {moved} "
                     f"on a {other[meta['background']]} background")
    right, swapped = score(images, [s["caption"] for s in samples]), score(images, wrong)
    assert right["caption_accuracy"] == 1.0 and right["position_images"] == 40
    assert swapped["prompt_accuracy"] == 1.0  # colour and shape still right
    assert swapped["size_accuracy"] == swapped["position_accuracy"] == swapped["background_accuracy"] == 0.0
    assert swapped["caption_accuracy"] == 0.0
    assert "position_accuracy" not in score(images[:2], ["a red circle", "a blue square"])  # named nowhere


def test_detailed_prompt_set_names_every_attribute_in_balance():
    from collections import Counter

    from ldm.evaluation.generation import prompt_set
    from ldm.evaluation.prompt_accuracy import expected_details, expected_shape_attributes

    prompts = prompt_set("shapes_detailed")
    details = [expected_details(p) for p in prompts]
    assert len(prompts) == len(set(prompts)) == 54 and all(expected_shape_attributes(p) for p in prompts)
    assert Counter(d["size"] for d in details) == {"small": 18, "medium": 18, "large": 18}
    assert Counter(d["background"] for d in details) == {"black": 18, "white": 18, "gray": 18}
    assert set(Counter(d["position"] for d in details).values()) == {6}  # each of the 9 cells 6 times


def test_inception_features_need_a_local_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        build_feature_extractor(inception_weights=str(tmp_path / "missing.pth"))


def test_inception_without_torch_fidelity_names_the_package(tmp_path, monkeypatch):
    import torchmetrics.image.fid

    monkeypatch.setattr(torchmetrics.image.fid, "_TORCH_FIDELITY_AVAILABLE", False)  # as if not installed
    weights = tmp_path / "inception.pth"
    torch.save({"fc.bias": torch.zeros(1008)}, weights)
    with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
        InceptionFeatures(weights)


# ---------------------------------------------------------------------------------------------- evaluate.py
def test_evaluate_diffusion_writes_every_metric(trained, tmp_path):
    cfg = compose_eval([f"ckpt={trained['ldm']}", "n_per_prompt=1", "sampler=euler", "steps=2",
                        f"clip_ckpt={trained['clip']}", f"real_shards={trained['val_shards']}", "kid_subsets=5"],
                       tmp_path)
    evaluate_script.evaluate(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["kind"] == "diffusion"
    assert metrics["features"] == f"clip:{trained['clip']}"
    for key in ("prompt_accuracy", "color_accuracy", "shape_accuracy", "clip_score", "fid_clip", "kid_clip_mean",
                "kid_clip_std"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["nfe"] == 2 and metrics["num_images"] == 18 and metrics["num_real_images"] == 32
    assert metrics["fid_clip"] > 0 and metrics["notes"] == []
    assert "| fid_clip |" in (tmp_path / "metrics.md").read_text()
    assert Image.open(tmp_path / "samples.png").size[0] > 32


def test_evaluate_autoencoder_reports_reconstruction_metrics(trained, tmp_path):
    assert checkpoint_kind(trained["autoencoder"]) == "autoencoder"
    cfg = compose_eval([f"ckpt={trained['autoencoder']}", f"real_shards={trained['val_shards']}",
                        f"clip_ckpt={trained['clip']}", "kid_subsets=5"], tmp_path / "with_clip")
    metrics = evaluate_script.evaluate(cfg)
    assert metrics["kind"] == "autoencoder" and metrics["num_images"] == 32
    assert 0 < metrics["psnr"] < 100 and -1 <= metrics["ssim"] <= 1
    assert metrics["rfid_clip"] > 0 and math.isfinite(metrics["rkid_clip_mean"])

    cfg = compose_eval([f"ckpt={trained['autoencoder']}", f"real_shards={trained['val_shards']}",
                        "max_real_images=10"], tmp_path / "no_features")
    metrics = json.loads(json.dumps(evaluate_script.evaluate(cfg)))
    assert metrics["num_images"] == 10 and metrics["features"] is None and metrics["rfid"] is None
    assert any("clip_ckpt" in note for note in metrics["notes"])


def test_evaluate_refuses_a_clip_checkpoint_as_model(trained):
    with pytest.raises(ValueError, match="clip_ckpt"):
        checkpoint_kind(trained["clip"])


def test_sweep_plots_every_metric_against_nfe(trained, tmp_path):
    sweep = tmp_path / "sweep"
    for job, (sampler, steps) in enumerate([("euler", 1), ("euler", 2), ("heun", 2)]):
        cfg = compose_eval([f"ckpt={trained['ldm']}", "n_per_prompt=1", f"sampler={sampler}", f"steps={steps}",
                            "save_images=false"], sweep / str(job))
        evaluate_script.evaluate(cfg)
    runs = plot_sweep_script.load_runs(sweep)
    table = plot_sweep_script.series(runs, "prompt_accuracy")
    assert {s: [p[0] for p in pts] for s, pts in table[4.0].items()} == {"euler": [1, 2], "heun": [3]}
    png = plot_sweep_script.main([str(sweep), "--metrics", "prompt_accuracy", "seconds"])
    assert Image.open(png).size[0] > 100


# ---------------------------------------------------------------------------------------------- W&B readback
def test_offline_wandb_run_reads_back_history_and_sample_grids(trained):
    runs = find_offline_runs(trained["ldm_run_dir"])
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    losses = run.metric("train/loss")
    assert len(losses) == 2 and all(math.isfinite(v) for _, v in losses)
    grids = [row for row in run.history if "samples/filenames" in row]
    assert len(grids) == 2  # every_n_steps=1 over 2 steps
    for row in grids:
        (name,) = row["samples/filenames"]
        assert run.run_dir / "files" / name in run.media
        assert Image.open(run.run_dir / "files" / name).size == (row["samples/width"], row["samples/height"])
    assert "val/loss" in run.summary


def test_a_file_that_is_not_a_wandb_log_is_refused(tmp_path):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(b"not a log at all")
    with pytest.raises(WandbLogError, match="not a W&B transaction log"):
        list(read_records(path))
