"""Embedded data sources (shapes, digits, photos, folder) and the analytic shapes reader."""

import re

import numpy as np
import pytest
from PIL import Image

from ldm.data.digits import DIGIT_WORDS, DigitsSource
from ldm.data.folder import FolderSource
from ldm.data.palette import BACKGROUND_COLORS, FOREGROUND_COLORS, min_foreground_background_distance
from ldm.data.photos import PHOTOS, PhotosSource
from ldm.data.reader import read_shape_image
from ldm.data.sources import SampleError, build_source
from ldm.data.synthetic import MENTION_PROBABILITY, SHAPES, ShapesSource, canonical_prompts


def pixels(sample) -> bytes:
    return np.asarray(sample["image"]).tobytes()


# ----------------------------------------------------------------------------------------- shapes
def test_shapes_deterministic_per_index_and_seed():
    a, b = ShapesSource(50, resolution=32, seed=3), ShapesSource(50, resolution=32, seed=3)
    # Same index -> identical bytes, whatever was generated before (seed per index).
    assert pixels(a[17]) == pixels(b[17]) and a[17]["caption"] == b[17]["caption"]
    for i in range(17):
        b[i]
    assert pixels(a[17]) == pixels(b[17]) and a[17]["meta"] == b[17]["meta"]
    other_seed = ShapesSource(50, resolution=32, seed=4)
    val = ShapesSource(50, resolution=32, seed=3, split="val")
    assert sum(pixels(a[i]) != pixels(other_seed[i]) for i in range(20)) >= 18
    assert sum(pixels(a[i]) != pixels(val[i]) for i in range(20)) >= 18


def test_shapes_samples_are_well_formed():
    source = ShapesSource(30, resolution=32)
    for i in range(len(source)):
        s = source[i]
        assert s["image"].mode == "RGB" and s["image"].size == (32, 32)
        assert "." not in s["key"]
        meta = s["meta"]
        assert f"{meta['color']} {meta['shape']}" in s["caption"]  # color + shape always named
        x0, y0, x1, y1 = meta["bbox"]
        assert 0 < x0 < x1 < 32 and 0 < y0 < y1 < 32
        assert (x1 - x0) >= 0.28 * 32  # smallest shape ~30% of the side
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert {"left": cx < 14, "center": 14 <= cx <= 18, "right": cx > 18}[meta["column"]]
        assert {"top": cy < 14, "middle": 14 <= cy <= 18, "bottom": cy > 18}[meta["row"]]
        border = np.concatenate([np.asarray(s["image"])[0], np.asarray(s["image"])[-1]])
        assert (border == BACKGROUND_COLORS[meta["background"]]).all()  # shape never touches the border
    with pytest.raises(IndexError):
        source[30]


def test_shapes_captions_are_varied_but_faithful():
    source = ShapesSource(400, resolution=32, seed=1, mention_probability={"position": 0.5})
    captions = [source[i]["caption"] for i in range(len(source))]
    metas = [source[i]["meta"] for i in range(len(source))]
    assert len(set(captions)) > 250
    for key in ("size", "position", "background"):
        mentioned = [m[key] in c for c, m in zip(captions, metas)]
        assert 0.3 < np.mean(mentioned) < 0.75, key  # each extra attribute sometimes, not always
    short = [c for c, m in zip(captions, metas) if c == f"a {m['color']} {m['shape']}"]
    assert short, "some captions must be the bare short prompt"


def test_mention_probability_sets_how_often_captions_name_each_detail():
    source = ShapesSource(1000, resolution=32, seed=1)  # the default: the cell in 4 captions of 5, the rest in half
    assert source.mention_probability == MENTION_PROBABILITY == {"size": 0.5, "position": 0.8, "background": 0.5}
    metas = [source.attributes(i) for i in range(len(source))]
    captions = [source[i]["caption"] for i in range(len(source))]
    rates = {k: np.mean([m[k] in c for c, m in zip(captions, metas)]) for k in ("size", "position", "background")}
    assert 0.76 < rates["position"] < 0.84 and 0.45 < rates["size"] < 0.55 and 0.45 < rates["background"] < 0.55
    always = ShapesSource(300, seed=1, mention_probability={"position": 1.0, "background": 0.0})
    always_captions = [always[i]["caption"] for i in range(len(always))]
    assert all(m["position"] in c and m["background"] not in c for c, m in zip(always_captions, metas))
    # the mention draws do not depend on the probabilities: raising one names the cell in a superset of captions
    half = ShapesSource(300, seed=1, mention_probability={"position": 0.5})
    named_at_half = [i for i in range(len(half)) if metas[i]["position"] in half[i]["caption"]]
    assert 100 < len(named_at_half) < 200 and all(metas[i]["position"] in captions[i] for i in named_at_half)
    for bad in ({"position": 1.5}, {"colour": 0.5}):
        with pytest.raises(ValueError, match="mention_probability"):
            ShapesSource(5, mention_probability=bad)


def test_full_and_short_captions_keep_their_fixed_grammar():
    full = ShapesSource(5, caption_detail="full")[0]
    m = full["meta"]
    assert full["caption"] == f"a {m['size']} {m['color']} {m['shape']} {m['position']} on a {m['background']} background"
    short_meta = ShapesSource(5)[2]["meta"]
    assert ShapesSource(5, caption_detail="short")[2]["caption"] == f"a {short_meta['color']} {short_meta['shape']}"


def test_prompts_cover_every_color_and_shape():
    prompts = ShapesSource(1).prompts()
    assert prompts == canonical_prompts()
    assert len(prompts) == len(FOREGROUND_COLORS) * len(SHAPES) == len(set(prompts))
    assert all(re.fullmatch(r"a (\w+) (circle|square|triangle)", p) for p in prompts)
    assert ShapesSource(1, shapes=("square",), colors=("red", "blue")).prompts() == ["a red square", "a blue square"]


def test_palette_foreground_never_confusable_with_background():
    assert min_foreground_background_distance() > 150


@pytest.mark.parametrize("resolution", [32, 64])
def test_reader_reads_rendered_shapes(resolution):
    source = ShapesSource(1000, resolution=resolution, seed=11)
    correct = 0
    for i in range(len(source)):
        s = source[i]
        read = read_shape_image(s["image"])
        correct += read["color"] == s["meta"]["color"] and read["shape"] == s["meta"]["shape"]
        # size, grid cell and background are read exactly from renders (6,000 checked at 32 and 64 px)
        assert {k: read[k] for k in ("size", "row", "column", "background")} == \
            {k: s["meta"][k] for k in ("size", "row", "column", "background")}
    assert correct / len(source) >= 0.99


def test_reader_input_forms_and_blank_image():
    s = ShapesSource(3, resolution=32)[0]
    arr = np.asarray(s["image"])
    expected = {"color": s["meta"]["color"], "shape": s["meta"]["shape"]}
    for form in (s["image"], arr, arr / 255.0):
        assert {k: read_shape_image(form)[k] for k in expected} == expected
    assert read_shape_image(np.zeros((32, 32, 3), np.uint8))["shape"] is None
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        read_shape_image(arr / 127.5 - 1.0)


# ----------------------------------------------------------------------------------------- digits
def test_digits_split_and_captions():
    train, val = DigitsSource(resolution=32, split="train"), DigitsSource(resolution=32, split="val")
    assert len(train) + len(val) == 1797 and len(val) == 180
    assert np.bincount(val.labels).tolist() == [18] * 10  # stratified
    s = train[42]
    assert s["image"].mode == "RGB" and s["image"].size == (32, 32)
    label = s["meta"]["label"]
    assert str(label) in s["caption"] or DIGIT_WORDS[label] in s["caption"]
    img = np.asarray(s["image"])
    assert img[0, 0].tolist() == [0, 0, 0] and img.max() > 200  # white ink on black
    assert pixels(DigitsSource(split="train")[42]) == pixels(s)
    captions = {train[i]["caption"].replace(str(train[i]["meta"]["label"]), "N") for i in range(200)}
    assert len(captions) > 10


# ----------------------------------------------------------------------------------------- photos
def test_photos_hold_out_one_photo_for_val():
    train = PhotosSource(40, crop=48, split="train", seed=0)
    val = PhotosSource(5, crop=48, split="val", seed=0)
    train_photos = {train[i]["meta"]["photo"] for i in range(len(train))}
    assert "coffee" not in train_photos and len(train_photos) >= 4
    assert {val[i]["meta"]["photo"] for i in range(len(val))} == {"coffee"}
    s = train[7]
    assert s["image"].size == (48, 48) and s["image"].mode == "RGB"
    assert s["caption"] == PHOTOS[s["meta"]["photo"]][1]
    assert pixels(PhotosSource(40, crop=48, seed=0)[7]) == pixels(s)
    assert pixels(PhotosSource(40, crop=48, seed=1)[7]) != pixels(s)
    with pytest.raises(ValueError, match="unknown photos"):
        PhotosSource(1, photos=["astronaut", "mona_lisa"])


# ----------------------------------------------------------------------------------------- folder
def make_folder(root, n=6):
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 30), (10 * i, 0, 0)).save(sub / f"img{i}.png")
        if i != 0:
            (sub / f"img{i}.txt").write_text(f"  picture {i} — café\n", encoding="utf-8")
    return root


def test_folder_source_reads_images_and_captions(tmp_path, caplog):
    root = make_folder(tmp_path / "imgs")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(root / "rgba.png")
    source = FolderSource(root)
    assert len(source) == 7 and source.num_missing_captions == 2
    assert "have no same-stem .txt caption" in caplog.text
    samples = [source[i] for i in range(len(source))]
    by_path = {s["meta"]["path"]: s for s in samples}
    assert by_path["a/img1.png"]["caption"] == "picture 1 — café"
    assert by_path["b/img0.png"]["caption"] == ""
    assert by_path["rgba.png"]["image"].mode == "RGB"
    assert FolderSource(root, resolution=20)[1]["image"].size[1] == 20  # downscaled, aspect kept


def test_folder_source_splits_and_errors(tmp_path):
    root = make_folder(tmp_path / "imgs", n=10)
    train, val = FolderSource(root, split="train", val_count=3), FolderSource(root, split="val", val_count=3)
    assert len(train) == 7 and len(val) == 3 and not set(train.files) & set(val.files)
    with pytest.raises(ValueError, match="val_count"):
        FolderSource(root, split="val")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    source = FolderSource(root)
    index = source.files.index(root / "broken.png")
    with pytest.raises(SampleError, match="broken.png"):
        source[index]
    with pytest.raises(FileNotFoundError):
        FolderSource(tmp_path / "nowhere")


def test_registry():
    assert len(build_source("shapes", num_samples=3, resolution=16)) == 3
    with pytest.raises(ValueError, match="registered sources"):
        build_source("imagenet")
