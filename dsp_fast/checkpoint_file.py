"""Checkpoint files on disk, for both trainers and `evaluate` (docs/training.md, "Run folders and resume"):
`<name>.pt` written atomically (atomic_io) and hashed on its way to disk (no second pass over a 500 MB file), then
its `<name>.pt.sha256` (the `sha256sum` format); verified by one streaming read before torch.load. A file without a
checksum (older, or a kill between the two renames) is read unverified. A failed write is one clear error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import warnings
from typing import Any, BinaryIO

import torch

from dsp_fast.atomic_io import atomic_write

CHECKSUM_SUFFIX = ".sha256"
EXIT_WRITE_FAILED = 4
"""Exit code of a run stopped because a file of the run could not be written (full disk, permissions, I/O)."""
_CHUNK = 1 << 22


class RunWriteError(RuntimeError):
    """A checkpoint (or another file of the run) could not be written; the message names the path, the reason
    and the free space. The temporary file is gone and the previous checkpoint stands. Exit code 4."""


class CorruptCheckpointError(ValueError):
    """A checkpoint whose bytes differ from the checksum recorded when it was written (torn or corrupt)."""


def _free_space(folder: str) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.1f} MiB free"


def write_error(path: str, e: BaseException) -> RunWriteError:
    """The one-line error of a failed write of `path`: its reason (errno name when there is one) and free space."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:  # a temp folder removed since: its parent
        folder = os.path.dirname(folder)
    seen: BaseException | None = e
    while seen is not None and not isinstance(seen, OSError):  # torch may wrap the writer's OSError
        seen = seen.__cause__ or seen.__context__
    e = seen or e
    code = getattr(e, "errno", None)
    if isinstance(e, OSError) and code:
        reason = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    else:  # torch's own file writer reports a short write as RuntimeError "unexpected pos"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return RunWriteError(f"could not write {path}: {reason}; {_free_space(folder)} in {folder}")


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # the disk, not the data, is at fault


def data_write_error(e: BaseException) -> RunWriteError | None:
    """A failed write of the data a run generates or prepares (full disk, quota, read-only file system) as the run's
    write error (exit code 4, naming the file and the free space); None for any other error."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS and e.filename:
        return write_error(e.filename, e)
    return None


class _HashingFile:
    """What torch.save writes through: each chunk is hashed on its way to the file, so the checksum costs no
    second read of the file."""

    def __init__(self, f: BinaryIO, sha: Any) -> None:
        self.f, self.sha = f, sha

    def write(self, data: Any) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def checksum_path(path: str) -> str:
    return path + CHECKSUM_SUFFIX


def atomic_write_text(path: str, text: str) -> str:
    """A small file of the run (summary.json, provenance.json) written atomically (atomic_io); a failed write
    leaves any earlier `path` as it was and raises RunWriteError (exit 4)."""
    try:
        return atomic_write(path, text)
    except OSError as e:
        raise write_error(path, e) from None


def atomic_torch_save(obj: Any, path: str) -> str:
    """torch.save written atomically (atomic_io), then its checksum beside it; returns the SHA-256. A failed write
    (ENOSPC, EACCES, EIO, ...) leaves any earlier `path` as it was: RunWriteError naming the path and the free space."""
    sha = hashlib.sha256()

    def save(f: BinaryIO) -> None:
        out = _HashingFile(f, sha)
        torch.save(obj, out)
        # an old checksum would contradict the new file during the rename: drop it first (a kill in between
        # leaves the new file unverified, never wrongly "corrupt")
        with contextlib.suppress(FileNotFoundError):
            os.remove(checksum_path(path))

    try:
        atomic_write(path, save)
        digest = sha.hexdigest()
        atomic_write(checksum_path(path), f"{digest}  {os.path.basename(path)}\n")
    except Exception as e:  # noqa: BLE001 - torch wraps OSError of its writer in RuntimeError; report either
        raise write_error(path, e) from None
    return digest


def recorded_checksum(path: str) -> str | None:
    """The SHA-256 written beside `path`, or None when it has none (an older checkpoint)."""
    try:
        with open(checksum_path(path)) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    m = re.match(r"\s*([0-9a-f]{64})\b", text)
    return m.group(1) if m else ""


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def verify_checkpoint_file(path: str) -> bool:
    """True: the bytes match the recorded checksum; False: no checksum recorded (unverified). A mismatch is a
    CorruptCheckpointError naming the file; a missing file, FileNotFoundError."""
    want = recorded_checksum(path)
    if want is None:
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        return False
    got = file_sha256(path)
    if got != want:
        raise CorruptCheckpointError(
            f"{path} is corrupt or truncated: its SHA-256 {got[:12]}... differs from {want[:12] or 'nothing'}... "
            f"recorded in {os.path.basename(checksum_path(path))} when it was written "
            f"({os.path.getsize(path)} bytes now)")
    return True


def read_checkpoint_file(path: str) -> Any:
    """A checkpoint verified against its checksum (when it has one), then torch.load(weights_only=True) on the CPU.
    FileNotFoundError when missing; any other failure is a ValueError naming the file, without torch's advice to
    retry with weights_only=False (running a corrupt or foreign file's pickle would be unsafe)."""
    verify_checkpoint_file(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing on a foreign file
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file; name the file whatever it was
        text = str(e)
        if "Weights only load failed" in text:
            m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
            text = m.group(1).strip() if m else "an object a weights-only load refuses"
        detail = text.splitlines()[0] if text else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint: corrupt, truncated, or not a file written by "
                         f"a dsp_fast trainer ({type(e).__name__}: {detail})") from None


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint and its checksum."""
    os.remove(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(checksum_path(path))
