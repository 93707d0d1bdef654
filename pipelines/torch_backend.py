"""torch crop streams over prepared data: the reference's PIL DataLoader path, and an optional GPU JPEG decode.

`torch`: DataLoader workers decode with PIL and crop the planned windows (DALI's plan: the same pixels).
`torchvision`: the workers read and check the bytes (and decode the small PNG label crops); the main process decodes
the JPEG batch on the GPU with `torchvision.io.decode_jpeg`, a GPU path without DALI. A worker's error reaches the
training process as the same exception type, naming the file.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import prepared
from .pixels import FilePixels, MemoryPixels, decode
from .plan import CropPlan


def crop_flip(x: np.ndarray, window: tuple[int, int], crop: tuple[int, int], flip: bool) -> np.ndarray:
    (y0, x0), (cw, ch) = window, crop
    x = x[y0:y0 + ch, x0:x0 + cw]
    return x[:, ::-1] if flip else x


class _CropSteps(Dataset):
    """Item `step`: the crops of that step's plan, as (images, labels or None, plan). decode_images False (the
    torchvision backend): the images are the files' checked bytes, decoded later on the GPU."""

    def __init__(self, pixels: FilePixels, plan_fn: Callable[[int], CropPlan], crop: tuple[int, int],
                 with_labels: bool, decode_images: bool) -> None:
        self.pixels, self.plan_fn, self.crop = pixels, plan_fn, crop
        self.with_labels, self.decode_images = with_labels, decode_images

    def __len__(self) -> int:
        raise TypeError("an endless stream of steps has no length")

    def __getitem__(self, step: int):
        plan = self.plan_fn(step)
        cw, ch = self.crop
        ds = self.pixels.ds
        images: list = []
        labels = np.empty((len(plan.indices), ch, cw), dtype=np.uint8) if self.with_labels else None
        for j, (i, window, flip) in enumerate(zip(plan.indices, plan.windows, plan.flips)):
            if self.decode_images:
                images.append(crop_flip(self.pixels.image(i), window, self.crop, flip))
            else:
                images.append(torch.from_numpy(prepared.read_checked(ds.image_path(i), ds.size)))
            if labels is not None:
                labels[j] = crop_flip(self.pixels.label(i), window, self.crop, flip)
        if self.decode_images:
            images = torch.from_numpy(np.stack(images))
        return images, None if labels is None else torch.from_numpy(labels), plan


def leave_stop_signals_to_the_trainer(_: int) -> None:
    """A worker ignores SIGINT and SIGTERM: a signal to the whole process group (Ctrl-C, `timeout`, a scheduler)
    would otherwise kill it and end the run without a checkpoint; the trainer answers the signal at the next step
    boundary and closes its loader, which stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchCropStream:
    """Yields (img_NHWC uint8, label_NHW uint8 or None, plan) per step on `device`, like DaliCropStream.
    num_threads: DataLoader workers (0: decode in the calling process); gpu_decode: the `torchvision` backend;
    in_memory: decode every image and label of the set now and crop from memory after (pixels.py)."""

    def __init__(self, ds: prepared.PreparedSet, plan_fn: Callable[[int], CropPlan], crop: tuple[int, int],
                 with_labels: bool, device: torch.device, num_threads: int, start_step: int = 0,
                 prefetch: int = 2, gpu_decode: bool = False, in_memory: bool = False) -> None:
        if gpu_decode:
            self._decode_jpeg = import_decode_jpeg()
            if ds.format != "jpeg":
                raise ValueError(f"{ds.root}: the torchvision backend decodes JPEG only; prepare with --format jpeg")
            if in_memory:
                raise ValueError("the torchvision backend decodes on the GPU at each step: it holds no pixels")
        self.ds, self.device, self.crop, self.gpu_decode = ds, device, crop, gpu_decode
        pixels = MemoryPixels(ds, with_labels) if in_memory else FilePixels(ds)  # before workers fork: shared
        steps = _CropSteps(pixels, plan_fn, crop, with_labels, decode_images=not gpu_decode)
        loader = DataLoader(steps, batch_size=None, sampler=itertools.count(start_step), num_workers=num_threads,
                            pin_memory=device.type == "cuda", prefetch_factor=prefetch if num_threads else None,
                            worker_init_fn=leave_stop_signals_to_the_trainer)
        self._it, self._workers = iter(loader), num_threads

    def __iter__(self) -> TorchCropStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None, CropPlan]:
        if self._it is None:
            raise StopIteration
        try:
            images, labels, plan = next(self._it)
        except Exception as e:
            if not self._workers:
                raise
            # Stop the workers now: the traceback holds the DataLoader iterator in a cycle, and its shutdown, left
            # to a later GC pass, stalls there (about 5 s). The worker's traceback is in the message already.
            self._it = None
            raise e.with_traceback(None) from None
        if self.gpu_decode:
            images = self._decode_crop(images, plan)
        else:
            images = images.to(self.device, non_blocking=True)
        if labels is not None:
            labels = labels.to(self.device, non_blocking=True)
        return images, labels, plan

    def _decode_crop(self, encoded: list[torch.Tensor], plan: CropPlan) -> torch.Tensor:
        """Batch-decode on the device, then crop and flip there: (N, H, W, 3) uint8."""
        try:
            decoded = self._decode_jpeg(encoded, device=self.device)
        except RuntimeError as e:  # the GPU decoder's message does not know file names: find the file with PIL
            for i, data in zip(plan.indices, encoded):
                decode(data.numpy(), self.ds.image_path(i), gray=False)
            raise RuntimeError(f"GPU JPEG decode failed on {[self.ds.image_path(i) for i in plan.indices]}") from e
        crops: list[torch.Tensor] = []
        for img_CHW, window, flip in zip(decoded, plan.windows, plan.flips):
            (y0, x0), (cw, ch) = window, self.crop
            c = img_CHW[:, y0:y0 + ch, x0:x0 + cw]
            crops.append(c.flip(-1) if flip else c)
        return torch.stack(crops).permute(0, 2, 3, 1)

    def close(self) -> None:
        self._it = None


def import_decode_jpeg():
    """torchvision.io.decode_jpeg, or an ImportError saying what the backend needs."""
    try:
        from torchvision.io import decode_jpeg
    except ImportError as e:
        raise ImportError(f"the 'torchvision' data backend needs torchvision with GPU JPEG decoding ({e}); "
                          "use --data-backend dali or torch") from None
    return decode_jpeg
