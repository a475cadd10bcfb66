"""Cached latents: scripts/encode_latents.py stores exactly what the autoencoder computes, stage 2 trains from
the cache through train.py, a cache of another autoencoder is refused, and bad cache samples are skipped."""

from __future__ import annotations

import csv
import json
import pickle
import tarfile
from pathlib import Path

import hydra
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from safetensors.torch import save as save_tensors

from ldm.data.latents import LATENTS_KEY, LatentDataModule, moments_bytes
from ldm.data.webdataset import WebDataModule, expand_shards
from ldm.models.first_stage import FirstStage
from ldm.models.latent_source import LatentSourceMismatch, encoder_fingerprint
from tests.hydra_helpers import CONFIG_DIR, compose_train_config, tiny_shards
from tests.script_loader import load_script
from train import train

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8


encode_script = load_script("encode_latents")


def autoencoder_checkpoint(path: Path, seed: int) -> str:
    """The quickstart autoencoder (configs/model/autoencoder_f4_tiny.yaml) at a seeded init, saved as train.py does."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("train", overrides=["experiment=quickstart_autoencoder"])
    torch.manual_seed(seed)
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return str(path)


def compose_encode(ckpt: str, out: Path, image_shards: tuple[str, str], *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("encode_latents", return_hydra_config=True, overrides=[
            f"ckpt={ckpt}", f"out={out}", "progress=false", "device=cpu", f"batch_size={BATCH}", *overrides])
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
        cfg.data.train_shards, cfg.data.val_shards = image_shards
        cfg.data.build = None
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def cache(tiny_data_root, tmp_path_factory) -> dict:
    """Tiny shapes32 shards (128 train / 32 val images) encoded by a seeded autoencoder."""
    root = tmp_path_factory.mktemp("latent_cache")
    image_shards = tiny_shards({"source": "shapes", "kwargs": {"resolution": 32, "seed": 0}}, tiny_data_root)
    ckpt = autoencoder_checkpoint(root / "ae.ckpt", seed=0)
    summaries = encode_script.encode(compose_encode(ckpt, root / "latents", image_shards))
    return {"ckpt": ckpt, "root": root, "image_shards": image_shards, "summaries": summaries,
            "train": summaries["train"]["pattern"], "val": summaries["val"]["pattern"]}


def read_all(datamodule) -> list[dict]:
    datamodule.setup("validate")
    return list(datamodule.val_dataloader())


def test_cache_equals_online_encoding_and_is_reproducible(cache, tmp_path):
    assert cache["summaries"]["train"]["num_samples"] == 128 and cache["summaries"]["val"]["num_samples"] == 32
    assert cache["summaries"]["train"]["latent_shape"] == [4, 8, 8]  # f=4: 32 px -> 8 x 8 x 4
    images = read_all(WebDataModule(None, cache["image_shards"][0], image_size=32, batch_size=BATCH))
    latents = read_all(LatentDataModule(None, cache["train"], batch_size=BATCH))
    first_stage = FirstStage.from_config({"ckpt_path": cache["ckpt"]})
    for image_batch, latent_batch in zip(images, latents, strict=True):
        assert latent_batch["key"] == image_batch["key"] and latent_batch["caption"] == image_batch["caption"]
        with torch.no_grad():
            posterior = first_stage.encode(image_batch["image"])
        assert latent_batch["latent_mean"].dtype == torch.float16
        torch.testing.assert_close(latent_batch["latent_mean"].float(), posterior.mean, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(latent_batch["latent_logvar"].float(), posterior.logvar, rtol=1e-3, atol=1e-3)

    with tarfile.open(cache["summaries"]["train"]["shards"][0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        meta = json.loads(tar.extractfile(member).read())
    assert meta["source"] == "ShapesSource" and "shape" in meta  # the image sample's meta is kept
    source = meta["latent_source"]
    assert source["checkpoint"] == cache["ckpt"] and len(source["checkpoint_sha256"]) == 64
    assert source["encoder_sha256"] == encoder_fingerprint(first_stage) and meta["image_size"] == 32

    again = encode_script.encode(compose_encode(cache["ckpt"], tmp_path / "again", cache["image_shards"]))
    for first, second in zip(cache["summaries"]["train"]["shards"], again["train"]["shards"], strict=True):
        assert Path(first).read_bytes() == Path(second).read_bytes()  # deterministic, byte for byte
    with pytest.raises(FileExistsError, match="force=true"):
        encode_script.encode(compose_encode(cache["ckpt"], tmp_path / "again", cache["image_shards"]))


def compose_ldm(cache: dict, out: Path, ckpt: str, *overrides: str):
    cfg = compose_train_config(
        ["experiment=quickstart_ldm", "data=shapes32_latents", "trainer.max_steps=3", "trainer.val_check_interval=3",
         "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "callbacks.sample_grid.every_n_steps=3",
         "callbacks.sample_grid.steps=2", f"data.batch_size={BATCH}", f"data.val_batch_size={BATCH}",
         *overrides], out, None)
    with open_dict(cfg):
        cfg.data.train_shards, cfg.data.val_shards = cache["train"], cache["val"]
        cfg.data.num_workers, cfg.data.samples_per_epoch = 0, 4 * BATCH
        cfg.model.first_stage_config = {"ckpt_path": ckpt}
    return cfg


def test_train_py_fits_stage_2_from_the_cache(cache, tmp_path):
    metrics, objects = train(compose_ldm(cache, tmp_path, cache["ckpt"]))
    assert objects["trainer"].global_step == 3 and (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    model = objects["model"]
    assert bool(model.latent_stats_ready)  # the autoencoder measured none: estimated from the cached moments
    with open(next(tmp_path.glob("**/metrics.csv"))) as f:
        columns = next(csv.reader(f))
    assert "perf/samples_per_sec" in columns  # TrainingStats counts latent batches
    # the stage-2 checkpoint's first stage is the cache's autoencoder: encoding from it gives the same identity
    from_ldm = encode_script.load_first_stage(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert encoder_fingerprint(from_ldm) == cache["summaries"]["train"]["latent_source"]["encoder_sha256"]


def test_the_diffusion_loss_falls_on_cached_latents(cache):
    cfg = compose_ldm(cache, Path("unused"), cache["ckpt"])
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    batch = read_all(LatentDataModule(None, cache["val"], batch_size=BATCH))[0]
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=1e-3)

    def fixed_loss() -> torch.Tensor:
        torch.manual_seed(0)  # the same posterior sample, timesteps and noise every time
        return model.diffusion_step(batch, generator=torch.Generator().manual_seed(0))["loss"]

    model.train()
    before = fixed_loss().item()
    for _ in range(8):
        optimizer.zero_grad()
        fixed_loss().backward()
        optimizer.step()
    assert fixed_loss().item() < 0.75 * before


def test_latent_stats_come_from_the_cached_moments(cache):
    model = hydra.utils.instantiate(compose_ldm(cache, Path("unused"), cache["ckpt"]).model, _convert_="all")
    assert not bool(model.latent_stats_ready)
    mean = torch.randn(16, 4, 8, 8) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1) + 5.0  # [B, C, h, w]
    batch = {"latent_mean": mean.half(), "latent_logvar": torch.full_like(mean, -30.0).half(), "caption": [""] * 16}
    z0 = model._latents_from_batch(batch)  # z = mean (std e^-15): normalised with mean's own statistics
    torch.testing.assert_close(model.latent_shift, mean.half().float().mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z0.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(z0.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-3, rtol=0)


def test_a_cache_of_another_autoencoder_is_refused_naming_both(cache, tmp_path):
    other = autoencoder_checkpoint(tmp_path / "other_ae.ckpt", seed=1)
    with pytest.raises(LatentSourceMismatch) as info:
        train(compose_ldm(cache, tmp_path, other))
    message = str(info.value)
    assert cache["ckpt"] in message and other in message and "encode_latents.py" in message
    expected = json.loads((cache["root"] / "latents" / "train-info.json").read_text())["latent_source"]
    assert expected["encoder_sha256"][:16] in message
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # refused at the first batch, nothing trained


class _Canary:
    """Unpickling this creates ``path``: a payload that must never be unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_bad_cache_samples_are_skipped_and_counted(cache, tmp_path):
    with tarfile.open(cache["summaries"]["val"]["shards"][0]) as tar:
        good = {}
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            good.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    samples = list(good.values())[:6]  # 6 good samples, then the broken ones
    template = samples[0]
    mean = torch.zeros(4, 8, 8)
    meta = json.loads(template["json"])
    meta.pop("latent_source")
    canary = tmp_path / "unpickled"
    broken = [
        {**template, "__key__": "truncated", LATENTS_KEY: template[LATENTS_KEY][:70]},
        {**template, "__key__": "nan", LATENTS_KEY: moments_bytes(mean, torch.full_like(mean, float("nan")))},
        {**template, "__key__": "no_logvar", LATENTS_KEY: save_tensors({"mean": mean.half()})},
        {**template, "__key__": "misshaped", LATENTS_KEY: moments_bytes(mean, mean[:2])},
        {k: v for k, v in {**template, "__key__": "no_payload"}.items() if k != LATENTS_KEY},
        {**template, "__key__": "anonymous", "json": json.dumps(meta).encode()},
        {**template, "__key__": "pickled", LATENTS_KEY: pickle.dumps(_Canary(canary))},
    ]
    shard = tmp_path / "val-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as sink:
        for sample in samples + broken:
            sink.write(sample)
    batches = read_all(LatentDataModule(None, str(shard), batch_size=4))
    assert [len(b["caption"]) for b in batches] == [4, 2]
    assert sum(int(b["n_skipped"]) for b in batches) == len(broken)
    assert not {s["__key__"] for s in broken} & {k for b in batches for k in b["key"]}
    assert not canary.exists()  # the pickle was refused as a corrupt payload, never run


def test_finiteness_check_catches_nan_and_infinities_but_not_large_values():
    from ldm.data.latents import _all_finite

    large = torch.full((77, 1024), 65504.0, dtype=torch.float16)  # float16's largest: a float16 sum would overflow
    assert _all_finite(torch.zeros(4, 8, 8), large, large.float() * 1e30)
    for bad in (float("nan"), float("inf"), float("-inf")):
        tensor = torch.zeros(4, 8, 8, dtype=torch.float16)
        tensor[1, 2, 3] = bad
        assert not _all_finite(torch.zeros(3), tensor)
    opposite = torch.zeros(2, dtype=torch.float16)
    opposite[0], opposite[1] = float("inf"), float("-inf")  # they sum to NaN, still caught
    assert not _all_finite(opposite)


def test_a_batch_carries_each_source_once_and_a_single_foreign_sample_is_still_refused():
    from ldm.data.latents import BatchLatents
    from ldm.data.stages import SkipCounter
    from ldm.models.latent_source import check_latent_sources

    ours, foreign = {"encoder_sha256": "a" * 64}, {"encoder_sha256": "b" * 64}
    samples = [{"key": str(i), "latent_mean": torch.zeros(4, 2, 2), "latent_logvar": torch.zeros(4, 2, 2),
                "caption": "x", "empty_caption": False, "latent_source": dict(ours if i != 5 else foreign)}
               for i in range(8)]
    batch = BatchLatents(8, SkipCounter("t"), partial=False).collate(samples)
    assert batch["latent_source"] == [ours, foreign]
    check_latent_sources(batch["latent_source"][:1], ours)
    with pytest.raises(LatentSourceMismatch):
        check_latent_sources(batch["latent_source"], ours)


def memory_and_stream_agree(pattern: str, n_samples: int) -> None:
    """The in-memory cache serves every training sample's own tensors, captions and identities as the stream does;
    each pass over it is a permutation (no sample twice), seeded, and DDP ranks split it without overlap."""
    stream = LatentDataModule(pattern, None, batch_size=BATCH, samples_per_epoch=n_samples, in_memory=False,
                              shuffle_buffer=0, resampled=False)
    stream.setup("fit")
    by_key = {key: (batch, i) for batch in stream.train_dataloader() for i, key in enumerate(batch["key"])}
    assert len(by_key) == n_samples

    def memory(seed: int, world_size: int = 1):
        dm = LatentDataModule(pattern, None, batch_size=BATCH, samples_per_epoch=n_samples, seed=seed)
        dm.trainer = type("T", (), {"world_size": world_size, "num_devices": world_size, "current_epoch": 0})()
        dm.setup("fit")
        assert dm.holds_in_memory(expand_shards(pattern))  # auto: a small local cache
        return dm

    loader = memory(seed=5).train_dataloader()
    assert loader.num_workers == 0 and len(loader) == n_samples // BATCH
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        keys = [k for b in batches for k in b["key"]]
        assert sorted(keys) == sorted(by_key)  # one pass = each sample once
    assert [b["key"] for b in epochs[0]] != [b["key"] for b in epochs[1]]
    assert [b["key"] for b in epochs[0]] == [b["key"] for b in memory(seed=5).train_dataloader()]
    assert [b["key"] for b in epochs[0]] != [b["key"] for b in memory(seed=6).train_dataloader()]
    for batch in epochs[0]:
        assert set(batch) == set(next(iter(by_key.values()))[0]) and batch["latent_mean"].dtype == torch.float16
        for i, key in enumerate(batch["key"]):
            ref, j = by_key[key]
            assert batch["caption"][i] == ref["caption"][j]
            names = [n for n in ("latent_mean", "latent_logvar", "text_context", "text_pooled") if n in batch]
            assert all(torch.equal(batch[n][i], ref[n][j]) for n in names)
        assert batch["latent_source"] == [by_key[batch["key"][0]][0]["latent_source"][0]]

    halves = []
    for rank in range(2):  # what each of two DDP ranks reads (pytorch_worker_info reads RANK / WORLD_SIZE)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RANK", str(rank)), env.setenv("WORLD_SIZE", "2")
            halves.append([k for b in memory(seed=5, world_size=2).train_dataloader() for k in b["key"]])
    assert len(halves[0]) == len(halves[1]) == n_samples // 2 and not set(halves[0]) & set(halves[1])


def test_the_in_memory_cache_serves_what_the_stream_does(cache):
    memory_and_stream_agree(cache["train"], 128)


def test_in_memory_is_auto_by_size_and_counts_skips(cache, tmp_path):
    urls = expand_shards(cache["train"])
    assert not LatentDataModule(cache["train"], None, batch_size=BATCH, samples_per_epoch=64,
                                memory_mb=0).holds_in_memory(urls)  # auto, and the cache is larger than 0 MiB
    assert not LatentDataModule(cache["train"], None, batch_size=BATCH, samples_per_epoch=64,
                                in_memory=False).holds_in_memory(urls)
    assert LatentDataModule(cache["train"], None, batch_size=BATCH, samples_per_epoch=64,
                            in_memory=True, memory_mb=0).holds_in_memory(urls)
    with pytest.raises(ValueError, match="in_memory must be"):
        LatentDataModule(cache["train"], None, batch_size=BATCH, samples_per_epoch=64, in_memory="yes")

    with tarfile.open(cache["summaries"]["val"]["shards"][0]) as tar:  # 2 undecodable samples among 32
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    shard = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as sink:
        samples: dict[str, dict] = {}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = data
        for i, sample in enumerate(samples.values()):
            if i in (3, 17):
                sample = {**sample, LATENTS_KEY: b"not safetensors"}
            sink.write(sample)
    dm = LatentDataModule(str(shard), None, batch_size=BATCH, samples_per_epoch=24)
    dm.setup("fit")
    first, second = list(dm.train_dataloader()), list(dm.train_dataloader())
    assert len(dm._table) == 30 and sum(int(b["n_skipped"]) for b in first) == 2  # reported once
    assert sum(int(b["n_skipped"]) for b in second) == 0


def test_the_in_memory_cache_refuses_loader_workers(cache):
    from torch.utils.data import DataLoader

    dm = LatentDataModule(cache["train"], None, batch_size=BATCH, samples_per_epoch=64, in_memory=True)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="without loader workers"):
        next(iter(DataLoader(dm.train_dataset, batch_size=None, num_workers=1)))
