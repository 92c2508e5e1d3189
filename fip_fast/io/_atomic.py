"""Atomic writes: a temporary beside the destination, fsync'ed, then ``os.replace``-d onto it
(:func:`atomic_path`, :class:`StagedOutputs` for several files replaced together), and the check that an output is
never one of the inputs (:func:`check_not_input`)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, List, Optional, Self

from fip_fast.io._errors import OverwriteInputError, PathLike, _naming


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(output: PathLike, *inputs: Optional[PathLike]) -> None:
    """Raise :class:`OverwriteInputError` if ``output`` names the same file as any of ``inputs``.

    Compares resolved paths (symlinks, ``..``) and, when both exist, the file identity (hard links).
    An input that is a folder (an image-folder dataset) protects everything inside it too.
    """
    out = Path(output)
    for inp in inputs:
        if inp is None:
            continue
        i = Path(inp)
        if out.resolve() == i.resolve() or _same_file(out, i):
            raise OverwriteInputError(
                f"refusing to overwrite the input file {str(i)!r} with an output {str(out)!r}; choose a different "
                "output path")
        if i.is_dir() and out.resolve().is_relative_to(i.resolve()):
            raise OverwriteInputError(
                f"refusing to write the output {str(out)!r} inside the input folder {str(i)!r}; choose a "
                "different output path")


def _umask() -> int:
    # os.umask can only be read by setting it; restored at once (the process's threads do not create files here).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(tmp: Path) -> None:
    """Give a finished temporary the permissions of an ordinary new file (0o666 & ~umask).

    ``tempfile.mkstemp`` creates 0o600 files; without this every output would be private to its owner."""
    os.chmod(tmp, 0o666 & ~_umask())


def _temp_beside(dest: Path) -> Path:
    directory = dest.parent if str(dest.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {directory}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{dest.suffix}", dir=directory)
    os.close(fd)
    return Path(tmp_name)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, protect: Optional[List[PathLike]] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically, on error it is removed.

    The temporary name keeps ``path``'s suffix, so writers that infer the format from the extension
    (``matplotlib.savefig``, ``safetensors``) behave as with the real name.

    Args:
        protect: input paths that ``path`` must not be (see :func:`check_not_input`).
    """
    dest = Path(path)
    check_not_input(dest, *(protect or []))
    with _naming(dest):
        tmp = _temp_beside(dest)
    try:
        with _naming(dest):
            yield tmp
            _fsync(tmp)
            _publish_mode(tmp)
            os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(tmp.parent)


class StagedOutputs:
    """Several output files replaced together, only once every one of them is complete.

    :meth:`path` yields a temporary beside each destination (checked against ``protect`` first, see
    :func:`check_not_input`); :meth:`commit` renames all of them into place; leaving the ``with`` block with an
    exception (or :meth:`discard`) removes the temporaries and leaves every existing destination untouched —
    a run that fails while writing (disk full, a crash in a writer) never costs the previous results.
    Only the named destinations are ever replaced; nothing else in their folders is touched.

    Usage::

        with StagedOutputs(protect=[checkpoint, clean]) as staged:
            with staged.path(out / "report.md") as tmp:
                tmp.write_text(md)
            with staged.path(out / "model.safetensors") as tmp:
                save_model(model, tmp)
        # both files replaced here, together
    """

    def __init__(self, protect: Optional[List[PathLike]] = None):
        self.protect = [p for p in (protect or []) if p is not None]
        self._staged: List[tuple] = []

    @contextlib.contextmanager
    def path(self, dest: PathLike) -> Iterator[Path]:
        dest = Path(dest)
        check_not_input(dest, *self.protect)
        if any(d == dest for _, d in self._staged):
            raise ValueError(f"{dest} was staged twice")
        with _naming(dest):
            tmp = _temp_beside(dest)
        try:
            with _naming(dest):
                yield tmp
                _fsync(tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        self._staged.append((tmp, dest))

    def commit(self) -> List[Path]:
        """Move every staged file into place; returns the destinations."""
        for tmp, dest in self._staged:
            check_not_input(dest, *self.protect)       # again: the tree may have changed while writing
        done = []
        for tmp, dest in self._staged:
            with _naming(dest):
                _publish_mode(tmp)
                os.replace(tmp, dest)
            done.append(dest)
        for d in {dest.parent for dest in done}:
            _fsync_dir(d)
        self._staged = []
        return done

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._staged = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform / file system, hence best effort.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes, *, protect: Optional[List[PathLike]] = None) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, protect=protect) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, protect: Optional[List[PathLike]] = None) -> Path:
    """Write UTF-8 ``text`` (JSON, Markdown, CSV…) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), protect=protect)


def atomic_write_json(path: PathLike, obj: Any, *, protect: Optional[List[PathLike]] = None, indent: int = 2) -> Path:
    """Serialize ``obj`` as JSON (serialized fully before the file is touched) and write it atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n", protect=protect)


def atomic_savefig(fig, path: PathLike, *, protect: Optional[List[PathLike]] = None, **savefig_kwargs) -> Path:
    """``fig.savefig`` to ``path`` atomically (format from the suffix unless ``format=`` is given)."""
    savefig_kwargs.setdefault("format", Path(path).suffix.lstrip(".") or None)
    with atomic_path(path, protect=protect) as tmp:
        fig.savefig(tmp, **savefig_kwargs)
    return Path(path)
