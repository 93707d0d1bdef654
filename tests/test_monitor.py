"""The training images: the image grid's layout (column captions above, a class legend below, the tiles
untouched) and what the fast trainer draws into it (the soft paste's mask), without changing the model."""

from __future__ import annotations

import numpy as np
import torch
from helpers_step import CPU, B, H, W, buffers, fast_context, make_batch, make_cfg, make_choices, to_device_choices
from PIL import Image

from dsp_fast.engine.model_setup import build_models
from dsp_fast.engine.monitor import CAPTION_H, GRID_COLUMNS, PALETTE, labelled_grid, save_image_grid


def test_image_grid_has_column_captions_and_a_class_legend():
    rng = np.random.default_rng(0)
    rows = [[rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in GRID_COLUMNS] for _ in range(2)]
    names = [f"class{i}" for i in range(19)]
    grid = np.asarray(labelled_grid(rows, names))
    assert grid.shape[1] == 6 * 32 and grid.shape[0] > CAPTION_H + 2 * 32 + 10  # caption row above, legend below
    assert np.array_equal(grid[CAPTION_H:CAPTION_H + 64], np.concatenate([np.concatenate(r, 1) for r in rows], 0))
    legend = grid[CAPTION_H + 64:].reshape(-1, 3)
    for colour in PALETTE[:19]:  # every class's swatch is drawn
        assert (legend == colour).all(1).any(), colour
    assert (grid[:CAPTION_H] < 128).any()  # caption text


def test_image_grid_shows_the_soft_paste(tmp_path):
    cfg = make_cfg()
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(gen)
    choices = make_choices(cfg, batch[3], gen)
    student, teacher = build_models(cfg, CPU)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    path = tmp_path / "grids" / "step_1.png"
    save_image_grid(str(path), fast_context(cfg, student, teacher), buffers(batch, to_device_choices(choices)))
    picture = np.array(Image.open(path))
    grid = picture[CAPTION_H:CAPTION_H + B * H]  # below the column captions, above the class legend
    assert picture.shape[1] == 6 * W and picture.shape[0] > CAPTION_H + B * H
    # one row per image: template, mask, two mixes, pseudo-label, prediction
    mask_tile = grid[:H, W:2 * W, 0]
    assert (mask_tile[5:9, 20:30] == 255).all()  # the long-tail crop's class pixels were pasted (make_choices)
    assert set(np.unique(mask_tile)) <= {0, 255}
    for k, v in student.state_dict().items():  # drawing a picture changes no weight and no BN statistic
        assert torch.equal(v, before[k]), k
