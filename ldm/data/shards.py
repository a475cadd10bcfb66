"""Write a source to WebDataset shards: ``{out_dir}/{prefix}-000000.tar, ...``.

Each sample is stored as ``{key}.png`` (or ``.jpg``), ``{key}.txt`` (UTF-8 caption) and ``{key}.json``
(caption, source name and the source's ``meta``). Shards are written to a temporary folder and moved
into ``out_dir`` only when complete, with fixed tar timestamps, so the same source gives the same
bytes and an interrupted run leaves no half-written shard behind.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import webdataset as wds
from tqdm.auto import tqdm

from ldm.data.sources import SampleError, Source, build_source

log = logging.getLogger(__name__)

IMAGE_FORMATS = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95, "subsampling": 0})}
_TAR_MTIME = 0  # fixed (and an int: a float adds a 1 KiB PAX header per file) -> reproducible archives


@dataclass
class ShardSummary:
    """What :func:`write_shards` wrote."""

    out_dir: str
    prefix: str
    num_samples: int
    num_bytes: int
    shards: list[str]
    pattern: str  # brace pattern covering all shards, e.g. ".../train-{000000..000003}.tar"
    skipped: list[str] = field(default_factory=list)  # error messages of skipped samples

    def __str__(self) -> str:
        lines = [
            f"{self.prefix}: {self.num_samples} samples in {len(self.shards)} shard(s), "
            f"{self.num_bytes / 1e6:.1f} MB -> {self.pattern}"
        ]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} unreadable sample(s), first: {self.skipped[0]}")
        return "\n".join(lines)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def brace_pattern(out_dir: str | Path, prefix: str, num_shards: int) -> str:
    """``out_dir/prefix-{000000..00000N}.tar`` (or the single file name for one shard)."""
    if num_shards < 1:
        raise ValueError("no shards were written")
    name = shard_name(prefix, 0) if num_shards == 1 else f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"
    return str(Path(out_dir) / name)


def existing_shards(out_dir: str | Path, prefix: str) -> list[Path]:
    return sorted(Path(out_dir).glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def encode_sample(sample: Mapping[str, Any], image_format: str, source_name: str) -> dict[str, Any]:
    """Source sample -> WebDataset record of bytes."""
    pil_format, options = IMAGE_FORMATS[image_format]
    buffer = io.BytesIO()
    sample["image"].convert("RGB").save(buffer, format=pil_format, **options)
    meta = {"caption": sample["caption"], "source": source_name, **sample["meta"]}
    return {
        "__key__": sample["key"],
        image_format: buffer.getvalue(),
        "txt": sample["caption"].encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def write_shards(
    source: Source,
    out_dir: str | Path,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    image_format: str = "png",
    force: bool = False,
    progress: bool = True,
    skip_errors: bool = False,
) -> ShardSummary:
    """Write every sample of ``source`` to ``out_dir/prefix-NNNNNN.tar`` shards.

    Refuses to touch existing ``prefix-*.tar`` shards unless ``force`` (which deletes them first,
    so no stale shard of a larger earlier run survives). A :class:`SampleError` from the source
    stops the run, or with ``skip_errors`` is skipped and listed in the summary.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if len(source) == 0:
        raise ValueError(f"the source for {prefix!r} has no samples; nothing to write")
    out_dir = Path(out_dir)
    old = existing_shards(out_dir, prefix)
    if old and not force:
        raise FileExistsError(
            f"{len(old)} shard(s) {prefix}-*.tar already exist in {out_dir}; refusing to overwrite. "
            "Pass --force (force=True) to replace them, or choose another --out directory."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    source_name = type(source).__name__
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f".{prefix}-", dir=out_dir) as tmp:
        pattern = str(Path(tmp) / f"{prefix}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, encoder=False, mtime=_TAR_MTIME) as sink:
            for index in tqdm(range(len(source)), desc=f"writing {prefix} shards", unit="img", disable=not progress):
                try:
                    sample = source[index]
                except SampleError as exn:
                    if not skip_errors:
                        raise
                    skipped.append(str(exn))
                    log.warning("skipped sample %d: %s", index, exn)
                    continue
                sink.write(encode_sample(sample, image_format, source_name))
        written = existing_shards(tmp, prefix)
        if skipped and len(skipped) == len(source):
            raise SampleError(f"every sample of the source failed; first error: {skipped[0]}")
        for path in old:
            path.unlink()
        shards = []
        for path in written:
            shards.append(str(shutil.move(str(path), out_dir / path.name)))
    num_samples = len(source) - len(skipped)
    summary = ShardSummary(
        out_dir=str(out_dir),
        prefix=prefix,
        num_samples=num_samples,
        num_bytes=sum(Path(s).stat().st_size for s in shards),
        shards=shards,
        pattern=brace_pattern(out_dir, prefix, len(shards)),
        skipped=skipped,
    )
    info = {k: v for k, v in summary.__dict__.items() if k != "skipped"} | {"num_skipped": len(skipped)}
    (out_dir / f"{prefix}-info.json").write_text(json.dumps(info, indent=2) + "\n")
    return summary


def split_source(spec: Mapping[str, Any], split: str) -> Source:
    """The source a build ``spec`` writes for ``split``: ``kwargs`` plus the split and its sample count."""
    kwargs = dict(spec.get("kwargs") or {}, split=split)
    if spec["splits"].get(split) is not None:
        kwargs["num_samples"] = int(spec["splits"][split])
    return build_source(spec["source"], **kwargs)


def build_embedded_shards(spec: Mapping[str, Any], out_dir: str | Path, force: bool = False) -> dict[str, ShardSummary]:
    """Write train/val shards of a source described by ``spec`` into ``out_dir``.

    ``spec`` keys: ``source`` (registry name), ``splits`` ({split: num_samples or None for the whole
    split}), optional ``kwargs`` (passed to the source constructor), ``samples_per_shard`` (1000),
    ``image_format`` ("png"). Example::

        {"source": "shapes", "splits": {"train": 20000, "val": 512},
         "kwargs": {"resolution": 32, "seed": 0}, "samples_per_shard": 2000}
    """
    unknown = set(spec) - {"source", "splits", "kwargs", "samples_per_shard", "image_format"}
    if unknown or "source" not in spec or not spec.get("splits"):
        raise ValueError(
            f"build spec needs 'source' and 'splits' (optional: kwargs, samples_per_shard, image_format); "
            f"got keys {sorted(spec)}"
        )
    summaries = {}
    for split in dict(spec["splits"]):
        summaries[split] = write_shards(
            split_source(spec, split),
            out_dir,
            prefix=split,
            samples_per_shard=int(spec.get("samples_per_shard", 1000)),
            image_format=spec.get("image_format", "png"),
            force=force,
        )
        log.info("%s", summaries[split])
    return summaries


def _stored_records(shard: Path, limit: int) -> list[tuple[str, bytes]]:
    """(key, ``.json`` bytes) of the first ``limit`` samples in ``shard``, in stored order."""
    records = []
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                records.append((member.name[: -len(".json")], tar.extractfile(member).read()))
                if len(records) == limit:
                    break
    return records


def stale_build_reason(spec: Mapping[str, Any], out_dir: str | Path, split: str, samples: int = 32) -> str | None:
    """Why the existing ``split`` shards in ``out_dir`` are not what ``spec`` writes now, or None if they are.

    Compares the first ``samples`` stored samples (key, caption and meta) with those the source ``spec`` builds, so a
    changed ``kwargs`` entry, caption grammar or code default shows up without a record of the old spec (a change
    that touches a caption with probability 0.3 goes unseen in 32 samples with probability 1e-5).
    """
    shards = existing_shards(out_dir, split)
    if not shards:
        return None
    source = split_source(spec, split)
    try:
        stored = _stored_records(shards[0], min(samples, len(source)))
    except (tarfile.TarError, OSError):
        return None  # an unreadable shard is the loader's to report (or skip and count), not a stale build
    if not stored and len(source):
        return f"{shards[0]} holds no .json member"
    for index, (key, meta) in enumerate(stored):
        try:
            expected = encode_sample(source[index], spec.get("image_format", "png"), type(source).__name__)
        except SampleError:
            return None  # a sample skipped when the shards were written shifts the order; nothing to compare
        if key != expected["__key__"]:
            return f"sample {index} is {key!r} there, {expected['__key__']!r} in the build spec"
        if meta != expected["json"]:
            old, new = json.loads(meta), json.loads(expected["json"])
            diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            return "sample {!r} differs in {}: stored {} vs now {}".format(
                key, diff, {k: old.get(k) for k in diff}, {k: new.get(k) for k in diff}
            )
    return None
