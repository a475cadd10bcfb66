"""The benchmark scripts' shared pieces that decide whether a comparison is valid: the full-fp32 parity check, the
variants the SD-1.5 benchmark times, and the timed fits of every stage (loop_overhead.py, config_ab.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sd15_memory  # noqa: E402  (benchmarks/sd15_memory.py)
from unet_step import full_fp32  # noqa: E402  (benchmarks/unet_step.py)


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_full_fp32_turns_tf32_off_inside_and_restores_it(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with full_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32

    with pytest.raises(RuntimeError, match="inside"):
        with full_fp32():
            raise RuntimeError("inside")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("checkpointing", [True, False])
def test_sd15_variants_follow_the_checkpointing_switch(checkpointing):
    pytest.importorskip("diffusers")
    args = argparse.Namespace(diffusers=True, channels_last=False, compile=False, checkpointing=checkpointing)
    params = dict(sd15_memory.unet_params(32), context_dim=32)
    variants = sd15_memory.build_variants(params, torch.device("cpu"), args)

    expected = [("ours", False), ("ours", True), ("diffusers", False), ("diffusers", True)]
    if not checkpointing:
        expected = [v for v in expected if not v[1]]
    assert sorted((v.impl, v.checkpointing) for v in variants) == sorted(expected)
    # one set of weights: every variant trains the very same Parameters
    ours = next(v.module for v in variants if v.impl == "ours")
    theirs = next(v.module for v in variants if v.impl == "diffusers")
    assert {id(p) for p in ours.parameters()} == {id(p) for p in theirs.parameters()}


def _write_latent_shard(path: Path, samples: list[tuple[str, list[float], torch.Tensor]]) -> None:
    """A latent shard as scripts/encode_latents.py writes it (``latent_record``: posterior mean [C, h, w] in float16,
    the shape's colour and bbox in the .json)."""
    import webdataset as wds

    from ldm.data.latents import latent_record

    with wds.TarWriter(str(path)) as sink:
        for i, (colour, bbox, mean) in enumerate(samples):
            sink.write(latent_record(f"s{i:04d}", mean, torch.zeros_like(mean), f"a {colour} square",
                                     {"color": colour, "bbox": bbox}, {"encoder_sha256": "test"}, image_size=32))


def test_latent_colour_separation_measures_the_cell_under_the_shape(tmp_path):
    import latent_colour_separation as lcs  # benchmarks/latent_colour_separation.py

    samples = []
    for i in range(8):
        colour = "red" if i % 2 == 0 else "blue"
        mean = torch.zeros(2, 8, 8)
        # the shape covers pixels 8..16 -> centre pixel 12 -> latent cell 3 (f = 4); the rest of the latent is noise
        mean[:, 3, 3] = torch.tensor([1.0, 0.0]) if colour == "red" else torch.tensor([0.0, 1.0])
        mean[:, 0, 0] = torch.tensor([float(i), -float(i)])  # far from the shape: must not count
        samples.append((colour, [8.0, 8.0, 16.0, 16.0], mean))
    shard = tmp_path / "val-000000.tar"
    _write_latent_shard(shard, samples)

    std, distances = lcs.colour_distances([shard])
    all_means = torch.stack([m for _, _, m in samples])
    expected_std = all_means.std((0, 2, 3))
    assert torch.allclose(std, expected_std)
    # centres (1, 0) and (0, 1), each channel divided by its spread
    expected = float(torch.linalg.norm(torch.tensor([1.0, -1.0]) / expected_std))
    assert distances[("blue", "red")] == pytest.approx(expected, rel=1e-5)


def test_linear_colour_probe_reads_a_linear_layout_and_not_noise():
    pytest.importorskip("sklearn")
    import latent_colour_separation as lcs

    g = torch.Generator().manual_seed(0)
    colours = ["red", "green", "blue"] * 20
    direction = {"red": torch.tensor([1.0, 0.0]), "green": torch.tensor([0.0, 1.0]), "blue": torch.tensor([-1.0, -1.0])}
    linear = torch.stack([direction[c] for c in colours]) + 0.05 * torch.randn(60, 2, generator=g)  # [N, 2]
    assert lcs.linear_probe(linear, colours) == 1.0
    assert lcs.linear_probe(torch.randn(60, 2, generator=g), colours) < 0.6  # chance: 1/3


@pytest.mark.parametrize("experiment, has_sample_grid", [("quickstart_ldm", True), ("quickstart_autoencoder", False),
                                                         ("quickstart_clip", False)])
def test_timed_fits_compose_for_every_stage(experiment, has_sample_grid, tmp_path):
    """``config_ab.py`` times any stage's ``Trainer.fit``: the throughput overrides compose for each (the sample-grid
    switch only where the experiment has that callback: elsewhere it created a callback entry without a target) and
    ``build_model`` builds the model, with a seeded stand-in first stage where stage 2 has no checkpoint."""
    from loop_overhead import build_model, compose_config, throughput_overrides
    from ldm.callbacks.sample_grid import SampleGridCallback
    from ldm.utils.instantiate import instantiate_callbacks

    overrides = throughput_overrides(experiment)
    assert any("sample_grid" in o for o in overrides) == has_sample_grid
    cfg = compose_config(overrides, tmp_path)
    grids = [c for c in instantiate_callbacks(cfg.get("callbacks")) if isinstance(c, SampleGridCallback)]
    assert len(grids) == has_sample_grid and not any(grid.at_train_end for grid in grids)
    first = build_model(cfg, "quickstart_autoencoder")
    second = build_model(cfg, "quickstart_autoencoder")
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):  # the same init every time
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=key)  # (unset latent stats are NaN)
