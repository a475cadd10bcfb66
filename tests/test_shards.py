"""WebDataset shard writer, embedded builder and the make_shards CLI."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from braceexpand import braceexpand
from PIL import Image

from ldm.data.folder import FolderSource
from ldm.data.shards import build_embedded_shards, stale_build_reason, write_shards
from ldm.data.sources import SampleError
from ldm.data.synthetic import ShapesSource
from tests.script_loader import load_script

HOSTILE_CAPTIONS = ["un café ☕ à Zürich — 日本語のキャプション", "x" * 5000, ""]


class ListSource:
    """A few fixed samples with awkward captions."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)) for _ in HOSTILE_CAPTIONS]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"key": f"item_{i:03d}", "image": self.images[i], "caption": HOSTILE_CAPTIONS[i], "meta": {"i": i}}


def read_tar(path):
    """{key: {ext: bytes}} from a tar shard."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_round_trip_is_exact(tmp_path):
    source = ShapesSource(12, resolution=32, seed=5)
    summary = write_shards(source, tmp_path, prefix="train", samples_per_shard=5, progress=False)
    assert summary.num_samples == 12 and len(summary.shards) == 3
    assert summary.pattern == str(tmp_path / "train-{000000..000002}.tar")
    assert list(braceexpand(summary.pattern)) == summary.shards
    assert summary.num_bytes == sum(Path(s).stat().st_size for s in summary.shards)
    stored = {}
    for shard in summary.shards:
        stored.update(read_tar(shard))
    assert len(stored) == 12
    for i in range(12):
        original = source[i]
        record = stored[original["key"]]
        decoded = np.asarray(Image.open(io.BytesIO(record["png"])))
        assert np.array_equal(decoded, np.asarray(original["image"]))  # bit-identical pixels
        assert record["txt"].decode("utf-8") == original["caption"]
        meta = json.loads(record["json"])
        assert meta["caption"] == original["caption"] and meta["bbox"] == original["meta"]["bbox"]


def test_hostile_captions_round_trip(tmp_path):
    source = ListSource()
    summary = write_shards(source, tmp_path, prefix="val", progress=False)
    stored = read_tar(summary.shards[0])
    for i, caption in enumerate(HOSTILE_CAPTIONS):
        assert stored[f"item_{i:03d}"]["txt"].decode("utf-8") == caption
        assert json.loads(stored[f"item_{i:03d}"]["json"])["caption"] == caption
        pixels = np.asarray(Image.open(io.BytesIO(stored[f"item_{i:03d}"]["png"])))
        assert np.array_equal(pixels, np.asarray(source.images[i]))


def test_jpg_format(tmp_path):
    summary = write_shards(ShapesSource(3, resolution=32), tmp_path, image_format="jpg", progress=False)
    record = next(iter(read_tar(summary.shards[0]).values()))
    assert "jpg" in record and Image.open(io.BytesIO(record["jpg"])).format == "JPEG"


def test_shards_are_reproducible(tmp_path):
    for name in ("a", "b"):
        write_shards(ShapesSource(7, resolution=32, seed=2), tmp_path / name, samples_per_shard=4, progress=False)
    for shard in ("train-000000.tar", "train-000001.tar"):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_refuses_overwrite_without_force(tmp_path):
    write_shards(ShapesSource(9, resolution=32), tmp_path, samples_per_shard=3, progress=False)
    before = (tmp_path / "train-000000.tar").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        write_shards(ShapesSource(2, resolution=32, seed=1), tmp_path, samples_per_shard=3, progress=False)
    assert (tmp_path / "train-000000.tar").read_bytes() == before
    summary = write_shards(
        ShapesSource(2, resolution=32, seed=1), tmp_path, samples_per_shard=3, force=True, progress=False
    )
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar"]  # stale shards removed
    assert summary.pattern == str(tmp_path / "train-000000.tar")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder cleaned up


def test_unreadable_folder_image_stops_or_is_skipped(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i, i, i)).save(root / f"{i}.png")
    (root / "2.png").write_bytes(b"garbage")
    with pytest.raises(SampleError, match="2.png"):
        write_shards(FolderSource(root), tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.tar"))  # nothing half-written
    summary = write_shards(FolderSource(root), tmp_path / "out", progress=False, skip_errors=True)
    assert summary.num_samples == 3 and len(summary.skipped) == 1 and "2.png" in summary.skipped[0]
    assert len(read_tar(summary.shards[0])) == 3


def test_build_embedded_shards(tmp_path):
    spec = {"source": "shapes", "splits": {"train": 10, "val": 4}, "kwargs": {"resolution": 16}, "samples_per_shard": 4}
    summaries = build_embedded_shards(spec, tmp_path)
    assert summaries["train"].num_samples == 10 and len(summaries["train"].shards) == 3
    assert summaries["val"].pattern == str(tmp_path / "val-000000.tar")
    assert json.loads((tmp_path / "train-info.json").read_text())["num_samples"] == 10
    with pytest.raises(ValueError, match="splits"):
        build_embedded_shards({"source": "shapes"}, tmp_path / "x")


def test_stale_build_reason_names_the_difference_and_leaves_unreadable_shards_to_the_loader(tmp_path):
    spec = {"source": "shapes", "splits": {"train": 8}, "kwargs": {"resolution": 16}, "samples_per_shard": 8}
    build_embedded_shards(spec, tmp_path)
    assert stale_build_reason(spec, tmp_path, "train") is None
    assert stale_build_reason(spec, tmp_path, "val") is None  # no val shards: nothing stale
    reason = stale_build_reason({**spec, "kwargs": {"resolution": 16, "caption_detail": "full"}}, tmp_path, "train")
    assert reason is not None and "caption" in reason
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"not a tar archive" * 10)
    assert stale_build_reason(spec, tmp_path, "train") is None


def test_make_shards_cli(tmp_path, capsys):
    cli = load_script("make_shards")
    argv = ["--source", "shapes", "--out", str(tmp_path), "--num-train", "7", "--num-val", "3", "--resolution", "16",
            "--samples-per-shard", "3", "--no-progress"]
    summaries = cli.main(argv)
    out = capsys.readouterr().out
    assert f"data.train_shards='{tmp_path}/train-{{000000..000002}}.tar'" in out
    assert f"data.val_shards='{tmp_path}/val-000000.tar'" in out
    assert summaries["train"].num_samples == 7 and summaries["val"].num_samples == 3
    with pytest.raises(FileExistsError):
        cli.main(argv)
    with pytest.raises(SystemExit):
        cli.parse_args(["--source", "folder", "--out", str(tmp_path)])  # folder needs --root
