"""The errors of :mod:`fip_fast.io`, and the conversion of a writer's I/O failure into an
:class:`OutputWriteError` that names the destination."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint would need full (code-executing) unpickling to load; it was refused."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, truncated, or its tensors are not valid weights for the model.

    The message names the file and says what is wrong with it."""


class OverwriteInputError(ValueError):
    """An output path is one of the inputs; writing it would destroy the data being processed."""


class OutputWriteError(OSError):
    """Writing an output file failed (a full disk, a vanished folder, a writer's own I/O error such as
    safetensors' ``SafetensorError``); the message names the file.  The destination was left as it was."""

    def __init__(self, dest: "PathLike", cause: BaseException):
        errno_ = getattr(cause, "errno", None)
        why = (getattr(cause, "strerror", None) or " ".join(str(cause).split()) or type(cause).__name__)
        super().__init__(errno_, f"could not write {dest}: {why}" + (f" (errno {errno_})" if errno_ else ""))
        self.dest, self.cause = Path(dest), cause

    def __str__(self) -> str:
        return self.strerror


def _write_failure(e: BaseException) -> bool:
    """Whether ``e`` is an I/O failure of a writer (an OSError, or safetensors' own error type)."""
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


@contextlib.contextmanager
def _naming(dest: Path) -> Iterator[None]:
    """Turn a writer's I/O failure into an :class:`OutputWriteError` naming ``dest`` (an inner one that names a
    temporary beside ``dest`` is renamed: the user knows ``dest``)."""
    try:
        yield
    except OutputWriteError as e:
        raise OutputWriteError(dest, e.cause) from e.cause
    except BaseException as e:
        if _write_failure(e):
            raise OutputWriteError(dest, e) from e
        raise
