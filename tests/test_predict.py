"""python -m dsp_fast.predict on the synthetic shift (CPU): its labelIds PNGs, read back through the Cityscapes
reader's own label mapping, are the evaluator's predictions on the same checkpoint; colour PNGs, the images' own
sizes (a 2048x1024 frame, odd sizes), colour modes, batching, run folders and the errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dsp_fast import predict, train
from dsp_fast.checkpoint_file import atomic_torch_save
from dsp_fast.config import load_config
from dsp_fast.data import Cityscapes, resize_image
from dsp_fast.data.labels import CITYSCAPES_PALETTE
from dsp_fast.evaluate import checkpoint_config, load_checkpoint_model, read_checkpoint
from dsp_fast.evaluate import predict as evaluator_predict
from dsp_fast.models import build_model


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


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised tiny model saved as the fast trainer saves one (no training: the tests below check
    sizes, colour modes and errors, not what is predicted)."""
    cfg = load_config("synthetic", ["data.crop_size=[32,32]", "data.eval_size=[64,32]"])
    model = build_model(cfg.model)
    run = tmp_path_factory.mktemp("random") / "run"
    os.makedirs(run)
    path = str(run / "ckpt_00000001.pt")
    atomic_torch_save({"student": model.state_dict(), "teacher": model.state_dict(), "config": cfg.to_dict(),
                       "input_kind": "torchvision"}, path)
    return path


def test_any_size_any_colour_mode(random_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (517, 333), dtype=np.uint8)  # 333 wide, 517 high: odd sizes
    inputs = tmp_path / "in"
    os.makedirs(inputs)
    Image.fromarray(rng.integers(0, 256, (1024, 2048, 3), dtype=np.uint8)).save(inputs / "frame.png")
    Image.fromarray(np.stack([gray] * 3, -1)).save(inputs / "gray_rgb.png")
    Image.fromarray(gray).save(inputs / "gray_l.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(inputs / "gray_16.png")  # 16-bit: v * 257, high byte v
    Image.fromarray(np.dstack([gray] * 3 + [rng.integers(0, 256, gray.shape, dtype=np.uint8)])).save(
        inputs / "gray_rgba.png")  # alpha dropped, not composited
    palette = Image.fromarray(gray, "P")
    palette.putpalette([v for i in range(256) for v in (i, i, i)])  # index i shows gray level i
    palette.save(inputs / "gray_p.png")
    assert {Image.open(inputs / f"gray_{m}.png").mode for m in ("l", "16", "rgba", "p")} == {"L", "I;16", "RGBA", "P"}
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", random_checkpoint, str(inputs), "--out", str(out), "--device", "cpu",
                         "--mode", "slide", "--flip", "--no-progress"]) == 0
    assert "slide, window 32x32, stride 21x21, flip" in capsys.readouterr().out  # the crop and 2/3 of it
    frame = np.asarray(Image.open(out / "labelIds" / "frame.png"))
    assert frame.shape == (1024, 2048) and frame.dtype == np.uint8
    assert np.asarray(Image.open(out / "color" / "frame.png")).shape == (1024, 2048, 3)
    want = np.asarray(Image.open(out / "labelIds" / "gray_rgb.png"))
    assert want.shape == (517, 333)
    for mode in ("l", "16", "rgba", "p"):  # each converted to the same RGB image: the same prediction, exactly
        assert np.array_equal(np.asarray(Image.open(out / "labelIds" / f"gray_{mode}.png")), want), mode
        assert np.asarray(Image.open(out / "color" / f"gray_{mode}.png")).shape == (517, 333, 3)


def test_a_text_file_named_png_is_one_line(random_checkpoint, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    assert predict.main(["--checkpoint", random_checkpoint, str(text), "--out", str(tmp_path / "out"),
                         "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {text}: not an image file (no known image format)\n"


def test_a_run_folder_names_its_newest_good_checkpoint(random_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    os.makedirs(run / "dsp")  # a train.compare_source_only run: the adapted model in dsp/
    shutil.copy(random_checkpoint, run / "dsp" / "ckpt_00000009.pt")
    (run / "dsp" / "ckpt_00000010.pt").write_bytes(b"torn")  # newer, but unreadable: passed over
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    assert predict.main(["--checkpoint", str(run), str(image), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"checkpoint: {run / 'dsp' / 'ckpt_00000009.pt'} (the newest good one in {run})" in captured.out
    assert "ckpt_00000010.pt" in captured.err and "passed over 1 bad checkpoint" in captured.err
    os.makedirs(tmp_path / "empty")
    assert predict.main(["--checkpoint", str(tmp_path / "empty"), str(image), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint (ckpt_<step>.pt, last.pt) in this folder" in capsys.readouterr().err
