"""The reference's data: random crops of the original files (PIL, a DataLoader) and step 3's long-tail crops.

Image tensors are RGB floats in 0..1.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dsp_fast.data import SOURCE_RESAMPLE, resize_image, resize_label
from dsp_fast.data.windows import valid_windows


def random_window(height: int, width: int, crop_w: int, crop_h: int, gen: torch.Generator | None = None
                  ) -> tuple[int, int]:
    """Top-left corner (y0, x0) of a uniformly random crop window."""
    y0 = int(torch.randint(0, height - crop_h + 1, (1,), generator=gen))
    x0 = int(torch.randint(0, width - crop_w + 1, (1,), generator=gen))
    return y0, x0


def to_tensor(image_uint8_HWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image_uint8_HWC)).permute(2, 0, 1).float().div(255)


class RandomCrops(Dataset):
    """Resize to the domain's base size (as the authors do: bicubic for the labelled source, bilinear for
    Cityscapes), then one random crop; labels never interpolated."""

    def __init__(self, dataset, base_size: tuple[int, int], crop_size: tuple[int, int], resample: str = "bilinear"):
        self.dataset, self.base_size, self.crop_size, self.resample = dataset, base_size, crop_size, resample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        image = resize_image(image, self.base_size, self.resample)
        (cw, ch), (w, h) = self.crop_size, self.base_size
        y0, x0 = random_window(h, w, cw, ch)
        crop = to_tensor(image[y0:y0 + ch, x0:x0 + cw])
        if label is None:
            return crop
        label = resize_label(label, self.base_size)
        return crop, torch.from_numpy(label[y0:y0 + ch, x0:x0 + cw].astype(np.int64))


def forever(loader: DataLoader):
    while True:
        yield from loader


class LongTailSource:
    """Step 3's crops: a source image resized to the long-tail size (bicubic image, nearest label, as the authors'
    rand_mixer), cut by a crop-sized window that holds the class.

    'retry' is the authors' loop literally: redraw (image of the class's list, uniform window) until the window holds
    the class, at most 1000 times (None when it never does). 'counts' draws from the same distribution without the
    loop: the image in proportion to its number of windows that hold the class (counted once per class, on first
    use, from every label of the class's list), then one of those windows uniformly."""

    def __init__(self, dataset, class_index: list[list[int]], size: tuple[int, int], crop: tuple[int, int]):
        self.dataset, self.class_index, self.size, self.crop = dataset, class_index, size, crop
        self._counts: dict[int, torch.Tensor] = {}

    @functools.lru_cache(maxsize=32)  # a few recent images (the retry loop redraws them); lives as long as the run
    def resized(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.dataset[index]
        return resize_image(image, self.size, SOURCE_RESAMPLE), resize_label(label, self.size)

    def window_counts(self, cls: int) -> torch.Tensor:
        """(len(class_index[cls]),) float64: valid windows of each image of the class's list."""
        if cls not in self._counts:
            counts = [valid_windows(resize_label(self.dataset.read_label(i), self.size), cls, self.crop).sum()
                      for i in self.class_index[cls]]
            self._counts[cls] = torch.tensor(counts, dtype=torch.float64)
        return self._counts[cls]

    def draw(self, cls: int, mode: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(image 3xHxW in 0..1, label HxW) of one crop holding `cls`, or None when the class cannot be found."""
        images = self.class_index[cls]
        (cw, ch), (w, h) = self.crop, self.size
        if mode == "retry":
            for _ in range(1000):
                image, label = self.resized(images[int(torch.randint(0, len(images), (1,), generator=gen))])
                y0, x0 = random_window(h, w, cw, ch, gen)
                if (label[y0:y0 + ch, x0:x0 + cw] == cls).any():
                    break
            else:
                return None
        else:
            counts = self.window_counts(cls)
            if counts.sum() == 0:
                return None
            image, label = self.resized(images[int(torch.multinomial(counts, 1, generator=gen))])
            valid = np.flatnonzero(valid_windows(label, cls, self.crop))
            y0, x0 = divmod(int(valid[int(torch.randint(0, len(valid), (1,), generator=gen))]), w - cw + 1)
        crop_label = torch.from_numpy(label[y0:y0 + ch, x0:x0 + cw].astype(np.int64))
        return to_tensor(image[y0:y0 + ch, x0:x0 + cw]), crop_label
