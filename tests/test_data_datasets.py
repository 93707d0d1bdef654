"""The Cityscapes, GTA5 and SYNTHIA readers on small fixtures written in the official layouts."""

import os
import re

import numpy as np
import pytest
from helpers_data import encode_png16
from PIL import Image

from dsp_fast.data import GTA5, SYNTHIA, Cityscapes, DatasetError
from dsp_fast.data.transforms import SOURCE_RESAMPLE
from dsp_fast.reference import RandomCrops

H, W = 6, 10
# Cityscapes label ids -> expected 19 train ids and 16 SYNTHIA ids, written out by hand.
CS_IDS = [0, 1, 7, 8, 11, 21, 22, 23, 24, 26, 27, 28, 31, 32, 33, 34, 4, 17]
CS_TO_19 = [255, 255, 0, 1, 2, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 255, 255, 5]
CS_TO_16 = [255, 255, 0, 1, 2, 8, 255, 9, 10, 12, 255, 13, 255, 14, 15, 255, 255, 5]
SYNTHIA_IDS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 17, 19, 20, 21, 22]
SYNTHIA_TO_16 = [255, 9, 2, 0, 1, 4, 8, 5, 12, 7, 10, 15, 14, 255, 6, 11, 13, 255, 3, 255]


def _label_grid(ids, shape=(H, W)) -> np.ndarray:
    """An HxW label whose pixels cycle through `ids`, so every id appears."""
    return np.resize(np.asarray(ids), shape)


def _save_rgb(path, seed=0, shape=(H, W)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)


def _save_gray(path, label):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(label, dtype=np.uint8)).save(path)


def _save_palette(path, label):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.frombytes("P", (label.shape[1], label.shape[0]), label.astype(np.uint8).tobytes())
    im.putpalette([(i * 37) % 256 for i in range(768)])  # an arbitrary palette: only the indices count
    im.save(path)


def make_cityscapes(root, split="train", cities=("aachen", "bonn"), per_city=2, label=None):
    label = _label_grid(CS_IDS) if label is None else label
    for city in cities:
        for k in reversed(range(per_city)):  # written in reverse: the reader must sort
            stem = f"{city}_{k:06d}_000019"
            _save_rgb(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", seed=k)
            _save_gray(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", label)
            _save_rgb(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_color.png", seed=k)  # must be ignored
    return str(root)


def make_gta5(root, n=3, label=None, palette=True):
    label = _label_grid(CS_IDS) if label is None else label
    for k in reversed(range(n)):
        _save_rgb(f"{root}/images/{k + 1:05d}.png", seed=k)
        (_save_palette if palette else _save_gray)(f"{root}/labels/{k + 1:05d}.png", label)
    return str(root)


def make_synthia(root, n=2, cls=None):
    cls = _label_grid(SYNTHIA_IDS).astype(np.uint16) if cls is None else cls
    os.makedirs(f"{root}/GT/LABELS", exist_ok=True)
    for k in range(n):
        _save_rgb(f"{root}/RGB/{k:07d}.png", seed=k)
        arr = np.stack([cls, cls * 50 + k, np.zeros_like(cls)], axis=-1)  # class id, instance id, unused
        with open(f"{root}/GT/LABELS/{k:07d}.png", "wb") as f:
            f.write(encode_png16(arr, np.arange(cls.shape[0]) % 5))
    return str(root)


# --- label mappings -------------------------------------------------------------------------------------------


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    ds = Cityscapes(make_cityscapes(tmp_path), "train")
    assert len(ds) == 4 and ds.num_classes == 19 and ds.name == "cityscapes"
    assert [os.path.basename(p)[:15] for p in ds.image_paths] == ["aachen_000000_0", "aachen_000001_0",
                                                                  "bonn_000000_000", "bonn_000001_000"]
    image, label = ds[2]
    assert image.dtype == np.uint8 and image.shape == (H, W, 3) and label.dtype == np.int64
    np.testing.assert_array_equal(label, _label_grid(CS_TO_19))
    assert all(p.endswith("_gtFine_labelIds.png") for p in ds.label_paths)
    np.testing.assert_array_equal(ds.read_image(2), np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8))


def test_cityscapes_16_classes_for_synthia_models(tmp_path):
    ds = Cityscapes(make_cityscapes(tmp_path), "train", num_classes=16)
    np.testing.assert_array_equal(ds.read_label(0), _label_grid(CS_TO_16))


def test_cityscapes_prefers_label_train_ids(tmp_path):
    root = make_cityscapes(tmp_path)
    train_ids = _label_grid([0, 5, 18, 255, 10])
    _save_gray(f"{root}/gtFine/train/bonn/bonn_000001_000019_gtFine_labelTrainIds.png", train_ids)
    ds = Cityscapes(root, "train")
    assert ds.label_paths[3].endswith("bonn_000001_000019_gtFine_labelTrainIds.png")
    assert ds.label_paths[2].endswith("_gtFine_labelIds.png")
    np.testing.assert_array_equal(ds.read_label(3), train_ids)  # unmapped
    np.testing.assert_array_equal(Cityscapes(root, "train", num_classes=16).read_label(3),
                                  _label_grid([0, 5, 15, 255, 9]))


def test_cityscapes_without_labels_needs_no_gtfine(tmp_path):
    root = make_cityscapes(tmp_path)
    os.rename(f"{root}/gtFine", f"{root}/gtFine_elsewhere")
    ds = Cityscapes(root, "train", labels=False)
    image, label = ds[1]
    assert label is None and image.shape == (H, W, 3) and ds.label_paths == []
    with pytest.raises(DatasetError, match="without labels"):
        ds.read_label(0)


def test_gta5_palette_and_gray_labels_map_to_train_ids(tmp_path):
    for palette in (True, False):
        ds = GTA5(make_gta5(tmp_path / f"p{palette}", palette=palette))
        assert len(ds) == 3 and ds.num_classes == 19 and ds.name == "gta5"
        assert [os.path.basename(p) for p in ds.image_paths] == ["00001.png", "00002.png", "00003.png"]
        assert [os.path.basename(p) for p in ds.label_paths] == ["00001.png", "00002.png", "00003.png"]
        image, label = ds[-1]
        assert image.shape == (H, W, 3)
        np.testing.assert_array_equal(label, _label_grid(CS_TO_19))


def test_synthia_rgb16_labels_map_to_16_ids(tmp_path):
    ds = SYNTHIA(make_synthia(tmp_path))
    assert len(ds) == 2 and ds.num_classes == 16 and ds.name == "synthia"
    image, label = ds[1]
    assert image.shape == (H, W, 3) and label.dtype == np.int64
    np.testing.assert_array_equal(label, _label_grid(SYNTHIA_TO_16))


def test_synthia_gray16_labels(tmp_path):
    root = make_synthia(tmp_path, n=1)
    Image.fromarray(_label_grid(SYNTHIA_IDS).astype(np.uint16)).save(f"{root}/GT/LABELS/0000000.png")
    np.testing.assert_array_equal(SYNTHIA(root).read_label(0), _label_grid(SYNTHIA_TO_16))


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,open_", [
    (make_cityscapes, lambda r: Cityscapes(r, "train")), (make_gta5, GTA5), (make_synthia, SYNTHIA)])
def test_missing_root(tmp_path, make, open_):
    with pytest.raises(DatasetError, match=r"nowhere.*not found"):
        open_(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("make,open_,folder", [
    (make_cityscapes, lambda r: Cityscapes(r, "train"), "gtFine/train"),
    (make_cityscapes, lambda r: Cityscapes(r, "val"), "leftImg8bit/val"),
    (make_cityscapes, lambda r: Cityscapes(r, "train"), "leftImg8bit"),
    (make_gta5, GTA5, "labels"), (make_gta5, GTA5, "images"),
    (make_synthia, SYNTHIA, "GT/LABELS"), (make_synthia, SYNTHIA, "RGB")])
def test_missing_subfolder_names_it(tmp_path, make, open_, folder):
    root = make(tmp_path)
    if os.path.isdir(os.path.join(root, folder)):
        os.rename(os.path.join(root, folder), os.path.join(root, folder) + "_moved")
    with pytest.raises(DatasetError, match=re.escape(os.path.join(root, folder)) + ": .*not found"):
        open_(root)


@pytest.mark.parametrize("make,open_,images", [
    (make_cityscapes, lambda r: Cityscapes(r, "train"), "leftImg8bit/train"),
    (make_gta5, GTA5, "images"), (make_synthia, SYNTHIA, "RGB")])
def test_empty_image_folder(tmp_path, make, open_, images):
    root = make(tmp_path)
    folder = os.path.join(root, images)
    for dirpath, _, names in os.walk(folder):
        for n in names:
            os.remove(os.path.join(dirpath, n))
    with pytest.raises(DatasetError, match=re.escape(folder) + ": no images found"):
        open_(root)


@pytest.mark.parametrize("make,open_,label", [
    (make_cityscapes, lambda r: Cityscapes(r, "train"), "gtFine/train/bonn/bonn_000001_000019_gtFine_labelIds.png"),
    (make_gta5, GTA5, "labels/00002.png"), (make_synthia, SYNTHIA, "GT/LABELS/0000001.png")])
def test_image_without_label_names_both(tmp_path, make, open_, label):
    root = make(tmp_path)
    os.remove(os.path.join(root, label))
    with pytest.raises(DatasetError, match="1 of [0-9]+ images have no label file") as e:
        open_(root)
    assert os.path.join(root, label) in str(e.value)


def test_cityscapes_label_city_folder_missing(tmp_path):
    root = make_cityscapes(tmp_path)
    os.rename(f"{root}/gtFine/train/bonn", f"{root}/gtFine/train/bonn_moved")
    with pytest.raises(DatasetError, match=r"2 of 4 images have no label file.*bonn_000000_000019_leftImg8bit"):
        Cityscapes(root, "train")


def test_unexpected_ids(tmp_path):
    # GTA5: a 16-bit label with an id beyond the 256-entry table
    root = make_gta5(tmp_path / "gta", n=1)
    bad = f"{root}/labels/00001.png"
    Image.fromarray(_label_grid([7, 300]).astype(np.uint16)).save(bad)
    with pytest.raises(DatasetError, match=re.escape(bad) + ".*300"):
        GTA5(root).read_label(0)
    # Cityscapes labelTrainIds: 19 is neither a train id nor ignore
    root = make_cityscapes(tmp_path / "cs", cities=("aachen",), per_city=1)
    bad = f"{root}/gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    _save_gray(bad, _label_grid([0, 19, 255]))
    with pytest.raises(DatasetError, match=re.escape(bad) + ".*19"):
        Cityscapes(root, "train")[0]
    # SYNTHIA: a class id beyond the table in the first channel
    root = make_synthia(tmp_path / "syn", n=1, cls=_label_grid([3, 4, 1000]).astype(np.uint16))
    with pytest.raises(DatasetError, match=r"0000000\.png.*1000"):
        SYNTHIA(root).read_label(0)


def test_colour_label_rejected(tmp_path):
    root = make_gta5(tmp_path, n=1)
    _save_rgb(f"{root}/labels/00001.png")
    with pytest.raises(DatasetError, match=r"00001\.png.*mode 'RGB'"):
        GTA5(root).read_label(0)


@pytest.mark.parametrize("which", ["image", "label"])
def test_corrupt_or_truncated_png_names_the_file(tmp_path, which):
    root = make_gta5(tmp_path, n=2)
    path = f"{root}/{'images' if which == 'image' else 'labels'}/00002.png"
    data = open(path, "rb").read()
    for blob in (data[: len(data) // 2], b"not a png at all"):
        with open(path, "wb") as f:
            f.write(blob)
        with pytest.raises(DatasetError, match=re.escape(path)):
            GTA5(root)[1]
    GTA5(root)[0]  # the other pair is unaffected


def test_image_and_label_of_different_sizes(tmp_path):
    root = make_cityscapes(tmp_path, cities=("aachen",), per_city=1)
    stem = "aachen_000000_000019"
    _save_gray(f"{root}/gtFine/train/aachen/{stem}_gtFine_labelIds.png", _label_grid(CS_IDS, (H, W + 1)))
    msg = rf"{stem}_gtFine_labelIds\.png: label is 11x6 but its image .*{stem}_leftImg8bit\.png is 10x6"
    with pytest.raises(DatasetError, match=msg):
        Cityscapes(root, "train")[0]


def test_gta5_pairs_of_different_sizes_are_read_for_resizing(tmp_path):
    """Real GTA5 has a few such pairs; the authors resize both to the base size, which aligns them."""
    root = make_gta5(tmp_path, n=1)
    _save_palette(f"{root}/labels/00001.png", _label_grid(CS_IDS, (H, W + 1)))
    image, label = GTA5(root)[0]
    assert image.shape[:2] == (H, W) and label.shape == (H, W + 1)
    crop, crop_label = RandomCrops(GTA5(root), (8, 4), (4, 4), SOURCE_RESAMPLE)[0]  # the reference's source crops
    assert crop.shape == (3, 4, 4) and crop_label.shape == (4, 4)


def test_index_out_of_range(tmp_path):
    ds = GTA5(make_gta5(tmp_path, n=2))
    with pytest.raises(IndexError):
        ds[2]
