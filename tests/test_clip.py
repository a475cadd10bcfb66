"""Stage-0 contrastive CLIP training (ldm/models/clip.py) and its hand-over to the text encoder."""

from __future__ import annotations

import functools

import hydra
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.models.clip import CLIPModule, _zero_shot_classes, caption_labels, retrieval_metrics
from ldm.modules.conditioning import OpenCLIPTextEncoder, text_transformer
from tests.script_loader import load_script

ARCH = "ldm-tiny-clip"
COLORS = {"red": (1.0, -0.8, -0.8), "green": (-0.8, 0.6, -0.8), "blue": (-0.8, -0.6, 1.0), "yellow": (0.9, 0.8, -0.8),
          "magenta": (0.8, -0.7, 0.8), "cyan": (-0.8, 0.8, 0.8), "white": (1.0, 1.0, 1.0), "gray": (0.0, 0.0, 0.0)}


class ColorSquares(Dataset):
    """One 32 px image per color: a colored square on black, captioned "a {color} square"."""

    def __len__(self) -> int:
        return len(COLORS)

    def __getitem__(self, i: int) -> dict:
        name, rgb = list(COLORS.items())[i]
        image = -torch.ones(3, 32, 32)
        image[:, 8:24, 8:24] = torch.tensor(rgb)[:, None, None]
        return {"image": image, "caption": f"a {name} square"}


def batch_of_all() -> dict:
    items = [ColorSquares()[i] for i in range(len(COLORS))]
    return {"image": torch.stack([x["image"] for x in items]), "caption": [x["caption"] for x in items]}


@torch.no_grad()
def evaluate(module: CLIPModule, batch: dict) -> tuple[float, float]:
    module.eval()
    loss, img, txt = module.contrastive_loss(batch)
    return loss.item(), retrieval_metrics(img, txt, batch["caption"])["i2t_top1"].item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CLIP trained for 40 steps on the 8 color squares; returns (module, checkpoint, before)."""
    torch.manual_seed(0)
    module = CLIPModule(ARCH, zero_shot={"template": "a {} square", "classes": list(COLORS)},
                        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0))
    batch = batch_of_all()
    before = evaluate(module, batch)
    module.train()
    loader = DataLoader(ColorSquares(), batch_size=len(COLORS), shuffle=True)
    root = tmp_path_factory.mktemp("clip")
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, default_root_dir=root,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=40,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=DataLoader(ColorSquares(), batch_size=4))
    ckpt = root / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, ckpt, before, dict(trainer.callback_metrics)


def test_contrastive_loss_falls_and_retrieval_rises(trained):
    module, _, (loss0, acc0), metrics = trained
    loss1, acc1 = evaluate(module, batch_of_all())
    print(f"loss {loss0:.3f} -> {loss1:.3f}, image->text top-1 {acc0:.2f} -> {acc1:.2f}, val {metrics}")
    assert loss1 < 0.5 * loss0
    assert acc1 >= 0.75 and acc1 > acc0
    # validation ran over both val batches (4 + 4 pairs) and logged retrieval and zero-shot accuracy
    assert metrics["val/i2t_top1"] >= 0.75 and metrics["val/zero_shot_top1"] >= 0.75
    assert metrics["val/retrieval_chance"] == pytest.approx(1 / 8)
    assert metrics["val/zero_shot_skipped"] == 0


def test_checkpoint_loads_into_the_text_encoder_with_the_same_embeddings(trained):
    module, ckpt, _, _ = trained
    module.eval()
    encoder = OpenCLIPTextEncoder(ARCH, pretrained=str(ckpt), layer="last")
    captions = batch_of_all()["caption"] + [""]
    out = encoder.encode(captions)
    with torch.no_grad():
        expected_features = module.text_features(captions)
        _, expected_context, _ = text_transformer(module.model, out["tokens"])
    torch.testing.assert_close(torch.nn.functional.normalize(out["pooled"], dim=-1), expected_features)
    torch.testing.assert_close(out["context"], expected_context)
    with pytest.raises(ValueError, match="trained with arch='ldm-tiny-clip', whose text tower differs"):
        OpenCLIPTextEncoder("ldm-small-clip", pretrained=str(ckpt))
    # another image tower, the same text tower: the weights load under either name, with the same features
    same_text = OpenCLIPTextEncoder("ldm-tiny-clip-rn", pretrained=str(ckpt), layer="last").encode(captions)
    torch.testing.assert_close(same_text["context"], out["context"])


def test_image_features_are_unit_norm_and_survive_a_safe_reload(trained):
    module, ckpt, _, _ = trained
    module.eval()
    images = torch.rand(3, 3, 48, 48) * 2 - 1  # resized to the model's 32 px
    reloaded = CLIPModule.load_from_checkpoint(ckpt, weights_only=True).eval()  # e.g. for CLIP score
    with torch.no_grad():
        feats = module.image_features(images)
        torch.testing.assert_close(reloaded.image_features(images), feats)
    assert feats.shape == (3, 128)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))


def test_the_clip_stage_trains_and_validates_under_bf16_mixed(tmp_path):
    """bf16-mixed features are bf16; the zero-shot metric multiplies them with class features computed outside
    autocast (fp32), which failed at the first validation before the features were kept in fp32."""
    torch.manual_seed(0)
    module = CLIPModule(ARCH, zero_shot={"template": "a {} square", "classes": list(COLORS)},
                        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0))
    loss0, _ = evaluate(module, batch_of_all())
    module.train()
    trainer = L.Trainer(max_steps=20, accelerator="cpu", precision="bf16-mixed", logger=False,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, val_check_interval=20, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader(ColorSquares(), batch_size=len(COLORS), shuffle=True),
                val_dataloaders=DataLoader(ColorSquares(), batch_size=4))
    metrics = trainer.callback_metrics
    loss1, _ = evaluate(module, batch_of_all())
    assert loss1 < 0.8 * loss0, (loss0, loss1)
    assert 0.0 <= float(metrics["val/zero_shot_top1"]) <= 1.0 and metrics["val/zero_shot_skipped"] == 0


def test_retrieval_counts_repeated_captions_as_correct():
    img = torch.eye(4)
    txt = torch.eye(4)[[1, 0, 2, 3]]  # images 0 and 1 retrieve each other's text
    same_caption = retrieval_metrics(img, txt, ["a", "a", "b", "c"])
    assert same_caption["i2t_top1"] == 1.0 and same_caption["t2i_top1"] == 1.0
    assert same_caption["retrieval_chance"] == pytest.approx(6 / 16)
    distinct = retrieval_metrics(img, txt, ["a", "b", "c", "d"])
    assert distinct["i2t_top1"] == 0.5 and distinct["t2i_top1"] == 0.5


def test_caption_labels_need_exactly_one_class():
    classes = _zero_shot_classes({"red circle": ["red circle"], "blue circle": ["blue circle"]})
    labels = caption_labels(["a large red circle on the left", "a blue circle", "a red square",
                             "a red circle and a blue circle"], classes)
    assert labels.tolist() == [0, 1, -1, -1]


@pytest.mark.parametrize("experiment, source", [("quickstart_clip", "shapes"), ("digits_clip", "digits")])
def test_experiment_zero_shot_classes_label_every_caption_correctly(experiment, source, compose_train):
    cfg = compose_train([f"experiment={experiment}"], tiny_data=False)
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    template, classes = module.zero_shot
    from ldm.data.sources import build_source

    kwargs = {"num_samples": 200} if source == "shapes" else {}
    data = build_source(source, split="val", **kwargs)
    samples = [data[i] for i in range(0, len(data), max(1, len(data) // 100))]
    labels = caption_labels([s["caption"] for s in samples], classes)
    names = list(classes)
    for sample, label in zip(samples, labels.tolist()):
        meta = sample["meta"]
        truth = f"{meta['color']} {meta['shape']}" if source == "shapes" else names[meta["label"]]
        assert label >= 0 and names[label] == truth, sample["caption"]
    optimizers = module.configure_optimizers()
    assert optimizers["lr_scheduler"]["interval"] == "step"


# ---- scripts/plot_clip.py ------------------------------------------------------------------------------------------


class ReaderCLIP:
    """A stand-in CLIP that reads each image with the analytic shape reader: one-hot embeddings of what is drawn."""

    def __init__(self, prompts):
        self.prompts = list(prompts)

    def text_features(self, prompts):
        return torch.eye(len(self.prompts))[[self.prompts.index(p) for p in prompts]]

    def image_features(self, images):  # [B, 3, H, W] in [-1, 1]
        from ldm.data.reader import read_shape_image

        reads = [read_shape_image(((im.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype("uint8")) for im in images]
        return self.text_features([f"a {r['color']} {r['shape']}" for r in reads])


def test_zero_shot_pairs_each_image_with_its_own_label():
    from ldm.data.synthetic import ShapesSource

    script = load_script("plot_clip")
    source = ShapesSource(60, resolution=32, split="val")
    result = script.zero_shot(ReaderCLIP(source.prompts()), source, batch_size=16)
    acc = script.accuracies(result["prompts"], result["labels"], result["predictions"])
    assert acc["prompt"] > 0.95 and acc["color"] > 0.95 and acc["shape"] > 0.95  # chance: 1/18, 1/6, 1/3
    torch.testing.assert_close(result["text_similarity"], torch.eye(18))


def test_accuracies_and_confusion_by_hand():
    script = load_script("plot_clip")
    prompts = ["a red circle", "a red square", "a blue circle"]
    labels, predictions = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0])
    assert script.accuracies(prompts, labels, predictions) == {"prompt": 0.5, "color": 0.75, "shape": 0.75}
    expected = [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert script.confusion(labels, predictions, 3).tolist() == expected


def test_plot_clip_script_reads_a_trained_checkpoint(trained, tmp_path):
    _, ckpt, _, _ = trained
    acc = load_script("plot_clip").main(["--ckpt", str(ckpt), "--num-images", "24", "--out", str(tmp_path / "clip.png")])
    assert set(acc) == {"prompt", "color", "shape"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert (tmp_path / "clip.png").stat().st_size > 0
