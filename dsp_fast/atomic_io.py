"""The one way a file of dsp_fast is written whole or not at all: checkpoints, run files, prepared images, caches.

The content goes to `<path>.tmp.<pid>` in the same folder (a rename across file systems would not be atomic),
is fsynced (the bytes are on disk before the name points at them, so a power cut never leaves a named but empty
file; `durable=False` skips that for the many files a preparation writes before its manifest), then renamed over
`path`. A failure removes the temporary file and leaves any earlier `path` as it was; an OSError names `path`.
Cleaners of a folder's leftovers (a kill mid-write) look for the `.tmp.` infix. It imports nothing of dsp_fast, so
every layer (data, pipelines, the trainers) can use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import BinaryIO

TMP_INFIX = ".tmp."
"""What a temporary file's name adds to its target's: `<path>.tmp.<pid>`."""


def atomic_write(path: str, content: bytes | str | Callable[[BinaryIO], object], durable: bool = True) -> str:
    """Write `content` (bytes, UTF-8 text, or a callback writing to the open binary file) to `path` atomically;
    returns `path`. Errors (OSError, or the callback's) propagate after the temporary file is removed."""
    tmp = f"{path}{TMP_INFIX}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno and e.filename in (None, tmp):  # a failed write names no file: name it
            raise OSError(e.errno, e.strerror, path) from e
        raise
    return path
