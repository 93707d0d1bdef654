"""DALI crop stream: decode (GPU for JPEG with `mixed`, CPU threads otherwise), crop and flip the planned windows.

Every random choice comes from the host plan (`plan.py`) through `external_source`: the same window and flip feed
the image and the label crop, and labels are sliced, never resampled, so they stay aligned and keep their ids. With
`roi` (the default) the decoder is given the window (`fn.decoders.image_slice`; docs/data.md, "Loaders"): the same
pixels, bit for bit, as a full decode then a slice, for less work. The file bytes are read and their headers checked
on the host in the input callback; a decoder failure (DALI's message does not know file names) is traced back to
the file by re-reading the in-flight batches with PIL.
"""

from __future__ import annotations

import collections
import os
import weakref
from collections.abc import Callable

import numpy as np
import torch

from dsp_fast.data.errors import DatasetError
from dsp_fast.data.pngio import read_label_ids, read_rgb

from . import prepared
from .plan import CropPlan

# Every live pipeline, so a forked child (a DataLoader worker of another loader) can keep them from being
# destroyed there: their destructor joins DALI threads that only exist in the parent, and would hang forever.
_LIVE: weakref.WeakSet = weakref.WeakSet()
_KEPT_IN_CHILD: list = []
os.register_at_fork(after_in_child=lambda: _KEPT_IN_CHILD.extend(_LIVE))


class _Feeder:
    """The pipeline's input callback: plans step after step and reads the planned files' bytes. Apart from
    DaliCropStream so that no cycle keeps the pipeline alive: it is freed when the stream is dropped, not by a later
    garbage collection, which could run in a forked DataLoader worker and hang joining threads the child lacks."""

    def __init__(self, ds: prepared.PreparedSet, plan_fn: Callable[[int], CropPlan], with_labels: bool,
                 start_step: int) -> None:
        self.ds, self.plan_fn, self.with_labels = ds, plan_fn, with_labels
        self.step = start_step  # the next step to plan (DALI runs ahead by its prefetch depth)
        self.in_flight: collections.deque[CropPlan] = collections.deque()

    def __call__(self) -> list[list[np.ndarray]]:
        plan = self.plan_fn(self.step)
        self.step += 1
        self.in_flight.append(plan)
        images = [prepared.read_checked(self.ds.image_path(i), self.ds.size) for i in plan.indices]
        labels = [prepared.read_checked(self.ds.label_path(i), self.ds.size, gray8=True)
                  for i in plan.indices] if self.with_labels else []
        anchors = [np.array(w, dtype=np.int32) for w in plan.windows]
        flips = [np.array(int(f), dtype=np.int32) for f in plan.flips]
        return [images, labels, anchors, flips] if self.with_labels else [images, anchors, flips]

    def culprit(self, err: Exception) -> Exception:
        """The first in-flight file PIL cannot decode, as a DatasetError; else `err` with the files listed."""
        paths = []
        for plan in self.in_flight:
            for i in plan.indices:
                paths.append((self.ds.image_path(i), read_rgb))
                if self.with_labels:
                    paths.append((self.ds.label_path(i), read_label_ids))
        for path, read in paths:
            try:
                read(path)
            except DatasetError as found:
                return found
        names = ", ".join(sorted({p for p, _ in paths}))
        return RuntimeError(f"DALI failed on a batch of these files, all of which PIL decodes: {names}: {err}")


class DaliCropStream:
    """Yields (img_NHWC uint8, label_NHW uint8 or None, plan) per step, on `device`, from one DALI pipeline."""

    def __init__(self, ds: prepared.PreparedSet, plan_fn: Callable[[int], CropPlan], crop: tuple[int, int],
                 with_labels: bool, device: torch.device, num_threads: int, start_step: int = 0,
                 prefetch: int = 2, roi: bool = True) -> None:
        """roi: decode only the planned window; False decodes the whole file and then slices it (kept so that
        `bench.data_throughput` measures both)."""
        try:
            from nvidia.dali import fn, types
            from nvidia.dali.pipeline import Pipeline
        except ImportError as e:
            raise ImportError(f"the 'dali' data backend needs NVIDIA DALI: pip install -e '.[gpu]' "
                              f"(nvidia-dali-cuda130), or use --data-backend torch ({e})") from None
        self.with_labels, self.device = with_labels, device
        self.feeder = _Feeder(ds, plan_fn, with_labels, start_step)
        batch = len(plan_fn(start_step).indices)  # every step plans the same number of crops
        gpu = device.type == "cuda"
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
        self.pipe = Pipeline(batch_size=batch, num_threads=num_threads, device_id=device_id,
                             prefetch_queue_depth=prefetch, exec_async=True, exec_pipelined=True)
        cw, ch = crop
        with self.pipe:
            names = ("images", "labels", "anchors", "flips") if with_labels else ("images", "anchors", "flips")
            dtypes = [types.UINT8] * (len(names) - 2) + [types.INT32, types.INT32]
            inputs = dict(zip(names, fn.external_source(source=self.feeder, num_outputs=len(names),
                                                        batch=True, dtype=dtypes)))
            shape = np.array([ch, cw], dtype=np.int32)  # in the plan's (y0, x0) order of the anchors

            window = {"axis_names": "HW", "normalized_anchor": False, "normalized_shape": False}

            def decode_crop_flip(data, **decoder):
                if roi:  # the same operator on both devices; with `mixed`, nvJPEG's ROI decode (not run on a GPU yet)
                    x = fn.decoders.image_slice(data, inputs["anchors"], shape, **window, **decoder)
                else:
                    x = fn.slice(fn.decoders.image(data, **decoder), inputs["anchors"], shape, **window,
                                 out_of_bounds_policy="error")
                return fn.flip(x, horizontal=inputs["flips"])

            # Size hints let the GPU decoder allocate once instead of growing its buffers over the first batches.
            hints = {"preallocate_width_hint": ds.size[0], "preallocate_height_hint": ds.size[1]} if gpu else {}
            images = decode_crop_flip(inputs["images"], device="mixed" if gpu else "cpu", output_type=types.RGB,
                                      **hints)
            outputs = [images]
            if with_labels:
                # PNG labels decode on CPU threads whatever the device; cropping first moves 512x512, not the image.
                labels = decode_crop_flip(inputs["labels"], device="cpu", output_type=types.GRAY)
                outputs.append(labels.gpu() if gpu else labels)
            self.pipe.set_outputs(*outputs)
        self.pipe.build()
        _LIVE.add(self.pipe)

    def __iter__(self) -> DaliCropStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None, CropPlan]:
        if self.pipe is None:
            raise StopIteration
        try:
            outputs = self.pipe.run()
        except (DatasetError, FileNotFoundError):
            raise  # raised by our own input callback: already names the file
        except RuntimeError as e:
            raise self.feeder.culprit(e) from e
        plan = self.feeder.in_flight.popleft()
        tensors = [self._to_torch(out) for out in outputs]
        label = tensors[1][..., 0] if self.with_labels else None  # HW1 -> HW: a view, still contiguous
        return tensors[0], label, plan

    def _to_torch(self, batch) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = batch.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)  # DALI reuses its buffers: the copy is required
        return out

    def close(self) -> None:
        """Stop the pipeline's threads now (dropping the stream does the same)."""
        self.pipe = None
