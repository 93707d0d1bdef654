"""python -m dsp_fast.predict on the synthetic shift (CPU): its labelIds PNGs, read back through the Cityscapes
reader's own label mapping, are the evaluator's predictions on the same checkpoint; colour PNGs, the images' own
sizes, batching and the errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dsp_fast import predict, train
from dsp_fast.data import Cityscapes, resize_image
from dsp_fast.data.labels import CITYSCAPES_PALETTE
from dsp_fast.evaluate import checkpoint_config, load_checkpoint_model, read_checkpoint
from dsp_fast.evaluate import predict as evaluator_predict


@pytest.fixture(scope="module")
def checkpoint(synthetic_root, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("predict") / "run")
    assert train.main(["--config", "synthetic", f"data.synthetic_root={synthetic_root}", f"train.out_dir={out}",
                       "train.max_steps=3", "data.crop_size=[32,32]", "data.eval_size=[128,64]",
                       "data.max_eval_images=2", "train.compare_source_only=false", "train.log_every=0",
                       "--image-every", "0", "--no-tensorboard"]) == 0
    return os.path.join(out, "ckpt_00000003.pt")


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_label_ids_are_the_evaluators_predictions(checkpoint, synthetic_root, tmp_path, which):
    dataset = Cityscapes(os.path.join(synthetic_root, "cityscapes"), "val")
    val = tmp_path / "leftImg8bit" / "val"  # a split folder of 4 images, city folder and names kept
    for path in dataset.image_paths[:4]:
        os.makedirs(val / os.path.basename(os.path.dirname(path)), exist_ok=True)
        shutil.copy(path, val / os.path.basename(os.path.dirname(path)) / os.path.basename(path))
    out = tmp_path / "pred"
    assert predict.main(["--checkpoint", checkpoint, str(val), "--out", str(out), "--model", which, "--device",
                         "cpu", "--size", "eval", "--batch-size", "1", "--no-progress"]) == 0
    ckpt = read_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, None, [])
    model = load_checkpoint_model(cfg, ckpt, checkpoint, which, torch.device("cpu")).eval()
    reader = Cityscapes.__new__(Cityscapes)  # the reader's own labelIds -> train id mapping, on our files
    reader.num_classes = 19
    for image_path in dataset.image_paths[:4]:
        name = os.path.join(os.path.basename(os.path.dirname(image_path)), os.path.basename(image_path))
        written = str(out / "labelIds" / name)
        got = reader._map_label(written)
        want = evaluator_predict(model, resize_image(np.asarray(Image.open(image_path).convert("RGB")),
                                                     cfg.data.eval_size), torch.device("cpu")).numpy()
        assert got.shape == want.shape and (got == want).all(), name
        colour = np.asarray(Image.open(out / "color" / name))
        assert (colour == CITYSCAPES_PALETTE[want]).all()


def test_batches_and_sizes_and_errors(checkpoint, synthetic_root, tmp_path, capsys):
    val = os.path.join(synthetic_root, "cityscapes", "leftImg8bit", "val")
    city = sorted(os.listdir(val))[0]
    images = [os.path.join(val, city, n) for n in sorted(os.listdir(os.path.join(val, city)))[:3]]
    one, batched = tmp_path / "one", tmp_path / "batched"
    for out, size in ((one, "1"), (batched, "3")):
        assert predict.main(["--checkpoint", checkpoint, *images, "--out", str(out), "--device", "cpu",
                             "--batch-size", size]) == 0
    assert "3 images segmented by the student" in capsys.readouterr().out
    for path in images:
        name = os.path.basename(path)
        a = np.asarray(Image.open(one / "labelIds" / name))
        b = np.asarray(Image.open(batched / "labelIds" / name))
        assert a.shape == np.asarray(Image.open(path)).shape[:2]  # the image's own size by default
        assert (a == b).mean() > 0.999  # a batch of 3 and 3 of 1: the same up to float ties
        assert set(np.unique(a).tolist()) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
    assert predict.main(["--checkpoint", checkpoint, str(tmp_path / "nope.png"), "--out", str(tmp_path / "x")]) == 2
    assert "nope.png: no such image file or folder" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(open(images[0], "rb").read()[:200])
    assert predict.main(["--checkpoint", checkpoint, str(bad), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert f"{bad}: corrupt or truncated image" in capsys.readouterr().err
