"""The exclusive lock of an output folder for the life of one run (:class:`FolderLock`)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional, Self

from fip_fast.io._errors import PathLike

#: The lock file :class:`FolderLock` keeps in a locked folder (removed on release).
LOCK_NAME = ".fip-fast.lock"


class FolderBusyError(RuntimeError):
    """Another process holds the :class:`FolderLock` of an output folder."""


class FolderLock:
    """An exclusive lock on an output folder for the life of one run: two runs into one folder would otherwise
    both pass the "is it empty?" check made at their start and the later one would silently replace the earlier
    one's results.

    ``acquire()`` creates the folder if needed and takes an exclusive, non-blocking ``flock`` on
    ``folder/.fip-fast.lock`` (the process id written inside, for the message); a second process gets a
    :class:`FolderBusyError` at once.  The kernel drops the lock when the process dies, so a killed run leaves at
    most a stale, unlocked file that the next run takes over.  ``release()`` removes the file, and the folder
    itself when ``acquire()`` created it and it is still empty.  Without ``fcntl`` (Windows) the lock file is
    created exclusively instead (a killed run's file must then be removed by hand)."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None
        self._created = False

    def acquire(self) -> Self:
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:             # no flock: an exclusively created file is the lock
            fcntl = None
        try:
            flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if fcntl is None else 0)
            fd = os.open(self.path, flags, 0o644)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, FileExistsError) as e:
            if "fd" in locals():
                os.close(fd)
            raise FolderBusyError(f"{self.folder} is being written by another fip-fast run "
                                  f"({self._holder()}); wait for it to finish or choose another folder") from e
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            return f"process {int(self.path.read_text().strip())}"
        except (OSError, ValueError):
            return f"lock file {self.path}"

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)              # closing drops the flock
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()     # only succeeds while empty: never removes anything else

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()
