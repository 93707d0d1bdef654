"""Readers of Cityscapes, GTA5 and SYNTHIA in their official folder layouts.

Every reader: `len(ds)`, `ds[i] -> (image uint8 HxWx3 RGB, label int64 HxW train ids, 255 = ignore)`,
`read_image(i)`, `read_label(i)`, `image_paths`, `label_paths`, `root`, `num_classes`, `name`; file lists sorted
(stable indices). Every problem is a `DatasetError` naming the path: the file list is checked when the reader is
built (missing or empty folders, images without labels), each file when it is read. An "unexpected id":
- Cityscapes `*_gtFine_labelIds.png`, GTA5 labels (8-bit L or P): ids index a 256-entry table in which every id
  outside the 19 evaluated classes is ignore (255), as in cityscapesScripts; only an id that does not fit the
  table (> 255, from a 16-bit file) is an error. Colour (RGB) label images are rejected outright. An id that is
  no Cityscapes labelId at all (34..254) is ignored too, and counted where the caller asks (`read_pair`): the
  preparation names them, one line per dataset.
- Cityscapes `*_gtFine_labelTrainIds.png`: already train ids; anything but 0..18 or 255 is an error.
- SYNTHIA GT/LABELS (16-bit, class id in the first channel): ids index a 256-entry table (raw ids 0..22 are the
  SYNTHIA classes; 23..254, ignored, are counted as above); an id > 255 is an error (it means the file is not a
  SYNTHIA class-id image).
"""

from __future__ import annotations

import os

import numpy as np

from dsp_fast.data.errors import DatasetError
from dsp_fast.data.labels import (
    CITYSCAPES19_TO_SYNTHIA16,
    CITYSCAPES_ID_TO_TRAIN_ID,
    CITYSCAPES_LABEL_IDS,
    SYNTHIA_ID_TO_TRAIN_ID,
    SYNTHIA_LABEL_IDS,
    apply_lut,
    check_train_ids,
    count_unknown_ids,
)
from dsp_fast.data.pngio import read_label_ids, read_rgb

__all__ = ["Cityscapes", "DatasetError", "GTA5", "SYNTHIA", "SegmentationDataset"]

_MAX_LISTED = 5  # missing files named in one error message


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: {what} folder not found")


def _list_pngs(folder: str, suffix: str = ".png") -> list[str]:
    """Sorted names of the files in `folder` ending with `suffix` (hidden files skipped)."""
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise DatasetError(f"{folder}: cannot list folder ({e})") from None
    return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))


def _missing_error(missing: list[tuple[str, str]], total: int) -> DatasetError:
    shown = "; ".join(f"{img} (expected {lab})" for img, lab in missing[:_MAX_LISTED])
    more = f"; and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    return DatasetError(f"{len(missing)} of {total} images have no label file: {shown}{more}")


class SegmentationDataset:
    """Shared behaviour of the readers; subclasses fill the path lists and implement `_map_label`."""

    name = "dataset"
    resizes_mismatched_pairs = False
    """True where the consumers resize image and label to the base size separately (GTA5, as the authors), so a pair
    of different sizes is aligned again there; elsewhere such a pair is an error."""

    def __init__(self, root: str, num_classes: int) -> None:
        if num_classes not in (19, 16):
            raise ValueError(f"num_classes must be 19 or 16, got {num_classes}")
        self.root = os.path.abspath(root)
        self.num_classes = num_classes
        self.image_paths: list[str] = []
        self.label_paths: list[str] = []
        if not os.path.isdir(self.root):
            raise DatasetError(f"{self.root}: {self.name} root folder not found")

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, images={len(self)}, num_classes={self.num_classes})"

    def _check_index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return i % len(self)

    def read_image(self, i: int) -> np.ndarray:
        """Image i as uint8 HxWx3 RGB."""
        return read_rgb(self.image_paths[self._check_index(i)])

    def read_label(self, i: int, unknown: dict[int, int] | None = None) -> np.ndarray:
        """Label i as int64 HxW train ids (255 = ignore). `unknown`: the raw ids no label of this format should hold
        (labels.count_unknown_ids; ignored like the ids of unevaluated classes) are added to it, id -> pixels."""
        i = self._check_index(i)
        if not self.label_paths:
            raise DatasetError(f"{self.root}: this {self.name} reader was built without labels")
        return self._map_label(self.label_paths[i], unknown).astype(np.int64)

    def _map_label(self, path: str, unknown: dict[int, int] | None = None) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.read_pair(i)

    def read_pair(self, i: int, unknown: dict[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """`ds[i]`, with the label's unknown ids added to `unknown` (read_label)."""
        i = self._check_index(i)
        image = self.read_image(i)
        if not self.label_paths:
            return image, None
        label = self.read_label(i, unknown)
        if image.shape[:2] != label.shape and not self.resizes_mismatched_pairs:
            raise DatasetError(f"{self.label_paths[i]}: label is {label.shape[1]}x{label.shape[0]} but its image "
                               f"{self.image_paths[i]} is {image.shape[1]}x{image.shape[0]} (width x height)")
        return image, label

    def _finish(self, pairs: list[tuple[str, str, bool]], where: str, labels: bool = True) -> None:
        """Keep the (image, label, label exists) pairs, after checking there are some and none lacks its label."""
        if not pairs:
            raise DatasetError(f"{where}: no images found")
        missing = [(img, lab) for img, lab, exists in pairs if not exists]
        if labels and missing:
            raise _missing_error(missing, len(pairs))
        self.image_paths = [img for img, _, _ in pairs]
        self.label_paths = [lab for _, lab, _ in pairs] if labels else []

    def _same_names(self, image_sub: str, label_sub: str, what: str) -> None:
        """Every PNG of <root>/image_sub, paired with the label of the same name in <root>/label_sub."""
        image_dir, label_dir = os.path.join(self.root, image_sub), os.path.join(self.root, label_sub)
        _require_dir(image_dir, f"{what} {image_sub}")
        _require_dir(label_dir, f"{what} {label_sub}")
        label_names = set(_list_pngs(label_dir))
        self._finish([(os.path.join(image_dir, n), os.path.join(label_dir, n), n in label_names)
                      for n in _list_pngs(image_dir)], image_dir)


class Cityscapes(SegmentationDataset):
    """Cityscapes: `leftImg8bit/<split>/<city>/*_leftImg8bit.png` + `gtFine/<split>/<city>/*_gtFine_labelIds.png`.
    A `*_gtFine_labelTrainIds.png` beside the labelIds file is preferred (already train ids, no mapping).
    num_classes=16 maps the 19 train ids on to SYNTHIA's 16 (terrain, truck, train -> ignore), to evaluate a
    SYNTHIA-trained model. labels=False (the unlabelled target): gtFine is not needed and `ds[i]` is (image, None)."""

    name = "cityscapes"

    def __init__(self, root: str, split: str = "train", num_classes: int = 19, labels: bool = True) -> None:
        super().__init__(root, num_classes)
        self.split = split
        image_dir = os.path.join(self.root, "leftImg8bit", split)
        label_dir = os.path.join(self.root, "gtFine", split)
        _require_dir(os.path.join(self.root, "leftImg8bit"), "Cityscapes leftImg8bit")
        _require_dir(image_dir, f"Cityscapes leftImg8bit/{split}")
        if labels:
            _require_dir(label_dir, f"Cityscapes gtFine/{split}")
        pairs: list[tuple[str, str, bool]] = []
        suffix = "_leftImg8bit.png"
        cities = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
        for city in (c for c in cities if not c.startswith(".")):
            city_labels = os.path.join(label_dir, city)
            label_names = set(_list_pngs(city_labels)) if labels and os.path.isdir(city_labels) else set()
            for name in _list_pngs(os.path.join(image_dir, city), suffix):
                stem = name[: -len(suffix)]
                train_ids, label_ids = f"{stem}_gtFine_labelTrainIds.png", f"{stem}_gtFine_labelIds.png"
                chosen = train_ids if train_ids in label_names else label_ids
                pairs.append((os.path.join(image_dir, city, name), os.path.join(city_labels, chosen),
                              chosen in label_names))
        self._finish(pairs, image_dir, labels)

    def _map_label(self, path: str, unknown: dict[int, int] | None = None) -> np.ndarray:
        raw = read_label_ids(path)
        if path.endswith("_labelTrainIds.png"):
            check_train_ids(raw, 19, path)
            train = raw.astype(np.uint8)
        else:
            train = apply_lut(raw, CITYSCAPES_ID_TO_TRAIN_ID, path)
            count_unknown_ids(raw, CITYSCAPES_LABEL_IDS, unknown)
        return CITYSCAPES19_TO_SYNTHIA16[train] if self.num_classes == 16 else train


class GTA5(SegmentationDataset):
    """GTA5 (Playing for Data): `images/*.png` + `labels/*.png` of the same name. Labels are palette ('P') PNGs
    whose indices are Cityscapes label ids ('L' grayscale is accepted too), mapped to the 19 train ids."""

    name = "gta5"
    # a few pairs of real GTA5 differ in size; the authors resize both straight to 1280x720 (bicubic image, nearest
    # label), which aligns them, and both trainers do the same (the reference when it reads, prepare when it converts)
    resizes_mismatched_pairs = True

    def __init__(self, root: str) -> None:
        super().__init__(root, 19)
        self._same_names("images", "labels", "GTA5")

    def _map_label(self, path: str, unknown: dict[int, int] | None = None) -> np.ndarray:
        raw = read_label_ids(path)
        train = apply_lut(raw, CITYSCAPES_ID_TO_TRAIN_ID, path)
        count_unknown_ids(raw, CITYSCAPES_LABEL_IDS, unknown)
        return train


class SYNTHIA(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES: `RGB/*.png` + `GT/LABELS/*.png` of the same name. Labels are 16-bit PNGs, usually
    3-channel (class id in the first channel, instance id in the second); 16-bit grayscale and 8-bit single- or
    multi-channel labels are read too (first channel). They map to 16 train ids."""

    name = "synthia"

    def __init__(self, root: str) -> None:
        super().__init__(root, 16)
        self._same_names("RGB", "GT/LABELS", "SYNTHIA")

    def _map_label(self, path: str, unknown: dict[int, int] | None = None) -> np.ndarray:
        raw = read_label_ids(path, allow_multichannel=True)
        train = apply_lut(raw, SYNTHIA_ID_TO_TRAIN_ID, path)
        count_unknown_ids(raw, SYNTHIA_LABEL_IDS, unknown)
        return train
