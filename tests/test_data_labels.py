"""Label tables, class lists and the resize helpers of dsp_fast.data."""

import numpy as np
import pytest

from dsp_fast.data import (
    CITYSCAPES_CLASSES,
    IGNORE_LABEL,
    SYNTHIA13_INDICES,
    SYNTHIA16_CLASSES,
    DatasetError,
    class_names,
    resize_image,
    resize_label,
)
from dsp_fast.data.labels import (
    CITYSCAPES19_TO_SYNTHIA16,
    CITYSCAPES_ID_TO_TRAIN_ID,
    SYNTHIA_ID_TO_TRAIN_ID,
    apply_lut,
    check_train_ids,
)

# Written out independently of labels.py (cityscapesScripts' table and the DACS SYNTHIA mapping).
CS_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12, 19: 13,
                    12: 14, 11: 15}


def test_cityscapes_lut_matches_official_table_and_ignores_the_rest():
    assert CITYSCAPES_ID_TO_TRAIN_ID.shape == (256,) and CITYSCAPES_ID_TO_TRAIN_ID.dtype == np.uint8
    for raw in range(256):
        assert CITYSCAPES_ID_TO_TRAIN_ID[raw] == CS_ID_TO_TRAIN.get(raw, 255), raw


def test_synthia_lut_matches_dacs_mapping():
    for raw in range(256):
        assert SYNTHIA_ID_TO_TRAIN_ID[raw] == SYNTHIA_TO_TRAIN.get(raw, 255), raw


def test_class_lists_and_names():
    assert len(CITYSCAPES_CLASSES) == 19 and CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[18] == "bicycle"
    assert len(SYNTHIA16_CLASSES) == 16 and SYNTHIA16_CLASSES[9] == "sky" and SYNTHIA16_CLASSES[13] == "bus"
    assert [SYNTHIA16_CLASSES[i] for i in SYNTHIA13_INDICES if SYNTHIA16_CLASSES[i] in ("wall", "fence", "pole")] == []
    assert len(SYNTHIA13_INDICES) == 13
    assert class_names(19) == list(CITYSCAPES_CLASSES) and class_names(16) == list(SYNTHIA16_CLASSES)
    with pytest.raises(ValueError, match="19"):
        class_names(13)


def test_cityscapes19_to_synthia16_keeps_names_and_drops_terrain_truck_train():
    for cs_id, name in enumerate(CITYSCAPES_CLASSES):
        s16 = CITYSCAPES19_TO_SYNTHIA16[cs_id]
        if name in ("terrain", "truck", "train"):
            assert s16 == IGNORE_LABEL
        else:
            assert SYNTHIA16_CLASSES[s16] == name
    assert CITYSCAPES19_TO_SYNTHIA16[IGNORE_LABEL] == IGNORE_LABEL


def test_synthia_ids_map_to_the_same_names_as_cityscapes_ids():
    # The SYNTHIA raw id and the Cityscapes label id of one class must land on the same 16-class name.
    pairs = {3: 7, 4: 8, 2: 11, 21: 12, 5: 13, 7: 17, 15: 19, 9: 20, 6: 21, 1: 23, 10: 24, 17: 25, 8: 26, 19: 28,
             12: 32, 11: 33}
    for synthia_id, cs_id in pairs.items():
        via_cs = CITYSCAPES19_TO_SYNTHIA16[CITYSCAPES_ID_TO_TRAIN_ID[cs_id]]
        assert SYNTHIA_ID_TO_TRAIN_ID[synthia_id] == via_cs, (synthia_id, cs_id)


def test_apply_lut_rejects_ids_beyond_the_table_and_names_the_file():
    raw = np.array([[7, 26], [300, 0]], dtype=np.uint16)
    with pytest.raises(DatasetError, match=r"some/label\.png.*300"):
        apply_lut(raw, CITYSCAPES_ID_TO_TRAIN_ID, "some/label.png")
    with pytest.raises(DatasetError, match="-1"):
        apply_lut(np.array([-1, 7]), CITYSCAPES_ID_TO_TRAIN_ID)
    np.testing.assert_array_equal(apply_lut(raw[:1], CITYSCAPES_ID_TO_TRAIN_ID), [[0, 13]])


def test_check_train_ids():
    check_train_ids(np.array([[0, 18, 255]]), 19)
    with pytest.raises(DatasetError, match=r"x\.png.*\[19\]"):
        check_train_ids(np.array([[0, 19, 255]]), 19, "x.png")
    with pytest.raises(DatasetError, match="16"):
        check_train_ids(np.array([16]), 16)


@pytest.mark.parametrize("shape,size", [((17, 33), (50, 9)), ((1, 1), (7, 5)), ((40, 30), (3, 2))])
def test_resize_label_never_creates_new_ids(shape, size):
    rng = np.random.default_rng(0)
    label = rng.choice([0, 3, 12, 18, 255], size=shape).astype(np.int64)
    out = resize_label(label, size)
    assert out.shape == (size[1], size[0]) and out.dtype == np.int64
    assert set(np.unique(out)) <= set(np.unique(label))


def test_resize_label_keeps_wide_ids_and_blocks():
    label = np.repeat(np.repeat(np.array([[1000, -5], [70000, 2]], dtype=np.int64), 4, axis=0), 4, axis=1)
    out = resize_label(label, (16, 16))
    # nearest upsampling of 4x4 blocks to 8x8 blocks: exact, no blending of ids
    np.testing.assert_array_equal(out, np.repeat(np.repeat(label[::4, ::4], 8, axis=0), 8, axis=1))


def test_resize_image_bilinear_keeps_constant_images_and_shape():
    img = np.full((17, 33, 3), (10, 200, 77), dtype=np.uint8)
    out = resize_image(img, (64, 32))
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    assert np.all(out == np.array([10, 200, 77], dtype=np.uint8))
    ramp = np.tile(np.arange(0, 256, 32, dtype=np.uint8)[None, :, None], (2, 1, 3))  # 2x8 ramp
    mid = resize_image(ramp, (15, 2))[0, :, 0].astype(int)
    assert np.all(np.diff(mid) >= 0) and len(np.unique(mid)) > 8  # interpolated values between the steps


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="size"):
        resize_label(np.zeros((4, 4), np.int64), (0, 4))
    with pytest.raises(ValueError, match="integer"):
        resize_label(np.zeros((4, 4), np.float32), (2, 2))
    with pytest.raises(ValueError, match="uint8"):
        resize_image(np.zeros((4, 4, 3), np.float32), (2, 2))
