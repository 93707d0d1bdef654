"""The one error type of the data layer: bad files on disk, always named in the message."""


class DatasetError(ValueError):
    """A dataset folder or file that cannot be read as what it claims to be (missing, corrupt, unexpected ids)."""
