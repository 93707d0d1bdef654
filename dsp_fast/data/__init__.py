"""Data: dataset readers in the official layouts, label maps, resizing, the class -> images index and the
built-in synthetic domain shift. Imports nothing of dsp_fast beyond this package."""

# ruff: noqa: F401 - the imports below are the package's public names
from dsp_fast.data.class_index import load_or_build_class_index
from dsp_fast.data.datasets import GTA5, SYNTHIA, Cityscapes, SegmentationDataset
from dsp_fast.data.errors import DatasetError
from dsp_fast.data.labels import CITYSCAPES_CLASSES, IGNORE_LABEL, SYNTHIA13_INDICES, SYNTHIA16_CLASSES, class_names
from dsp_fast.data.transforms import SOURCE_RESAMPLE, resize_image, resize_label


def __getattr__(name: str) -> object:
    # Imported on first use: an eager import would make `python -m dsp_fast.data.synthetic` warn that the module
    # is already in sys.modules before it runs as __main__.
    if name == "ensure_synthetic":
        from dsp_fast.data.synthetic import ensure_synthetic

        return ensure_synthetic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
