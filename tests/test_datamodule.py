"""WebDataModule: decoding hostile data, skip counting, epochs of equal length, clear errors."""

import io
import json
import pickle
import tarfile

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from ldm.callbacks.skipped_samples import SkippedSamplesCallback
from ldm.data.shards import write_shards
from ldm.data.synthetic import ShapesSource
from ldm.data.transforms import ImageTransform, decode_image, to_rgb
from ldm.data import workers
from ldm.data.webdataset import WebDataModule

SIZE = 16


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def hostile_images() -> dict[str, Image.Image]:
    return {
        "cmyk": Image.new("CMYK", (20, 24), (0, 255, 255, 0)),
        "rgba": Image.new("RGBA", (24, 20), (255, 0, 0, 0)),
        "p": Image.new("RGB", (24, 20), (0, 0, 255)).convert("P"),
        "i16": Image.fromarray(np.full((20, 24), 65535, dtype=np.uint16)),
        "l": Image.new("L", (24, 24), 30),
        "la": Image.new("LA", (24, 24), (30, 128)),
        "tiny": Image.new("RGB", (8, 8), (0, 255, 0)),
    }


@pytest.mark.parametrize("name", list(hostile_images()))
def test_hostile_images_decode_to_unit_range(name):
    image = hostile_images()[name]
    encoded = png_bytes(image, "JPEG" if name == "cmyk" else "PNG")
    for tensor in (ImageTransform(SIZE)(image), ImageTransform(SIZE)(decode_image(encoded))):
        assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0


def test_decoding_policy():
    assert to_rgb(hostile_images()["rgba"]).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert to_rgb(hostile_images()["i16"]).getpixel((0, 0)) == (255, 255, 255)  # 16-bit full scale
    assert to_rgb(hostile_images()["cmyk"]).getpixel((0, 0)) == (255, 0, 0)
    assert torch.allclose(ImageTransform(SIZE)(hostile_images()["tiny"])[1], torch.ones(SIZE, SIZE))  # upscaled
    with pytest.raises(Exception):
        decode_image(png_bytes(hostile_images()["tiny"])[:40])  # truncated data fails loudly here


def test_random_crop_and_flip_only_when_asked():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 40, 3), dtype=np.uint8))
    center = ImageTransform(SIZE)
    assert torch.equal(center(image), center(image))
    torch.manual_seed(0)
    augmented = ImageTransform(SIZE, random_crop=True, random_flip=True)
    outputs = {augmented(image).numpy().tobytes() for _ in range(12)}
    assert len(outputs) > 3


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shards(ShapesSource(40, resolution=SIZE, seed=0), root, prefix="train", samples_per_shard=10, progress=False)
    write_shards(ShapesSource(10, resolution=SIZE, seed=0, split="val"), root, prefix="val", progress=False)
    return root


def make_dm(train=None, val=None, **kwargs):
    defaults = dict(image_size=SIZE, batch_size=4, shuffle_buffer=20, batches_per_epoch=5)
    return WebDataModule(train, val, **(defaults | kwargs))


def write_corrupt_shard(path):
    """12 good samples plus: truncated PNG, non-image bytes, no image, non-UTF-8 caption (4 skips);
    among the good ones one without caption, one empty, one non-ASCII and one very long."""
    good = ShapesSource(12, resolution=SIZE, seed=9)
    captions = {3: None, 5: "", 7: "une forme — 形 ☺", 9: "long " * 2000}
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(12):
            s = good[i]
            record = {"__key__": f"good{i:02d}", "png": png_bytes(s["image"])}
            caption = captions.get(i, s["caption"])
            if caption is not None:
                record["txt"] = caption.encode("utf-8")
            sink.write(record)
            if i == 2:
                sink.write({"__key__": "bad_truncated", "png": png_bytes(s["image"])[:60], "txt": b"x"})
            if i == 6:
                sink.write({"__key__": "bad_garbage", "jpg": b"not a jpeg at all", "txt": b"x"})
                sink.write({"__key__": "bad_noimage", "txt": b"caption without image", "json": b"{}"})
            if i == 10:
                sink.write({"__key__": "bad_caption", "png": png_bytes(s["image"]), "txt": b"\xff\xfe\xfa"})
    return {f"good{i:02d}" for i in range(12)}, captions


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(tmp_path, num_workers):
    good_keys, captions = write_corrupt_shard(tmp_path / "bad-000000.tar")
    write_shards(ShapesSource(6, resolution=SIZE), tmp_path, prefix="ok", progress=False)
    dm = make_dm(val=[str(tmp_path / "bad-000000.tar"), str(tmp_path / "ok-000000.tar")], num_workers=num_workers)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    got = {k: c for b in batches for k, c in zip(b["key"], b["caption"])}
    assert len(keys) == len(set(keys)) == 18
    assert good_keys <= set(keys) and not any(k.startswith("bad") for k in keys)
    assert sum(int(b["n_skipped"]) for b in batches) == 4
    assert sum(int(b["n_empty_caption"]) for b in batches) == 2
    assert got["good07"] == captions[7] and got["good09"] == captions[9].strip()
    assert all(b["image"].shape[1:] == (3, SIZE, SIZE) for b in batches)


def test_truncated_shard_yields_complete_samples(tmp_path, shapes_dir):
    shard = shapes_dir / "train-000000.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("shapes_train_00000006.png"))
        pngs = [m for m in tar.getmembers() if m.name.endswith(".png")]
        complete = {m.name.split(".")[0] for m in pngs if m.offset < member.offset}
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])
    dm = make_dm(val=[str(cut), str(shapes_dir / "val-000000.tar")])
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    keys = {k for b in batches for k in b["key"]}
    assert {k for k in keys if k.startswith("shapes_train")} == complete and len(complete) == 6
    assert len(keys) == 6 + 10  # the intact val shard is read completely after the broken one
    assert sum(int(b["n_skipped"]) for b in batches) >= 1


def test_validation_is_finite_deterministic_and_keeps_partial_batch(shapes_dir):
    dm = make_dm(val=str(shapes_dir / "val-000000.tar"), val_batch_size=4)
    dm.setup("validate")
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert [len(b["key"]) for b in first] == [4, 4, 2]
    assert all(torch.equal(a["image"], b["image"]) and a["key"] == b["key"] for a, b in zip(first, second))


@pytest.mark.parametrize("resampled", [True, False])
def test_equal_batches_per_epoch_with_two_workers(shapes_dir, resampled):
    shards = str(shapes_dir / "train-{000000..000003}.tar")
    dm = make_dm(train=shards, num_workers=2, batches_per_epoch=5, resampled=resampled)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 5
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 5 and all(b["image"].shape == (4, 3, SIZE, SIZE) for b in batches)


def test_pipelines_pickle_for_spawned_workers(shapes_dir):
    dm = make_dm(train=str(shapes_dir / "train-{000000..000003}.tar"), val=str(shapes_dir / "val-000000.tar"))
    dm.setup("fit")
    for dataset in (dm.train_dataset, dm.val_dataset):
        clone = pickle.loads(pickle.dumps(dataset))  # what spawn/forkserver workers (macOS default) do
        batch = next(iter(clone))
        assert batch["image"].shape == (4, 3, SIZE, SIZE)
    assert len(pickle.loads(pickle.dumps(dm.train_dataset))) == 5


def test_samples_per_epoch_sets_batches():
    dm = make_dm(train="x-{0..1}.tar", batches_per_epoch=None, samples_per_epoch=41, batch_size=4)
    assert dm.train_batches_per_epoch() == 11


def test_missing_shards_give_clear_error(tmp_path, shapes_dir):
    dm = make_dm(train=str(tmp_path / "nothing-{000000..000003}.tar"), val=str(shapes_dir / "val-000000.tar"))
    expected = r"nothing-\{000000\.\.000003\}\.tar.*matches no shard.*make_shards\.py"
    with pytest.raises(FileNotFoundError, match=expected):
        dm.setup("fit")
    dm = make_dm(train=str(shapes_dir / "train-{000000..000009}.tar"))
    with pytest.raises(FileNotFoundError, match="6 missing shard"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="batches_per_epoch"):
        WebDataModule("a.tar", None, image_size=SIZE, batch_size=2, resampled=True)


def test_prepare_data_builds_missing_embedded_shards(tmp_path):
    build = OmegaConf.create(
        {"source": "shapes", "splits": {"train": 6, "val": 3}, "kwargs": {"resolution": SIZE}, "samples_per_shard": 3}
    )
    dm = make_dm(train=str(tmp_path / "train-{000000..000001}.tar"), val=str(tmp_path / "val-000000.tar"), build=build)
    assert type(dm.hparams["build"]) is dict  # plain containers: checkpoints load with weights_only=True
    dm.prepare_data()
    dm.setup("fit")
    assert len(next(iter(dm.train_dataloader()))["key"]) == 4
    dm.prepare_data()  # shards exist now: a second call must not rebuild (or refuse to)


def test_prepare_data_refuses_shards_another_build_spec_wrote(tmp_path):
    spec = {"source": "shapes", "splits": {"train": 6, "val": 3}, "samples_per_shard": 3}
    train, val = str(tmp_path / "train-{000000..000001}.tar"), str(tmp_path / "val-000000.tar")
    old = {**spec, "kwargs": {"resolution": SIZE, "caption_detail": "short"}}
    make_dm(train=train, val=val, build=OmegaConf.create(old)).prepare_data()
    written = sorted(p.stat().st_mtime_ns for p in tmp_path.glob("*.tar"))
    new = {**spec, "kwargs": {"resolution": SIZE, "caption_detail": "full"}}
    with pytest.raises(ValueError, match=r"train shards .* not what .*caption.*Delete them"):
        make_dm(train=train, val=val, build=OmegaConf.create(new)).prepare_data()
    with pytest.raises(ValueError, match="bbox"):  # another seed draws other shapes: the meta differs too
        make_dm(train=train, val=val, build=OmegaConf.create({**old, "kwargs": {**old["kwargs"], "seed": 3}})).prepare_data()
    make_dm(train=train, val=val, build=OmegaConf.create(old)).prepare_data()  # the same spec: kept as they are
    assert sorted(p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")) == written


def test_prepare_data_refuses_shards_of_the_earlier_caption_mix(tmp_path):
    """Shards written when captions named the cell half the time are caught after the default changed."""
    spec = {"source": "shapes", "splits": {"train": 40}, "samples_per_shard": 40}
    earlier = {**spec, "kwargs": {"resolution": SIZE, "mention_probability": {"position": 0.5}}}
    train = str(tmp_path / "train-000000.tar")
    make_dm(train=train, val=None, build=OmegaConf.create(earlier)).prepare_data()
    with pytest.raises(ValueError, match="caption"):
        make_dm(train=train, val=None, build=OmegaConf.create({**spec, "kwargs": {"resolution": SIZE}})).prepare_data()


class TinyModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["image"].mean(dim=(2, 3))).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch["image"].mean(dim=(2, 3))).pow(2).mean(), batch_size=len(batch["key"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_skipped_samples_callback_sums_counts(tmp_path):
    write_corrupt_shard(tmp_path / "bad-000000.tar")
    shard = str(tmp_path / "bad-000000.tar")
    # One pass over the corrupt shard for training: 12 good samples = 3 full batches, 4 skips.
    dm = make_dm(train=shard, val=shard, resampled=False, batches_per_epoch=None, shuffle_buffer=0, shardshuffle=False)
    callback = SkippedSamplesCallback(sync_every_n_steps=2)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback],
    )
    with pytest.warns(UserWarning) as warned:
        trainer.fit(TinyModel(), datamodule=dm)
    messages = [str(w.message) for w in warned]
    assert any("data loader skipped" in m for m in messages) and any("validation skipped 4 corrupt" in m for m in messages)
    assert callback.totals["train"] == {"n_skipped": 4, "n_empty_caption": 2}
    assert trainer.callback_metrics["data/skipped_samples"].item() == 4
    assert trainer.callback_metrics["data/val_skipped_samples"].item() == 4
    assert trainer.callback_metrics["data/val_empty_captions"].item() == 2
    restored = SkippedSamplesCallback()
    restored.load_state_dict(json.loads(json.dumps(callback.state_dict())))
    assert restored.totals["train"]["n_skipped"] == 4


@pytest.mark.parametrize("cores, threads, processes, expected", [
    (2, 2, 1, 0),    # every core trains: load in the training process
    (2, 1, 1, 1),    # OMP_NUM_THREADS=1 on two cores: one idle core, one worker
    (16, 4, 2, 4),   # two processes of 4 threads leave 8 cores: 4 workers each
    (64, 1, 1, 8),   # capped
])
def test_auto_workers_on_the_cpu_use_only_cores_torch_leaves_idle(monkeypatch, cores, threads, processes, expected):
    monkeypatch.setattr(workers, "usable_cores", lambda: cores)
    monkeypatch.setattr(workers.torch, "get_num_threads", lambda: threads)
    assert workers.auto_num_workers(on_cpu=True, processes=processes) == expected


@pytest.mark.parametrize("cores, processes, expected", [(16, 1, 8), (16, 4, 3), (2, 1, 1), (8, 8, 1)])
def test_auto_workers_beside_a_gpu_use_the_spare_cores(monkeypatch, cores, processes, expected):
    monkeypatch.setattr(workers, "usable_cores", lambda: cores)
    assert workers.auto_num_workers(on_cpu=False, processes=processes) == expected


@pytest.mark.parametrize("bad", ["two", -1, True, 1.5])
def test_bad_num_workers_is_refused_naming_the_choices(bad):
    with pytest.raises(ValueError, match="integer >= 0 or 'auto'"):
        make_dm(val="v.tar", num_workers=bad)


@pytest.mark.parametrize("idle_cores, expected", [(0, 0), (1, 1)])
def test_auto_workers_resolve_for_the_trainer_the_data_is_fitted_with(monkeypatch, shapes_dir, idle_cores, expected):
    monkeypatch.setattr(workers, "usable_cores", lambda: torch.get_num_threads() + idle_cores)
    dm = make_dm(train=str(shapes_dir / "train-{000000..000003}.tar"), val=str(shapes_dir / "val-000000.tar"),
                 num_workers="auto", batches_per_epoch=3)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyModel(), datamodule=dm)
    assert trainer.global_step == 3
    assert dm.num_workers == expected
    loader = dm.train_dataloader()
    assert loader.num_workers == expected and loader.persistent_workers == (expected > 0)


def epoch_keys(dm, epochs=2):
    """The training keys of ``epochs`` epochs of a fresh loader, per epoch."""
    loader = dm.train_dataloader()
    return [[key for batch in loader for key in batch["key"]] for _ in range(epochs)]


@pytest.mark.parametrize("resampled,num_workers,persistent", [(True, 0, None), (False, 0, None), (True, 2, True),
                                                              (True, 2, False)])
def test_seeded_data_order_repeats_across_runs_and_changes_per_epoch(shapes_dir, monkeypatch, resampled, num_workers,
                                                                     persistent):
    """data.seed (or the run's seed) fixes the shard draws and shuffle buffers: two runs read the same keys in the
    same order, epochs differ, another seed differs; with workers too, persistent or not."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    shards = str(shapes_dir / "train-{000000..000003}.tar")

    def run(seed):
        dm = make_dm(train=shards, seed=seed, resampled=resampled, num_workers=num_workers,
                     persistent_workers=persistent, shardshuffle=4)
        dm.setup("fit")
        return epoch_keys(dm)

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first[0] != first[1]  # a new draw every epoch
    assert first != other
    assert len(first[0]) == 5 * 4 and len(set(first[0] + first[1])) > 10


def test_run_seed_seeds_the_data_order_and_none_leaves_it_fresh(shapes_dir, monkeypatch):
    """Without data.seed the run's seed (PL_GLOBAL_SEED, as lightning.seed_everything exports it) is used;
    with neither, each run draws its own order."""
    shards = str(shapes_dir / "train-{000000..000003}.tar")

    def run():
        dm = make_dm(train=shards)
        dm.setup("fit")
        return epoch_keys(dm, epochs=1)

    L.seed_everything(3)
    assert run() == run()
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert len({tuple(run()[0]) for _ in range(4)}) > 1


def test_loader_epoch_starts_at_the_trainers_epoch(shapes_dir, monkeypatch):
    """A resumed run (trainer.current_epoch = 3) goes on with epoch 3's order, not epoch 0's."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    shards = str(shapes_dir / "train-{000000..000003}.tar")
    dm = make_dm(train=shards, seed=1)
    dm.setup("fit")
    four = epoch_keys(dm, epochs=4)

    class Resumed:
        current_epoch, world_size, num_devices = 3, 1, 1

    dm.trainer = Resumed()
    assert epoch_keys(dm, epochs=1) == four[3:]
