"""Hostile shards end to end: train.py trains through every kind of bad data with the exact skip count
reported, and refuses an empty shard list or an unreadable URL at start.

(Decoding rules per image mode and per-sample skipping are unit-tested in test_datamodule.py.)
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import open_dict
from PIL import Image

from ldm.data.synthetic import ShapesSource
from tests.probes import BatchAudit
from train import train

SIZE = 32
BATCH = 4


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def hostile_shard(path: Path) -> dict[str, int]:
    """Every awkward-but-usable image and caption (kept) and every broken sample (skipped); returns counts."""
    base = ShapesSource(1, resolution=SIZE, seed=3)[0]["image"]  # RGB
    gray16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    kept = [  # (image bytes, extension, caption or None for no .txt)
        (encode(base, "PNG"), "png", "a plain rgb shape"),
        (encode(base.convert("CMYK"), "JPEG"), "jpg", "a cmyk jpeg"),
        (encode(rgba, "PNG"), "png", "an rgba png with half transparency"),
        (encode(palette, "PNG"), "png", "a palette png with a transparent index"),
        (encode(Image.fromarray(gray16), "PNG"), "png", "a 16-bit grayscale png"),
        (encode(base.convert("L"), "PNG"), "png", "an 8-bit grayscale png"),
        (encode(base.resize((7, 5)), "PNG"), "png", "smaller than the crop and not square"),
        (encode(base.resize((90, 40)), "PNG"), "png", "wide"),
        (encode(base, "PNG"), "png", None),  # no caption file
        (encode(base, "PNG"), "png", ""),  # empty caption
        (encode(base, "PNG"), "png", "   \n"),  # whitespace-only caption
        (encode(base, "PNG"), "png", "形 — forme ☺ " * 50),  # non-ASCII
        (encode(base, "PNG"), "png", "a very long caption " * 1000),  # far beyond 77 tokens
        (encode(base, "WEBP"), "webp", "a webp"),
        (encode(base.convert("LA"), "PNG"), "png", "grayscale with alpha"),
        (encode(base.convert("1"), "PNG"), "png", "a 1-bit image"),
    ]
    broken = [
        {"png": encode(base, "PNG")[:80], "txt": b"truncated png"},
        {"jpg": b"\xff\xd8\xff not really a jpeg", "txt": b"garbage jpeg"},
        {"txt": b"a caption without an image"},
        {"png": encode(base, "PNG"), "txt": b"\xff\xfe not utf-8 \xc3"},
        {"png": b"", "txt": b"zero-byte image"},
    ]
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i, (data, ext, caption) in enumerate(kept):
            record = {"__key__": f"kept{i:02d}", ext: data}
            if caption is not None:
                record["txt"] = caption.encode("utf-8")
            sink.write(record)
            if i % 3 == 1:  # broken samples between kept ones (i = 1, 4, 7, 10, 13)
                sink.write({"__key__": f"broken{i:02d}", **broken[i // 3]})
    return {"kept": len(kept), "skipped": len(broken), "empty_captions": 3}


def truncated_tar(source: Path, path: Path) -> dict[str, int]:
    """``source`` cut in the middle of its 3rd image: 2 complete samples survive.

    webdataset reports a tar cut inside a member's data twice (its member reader fails, then its shard
    reader), so the counter records 2 events for this one shard.
    """
    with tarfile.open(source) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["good0.png", "good0.txt", "good1.png"]  # image first per sample
    cut = [m for m in members if m.name.endswith(".png")][2]
    path.write_bytes(source.read_bytes()[: cut.offset_data + cut.size // 2])
    return {"kept": 2, "skipped": 2, "empty_captions": 0}


@pytest.fixture
def hostile_shards(tmp_path) -> tuple[list[str], dict[str, int]]:
    good = tmp_path / "good.tar"
    with wds.TarWriter(str(good), encoder=False) as sink:
        for i, sample in enumerate(ShapesSource(6, resolution=SIZE, seed=1)):
            sink.write({"__key__": f"good{i}", "png": encode(sample["image"], "PNG"), "txt": sample["caption"].encode()})
    (tmp_path / "not_a_tar.tar").write_bytes(b"this is not a tar archive at all" * 40)
    (tmp_path / "empty.tar").write_bytes(b"")
    counts = [hostile_shard(tmp_path / "hostile.tar"), truncated_tar(good, tmp_path / "truncated.tar"),
              {"kept": 0, "skipped": 1, "empty_captions": 0}, {"kept": 0, "skipped": 1, "empty_captions": 0},
              {"kept": 6, "skipped": 0, "empty_captions": 0}]
    shards = [tmp_path / n for n in ("hostile.tar", "truncated.tar", "not_a_tar.tar", "empty.tar", "good.tar")]
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    return [str(s) for s in shards], total


def _one_pass(cfg, shards: list[str]) -> None:
    """One epoch = one pass over the shards in order, every sample used."""
    with open_dict(cfg):
        cfg.data.update(train_shards=shards, val_shards=shards, build=None, resampled=False, shuffle_buffer=0,
                        shardshuffle=False, samples_per_epoch=None, batches_per_epoch=None, num_workers=0,
                        batch_size=BATCH, val_batch_size=BATCH, image_size=SIZE)
        cfg.trainer.update(max_steps=1000, max_epochs=1, val_check_interval=1.0, check_val_every_n_epoch=1,
                           limit_val_batches=None)
        cfg.callbacks.audit = {"_target_": "tests.probes.BatchAudit"}
        cfg.optimized_metric = None


def test_training_through_hostile_shards_counts_every_skip(compose_train, hostile_shards):
    shards, expected = hostile_shards
    assert expected["kept"] % BATCH == 0  # no partial batch is dropped, so every sample is seen
    cfg = compose_train(["experiment=quickstart_clip"], tiny_data=False)
    _one_pass(cfg, shards)
    with pytest.warns(UserWarning, match=rf"validation skipped {expected['skipped']} corrupt"):
        metrics, objects = train(cfg)
    audit = next(c for c in objects["trainer"].callbacks if isinstance(c, BatchAudit))
    assert audit.bad_batches == []
    assert audit.samples == expected["kept"]
    assert metrics["data/skipped_samples"].item() == expected["skipped"]
    assert metrics["data/empty_captions"].item() == expected["empty_captions"]
    assert metrics["data/val_skipped_samples"].item() == expected["skipped"]
    assert "形 — forme ☺" in " ".join(audit.captions)
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])


@pytest.mark.parametrize(
    "shards, message",
    [
        ([], r"train_shards \[\] matches no shard"),
        (["pipe:cat /nonexistent/shard-000000.tar"], r"cannot read pipe:cat /nonexistent/shard-000000\.tar .*exit 1"),
        (["http://127.0.0.1:9/shard-{000000..000003}.tar"], r"cannot read http://127\.0\.0\.1:9/shard-000000\.tar"),
    ],
)
def test_empty_or_unreadable_shards_are_refused_at_start(compose_train, hostile_shards, shards, message):
    cfg = compose_train(["experiment=quickstart_autoencoder"], tiny_data=False)
    _one_pass(cfg, hostile_shards[0])
    with open_dict(cfg):
        cfg.data.train_shards = shards
    with pytest.raises((FileNotFoundError, OSError), match=message):
        train(cfg)
