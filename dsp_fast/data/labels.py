"""Class lists and label lookup tables (LUTs) of Cityscapes, GTA5 and SYNTHIA.

A LUT is a 1-D uint8 array indexed by a raw id read from a label PNG; its length is the domain of ids the format
may contain. `apply_lut` rejects any id outside that domain instead of wrapping or clipping it, so a label read the
wrong way (a 16-bit instance channel, a colour image) fails loudly rather than becoming a silent wrong label.
"""

from __future__ import annotations

import numpy as np

from dsp_fast.data.errors import DatasetError

IGNORE_LABEL = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

SYNTHIA16_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle",
)

# The 13-class SYNTHIA benchmark drops wall, fence and pole (ids 3, 4, 5 of the 16).
SYNTHIA13_INDICES: tuple[int, ...] = tuple(i for i in range(16) if i not in (3, 4, 5))

# Cityscapes label id -> train id (cityscapesScripts' labels.py); every other id is ignored.
_CITYSCAPES_ID_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# SYNTHIA-RAND-CITYSCAPES raw class id -> 16 train ids (the DACS mapping); lanemarking, terrain, truck, train,
# parking-slot, road-work and void are ignored.
_SYNTHIA_ID_TO_TRAIN = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12, 19: 13, 12: 14, 11: 15,
}

# Cityscapes 19 train ids -> SYNTHIA 16 train ids, to evaluate a 16-class model on Cityscapes (terrain, truck
# and train have no SYNTHIA counterpart and are ignored).
_CS19_TO_SYNTHIA16 = {CITYSCAPES_CLASSES.index(name): i for i, name in enumerate(SYNTHIA16_CLASSES)}


def _make_lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    lut = np.full(size, IGNORE_LABEL, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    lut.setflags(write=False)
    return lut


CITYSCAPES_ID_TO_TRAIN_ID: np.ndarray = _make_lut(_CITYSCAPES_ID_TO_TRAIN)
"""256 entries: Cityscapes (and GTA5) label id -> 19 train ids, 255 elsewhere."""

SYNTHIA_ID_TO_TRAIN_ID: np.ndarray = _make_lut(_SYNTHIA_ID_TO_TRAIN)
"""256 entries: SYNTHIA raw class id -> 16 train ids, 255 elsewhere."""

CITYSCAPES19_TO_SYNTHIA16: np.ndarray = _make_lut({**_CS19_TO_SYNTHIA16, IGNORE_LABEL: IGNORE_LABEL})
"""256 entries: Cityscapes train id (0..18, 255) -> SYNTHIA 16 train id; ids 19..254 are not train ids (see
`check_train_ids`)."""


def _known(ids: range) -> np.ndarray:
    known = np.zeros(256, dtype=bool)
    known[list(ids)] = True
    known[IGNORE_LABEL] = True  # the usual "no label" value of any label format
    known.setflags(write=False)
    return known


CITYSCAPES_LABEL_IDS: np.ndarray = _known(range(34))
"""256 entries: the ids a Cityscapes labelIds (or GTA5) label may hold: cityscapesScripts' 0..33, and 255."""

SYNTHIA_LABEL_IDS: np.ndarray = _known(range(23))
"""256 entries: the ids a SYNTHIA-RAND-CITYSCAPES label may hold: its classes 0..22, and 255."""


def count_unknown_ids(raw: np.ndarray, known: np.ndarray, into: dict[int, int] | None) -> None:
    """Add to `into` (id -> pixels) the ids of `raw` (already checked to lie in 0..255) that `known` does not list:
    their table maps them to ignore like any id outside the evaluated classes, but no such label should hold them
    (a wrong file, a converter's bug), so a preparation counts and names them. None: nothing counted."""
    if into is None or raw.size == 0:
        return
    counts = np.bincount(raw.ravel(), minlength=256)[:256]
    for i in np.flatnonzero(counts * ~known).tolist():
        into[i] = into.get(i, 0) + int(counts[i])


def class_names(num_classes: int) -> list[str]:
    """Names of the model's output classes: 19 (Cityscapes / GTA5) or 16 (SYNTHIA)."""
    if num_classes == 19:
        return list(CITYSCAPES_CLASSES)
    if num_classes == 16:
        return list(SYNTHIA16_CLASSES)
    raise ValueError(f"num_classes must be 19 (GTA5/Cityscapes) or 16 (SYNTHIA), got {num_classes}")


def apply_lut(raw: np.ndarray, lut: np.ndarray, path: str = "") -> np.ndarray:
    """Map raw ids through `lut` (uint8 result); an id outside 0..len(lut)-1 raises DatasetError naming `path`."""
    if raw.size == 0:
        return np.zeros(raw.shape, dtype=lut.dtype)
    lo, hi = int(raw.min()), int(raw.max())
    if lo < 0 or hi >= len(lut):
        bad = np.unique(raw[(raw < 0) | (raw >= len(lut))])[:8].tolist()
        raise DatasetError(f"{path or 'label'}: ids {bad} outside the label table's domain 0..{len(lut) - 1}")
    # uint8 / uint16 index directly; wider or signed types are safe to index too once range-checked.
    return lut[raw]


def check_train_ids(label: np.ndarray, num_classes: int, path: str = "") -> None:
    """Raise DatasetError naming `path` unless every id is a train id (0..num_classes-1) or IGNORE_LABEL."""
    if label.size == 0:
        return
    valid = np.zeros(IGNORE_LABEL + 1, dtype=bool)
    valid[:num_classes] = True
    valid[IGNORE_LABEL] = True
    lo, hi = int(label.min()), int(label.max())
    if lo < 0 or hi > IGNORE_LABEL or not valid[label].all():
        in_range = (label >= 0) & (label <= IGNORE_LABEL)
        bad_mask = ~in_range
        bad_mask[in_range] = ~valid[label[in_range]]
        bad = np.unique(label[bad_mask])[:8].tolist()
        raise DatasetError(f"{path or 'label'}: ids {bad} are neither train ids 0..{num_classes - 1} nor "
                           f"{IGNORE_LABEL} (ignore)")


# Cityscapes colours of the 19 train ids (cityscapesScripts' labels.py); the ignore label and anything else: black.
CITYSCAPES_PALETTE: np.ndarray = np.zeros((256, 3), dtype=np.uint8)
CITYSCAPES_PALETTE[:19] = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                           (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                           (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                           (0, 80, 100), (0, 0, 230), (119, 11, 32)]
CITYSCAPES_PALETTE.setflags(write=False)


def _invert(lut: np.ndarray, fill: int) -> np.ndarray:
    """256 entries: the inverse of an injective LUT over its non-ignored values (`fill` elsewhere)."""
    inv = np.full(256, fill, dtype=np.uint8)
    for src, dst in enumerate(lut.tolist()):
        if dst != IGNORE_LABEL and src != IGNORE_LABEL:
            inv[dst] = src
    return inv


def train_id_to_cityscapes19(num_classes: int) -> np.ndarray:
    """256 entries: a model's train id -> the Cityscapes 19-class train id (the identity for 19 classes; SYNTHIA's
    16 through the inverse of CITYSCAPES19_TO_SYNTHIA16); 255 elsewhere."""
    class_names(num_classes)  # 19 or 16 only
    if num_classes == 19:
        return _make_lut({i: i for i in range(19)})
    return _invert(CITYSCAPES19_TO_SYNTHIA16, IGNORE_LABEL)


def train_id_to_label_id(num_classes: int) -> np.ndarray:
    """256 entries: a model's train id -> Cityscapes label id, the benchmark's submission format (labelIds PNGs):
    the inverse of CITYSCAPES_ID_TO_TRAIN_ID after train_id_to_cityscapes19; 0 ('unlabeled') elsewhere."""
    return _invert(CITYSCAPES_ID_TO_TRAIN_ID, 0)[train_id_to_cityscapes19(num_classes)]

