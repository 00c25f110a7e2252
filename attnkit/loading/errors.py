"""The one error type of checkpoint loading: it names the file, the tensor (if any) and the reason."""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(Exception):
    """A checkpoint cannot be loaded as a whole; nothing half-loaded is ever returned.

    ``file`` is the checkpoint file (or directory), ``tensor`` the tensor at fault (``None`` when the
    problem is not about one tensor), ``reason`` a sentence saying what is wrong.
    """

    def __init__(self, file: str | Path, reason: str, tensor: str | None = None) -> None:
        self.file, self.tensor, self.reason = str(file), tensor, reason
        where = f"{self.file}" + (f", tensor {tensor!r}" if tensor is not None else "")
        super().__init__(f"{where}: {reason}")


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is well formed but uses an architecture or tensor type attnkit does not implement."""
