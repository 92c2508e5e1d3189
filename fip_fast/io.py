"""Safe, atomic file I/O.

Loading never runs arbitrary pickled code: checkpoints are read with ``safetensors`` or with
``torch.load(weights_only=True)``; anything else (a pickled ``nn.Module``, custom classes) is refused with an
:class:`UnsafeCheckpointError` that says how to convert the file.

Writing is atomic: data go to a temporary file in the destination's directory (same file system), are flushed
and fsync'ed, and only then ``os.replace``-d onto the destination — a crash or an exception leaves either the old
file or the new one, never a torn one, and no temporary behind.  Outputs may never overwrite an input
(:class:`OverwriteInputError`).

:class:`Checkpointer` saves / resumes an interrupted loop (model, optimizer, step, RNG states).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Self, Union

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "UnsafeCheckpointError",
    "CheckpointError",
    "OverwriteInputError",
    "OutputWriteError",
    "check_not_input",
    "StagedOutputs",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_savefig",
    "load_state_dict",
    "load_weights",
    "read_weights",
    "validate_state_dict",
    "save_state_dict",
    "save_model",
    "Checkpointer",
    "FolderLock",
    "FolderBusyError",
    "LOCK_NAME",
]

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


# --------------------------------------------------------------------------------------------------- paths
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


# --------------------------------------------------------------------------------------------------- locking
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


# --------------------------------------------------------------------------------------------------- loading
_UNSAFE_HINT = (
    "fip_fast loads only safetensors files or weights-only torch checkpoints (plain dicts of tensors, numbers, "
    "strings, lists), because unpickling anything else can execute arbitrary code. If you trust this file, "
    "convert it once in your own environment:\n"
    "    obj = torch.load(path, weights_only=False)\n"
    "    sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj\n"
    "    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')"
)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    # Content sniffing: 8-byte little-endian header length, then a JSON object.
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
        return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)
    except OSError:
        return False


def _read_safetensors(p: Path, map_location: Union[str, torch.device]) -> Dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device=str(map_location))
    except Exception as e:  # SafetensorError (header too large, truncated…), OSError
        raise CheckpointError(f"{p}: not a readable safetensors file (corrupt, truncated, or another format "
                              f"renamed .safetensors): {type(e).__name__}: {e}") from e


def load_state_dict(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint safely: ``.safetensors`` or ``torch.load(weights_only=True)``.

    Returns whatever the file holds as a dict (for a safetensors file: ``{name: Tensor}``).  A checkpoint that
    wraps the weights (``{"state_dict": …}`` / ``{"model": …}``) is returned as is — see :func:`load_weights`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: ``path`` is a folder, empty, truncated or not a checkpoint at all.
        UnsafeCheckpointError: the file needs full unpickling (e.g. a pickled ``nn.Module``).
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder, not a checkpoint file")
    if p.exists() and not p.is_file():
        raise CheckpointError(f"{p} is not a regular file (a FIFO, a device such as /dev/zero…); give a "
                              ".safetensors or .pt file")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: the file is empty (0 bytes)")
    if _is_safetensors(p):
        return _read_safetensors(p, map_location)
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        said = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e)).strip().splitlines()
        raise UnsafeCheckpointError(f"{p} is not a weights-only checkpoint and was not loaded.\n{_UNSAFE_HINT}\n"
                                    f"(torch said: {said[0] if said else type(e).__name__})") from e
    except RuntimeError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise UnsafeCheckpointError(f"{p} is not a weights-only checkpoint and was not loaded.\n"
                                        f"{_UNSAFE_HINT}") from e
        raise CheckpointError(f"{p}: not a readable checkpoint (corrupt, truncated, or not a torch/safetensors "
                              f"file): {e}") from e
    except Exception as e:  # the weights-only unpickler raises IndexError, EOFError… on truncated files
        raise CheckpointError(f"{p}: not a readable checkpoint (corrupt, truncated, or not a torch/safetensors "
                              f"file): {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise UnsafeCheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict.\n{_UNSAFE_HINT}")
    return dict(obj)


def _unwrap(sd: Mapping[Any, Any]) -> Dict[str, Any]:
    for key in ("state_dict", "model_state_dict", "model"):
        if key in sd and isinstance(sd[key], Mapping):
            return _unwrap(sd[key])
    # Checkpoints saved from DataParallel / DistributedDataParallel prefix every key with "module.".
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def read_weights(path: PathLike) -> Dict[str, Tensor]:
    """The weight tensors of the checkpoint at ``path`` (unwrapped, see :func:`load_weights`), on the CPU.

    Protects the caller from files that only look like state dicts: keys must be strings and there must be at
    least one tensor (non-tensor entries such as an ``epoch`` counter are dropped).

    Raises:
        CheckpointError / UnsafeCheckpointError / FileNotFoundError: see :func:`load_state_dict`.
    """
    sd = _unwrap(load_state_dict(path, map_location="cpu"))
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: state dict keys must be strings (parameter names), found "
                              f"{type(bad[0]).__name__} key(s) such as {bad[0]!r}")
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {sorted(sd)[:8]})")
    return tensors


def _running_var_names(model: nn.Module) -> List[str]:
    from torch.nn.modules.batchnorm import _NormBase

    return [f"{n}.running_var" if n else "running_var" for n, m in model.named_modules()
            if isinstance(m, _NormBase) and getattr(m, "running_var", None) is not None]


def validate_state_dict(sd: Mapping[str, Tensor], model: Optional[nn.Module] = None,
                        source: Optional[PathLike] = None) -> None:
    """Refuse tensors that would load silently but poison the run, naming the file and the entry.

    An untrusted checkpoint may hold NaN / Inf values, integer tensors where the model has float parameters
    (``load_state_dict`` would cast them without a word) or negative BatchNorm ``running_var`` entries (the
    normalization then takes the square root of a negative number); each surfaces much later as an obscure
    Fisher or SVD error.  With ``model`` the dtypes are compared entry by entry; shapes and missing keys are
    left to ``model.load_state_dict``.

    Raises:
        CheckpointError: the first problem found.
    """
    where = f"{source}: " if source is not None else ""
    expected = model.state_dict() if model is not None else {}
    for k, v in sd.items():
        ref = expected.get(k)
        if ref is not None and ref.is_floating_point() and not v.is_floating_point():
            raise CheckpointError(f"{where}entry {k!r} is {v.dtype} but the model's is {ref.dtype} (quantized or "
                                  "corrupt weights are not supported; store floating-point weights)")
        if (v.is_floating_point() or v.is_complex()) and v.numel() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"{where}entry {k!r} holds {n} non-finite value(s) (NaN or Inf)")
    rv = _running_var_names(model) if model is not None else [k for k in sd if k.endswith("running_var")]
    for k in rv:
        v = sd.get(k)
        if v is not None and v.numel() and bool((v < 0).any()):
            raise CheckpointError(f"{where}BatchNorm entry {k!r} has negative running variance(s) "
                                  f"(min {float(v.min()):.3g}); a variance is never negative")


def load_weights(model: nn.Module, path: PathLike, strict: bool = True) -> nn.Module:
    """Load the weights at ``path`` safely into ``model`` (in place) and return it.

    Accepts a bare state dict or one wrapped under ``state_dict`` / ``model_state_dict`` / ``model``, with or
    without a ``module.`` prefix.  The tensors are checked by :func:`validate_state_dict` first.

    Raises:
        CheckpointError: unreadable file or invalid tensors.  RuntimeError: the weights do not fit ``model``.
    """
    tensors = read_weights(path)
    validate_state_dict(tensors, model, path)
    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as e:
        raise RuntimeError(f"the weights in {path} do not fit this model architecture: {e}") from e
    return model


# --------------------------------------------------------------------------------------------------- saving
def _plain_tensors(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """CPU, contiguous, storage-disjoint copies — safetensors refuses tensors that share memory (tied weights)."""
    out: Dict[str, Tensor] = {}
    seen = set()
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        t = v.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if (t.numel() and key in seen) or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # shared or a view into a larger storage
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[k] = t
    return out


def save_state_dict(sd: Mapping[str, Tensor], path: PathLike, *, metadata: Optional[Dict[str, str]] = None,
                    protect: Optional[List[PathLike]] = None) -> Path:
    """Save a ``{name: Tensor}`` dict as safetensors, atomically; ``metadata`` values must be strings."""
    from safetensors.torch import save_file

    tensors = _plain_tensors(sd)
    with atomic_path(path, protect=protect) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def save_model(model: Union[nn.Module, Mapping[str, Tensor]], path: PathLike, *,
               metadata: Optional[Dict[str, str]] = None, protect: Optional[List[PathLike]] = None) -> Path:
    """Save a model's state dict (parameters and buffers) as safetensors, atomically.

    Args:
        protect: input paths (e.g. the checkpoint that was purified) that must not be overwritten.
    """
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    return save_state_dict(sd, path, metadata=metadata, protect=protect)


# --------------------------------------------------------------------------------------------------- resume
def _plain(obj: Any, where: str = "state") -> Any:
    """Convert ``obj`` to what ``torch.load(weights_only=True)`` accepts; fail loudly on anything else."""
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where} is a {type(obj).__name__}, which a weights-only checkpoint cannot hold")


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "python": _plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Periodic, atomic checkpoints of a training / purification loop, and resumption from the latest one.

    Each checkpoint ``<directory>/<prefix>-<step:08d>.pt`` is a ``torch.save`` of a plain dict
    ``{"step", "model", "optimizer", "rng", "extra"}`` that loads with ``weights_only=True``; optimizer state
    (momentum buffers, step counts, hyper-parameters such as ``betas`` tuples) is converted to plain types on
    the way out.  Only the newest ``keep`` checkpoints are kept.

    Usage::

        ckpt = Checkpointer("run/ckpt", every=100)
        start = ckpt.resume(model, optimizer)        # 0 when there is nothing to resume
        for step in range(start, total):
            ...
            ckpt.maybe_save(step + 1, model, optimizer)
    """

    _PATTERN = r"^{prefix}-(\d+)\.pt$"

    def __init__(self, directory: PathLike, every: int = 100, keep: int = 2, prefix: str = "ckpt"):
        if every < 1 or keep < 1:
            raise ValueError("every and keep must be ≥ 1")
        self.directory, self.every, self.keep, self.prefix = Path(directory), int(every), int(keep), prefix
        self._re = re.compile(self._PATTERN.format(prefix=re.escape(prefix)))
        self.extra: Dict[str, Any] = {}  # the "extra" dict of the checkpoint last resumed from

    def path_for(self, step: int) -> Path:
        return self.directory / f"{self.prefix}-{step:08d}.pt"

    def checkpoints(self) -> List[Path]:
        """Existing checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self._re.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
             extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Write the checkpoint for ``step`` atomically and prune old ones."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "step": int(step),
            "model": _plain(model.state_dict(), "model"),
            "optimizer": _plain(optimizer.state_dict(), "optimizer") if optimizer is not None else None,
            "rng": _rng_state(),
            "extra": _plain(dict(extra or {}), "extra"),
        }
        path = self.path_for(step)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        for old in self.checkpoints()[:-self.keep]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        return path

    def maybe_save(self, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                   extra: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
        """Save when ``step`` is a positive multiple of ``every``; return the path written, if any."""
        return self.save(step, model, optimizer, extra) if step > 0 and step % self.every == 0 else None

    def load_latest(self, map_location: Union[str, torch.device] = "cpu") -> Optional[Dict[str, Any]]:
        """The newest readable checkpoint's payload (``weights_only=True``), or None when there is none.

        A checkpoint that fails to load (e.g. truncated by a copy) is skipped in favour of the previous one.
        """
        for path in reversed(self.checkpoints()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # truncated / corrupt: IndexError, EOFError, UnpicklingError, RuntimeError…
                warnings.warn(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}", stacklevel=2)
                continue
        return None

    def resume(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
               restore_rng: bool = True, map_location: Union[str, torch.device] = "cpu") -> int:
        """Restore model, optimizer and RNG states from the latest checkpoint; return its step (0 if none)."""
        payload = self.load_latest(map_location)
        if payload is None:
            return 0
        model.load_state_dict(payload["model"])
        if optimizer is not None and payload.get("optimizer") is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if restore_rng:
            _set_rng_state(payload["rng"])
        self.extra = payload.get("extra", {})
        return int(payload["step"])
