"""Safe, atomic file I/O.

Loading never runs arbitrary pickled code: checkpoints are read with ``safetensors`` or with
``torch.load(weights_only=True)``; anything else (a pickled ``nn.Module``, custom classes) is refused with an
:class:`UnsafeCheckpointError` that says how to convert the file.

Writing is atomic: data go to a temporary file in the destination's directory (same file system), are flushed
and fsync'ed, and only then ``os.replace``-d onto the destination — a crash or an exception leaves either the old
file or the new one, never a torn one, and no temporary behind.  Outputs may never overwrite an input
(:class:`OverwriteInputError`).

:class:`Checkpointer` saves / resumes an interrupted loop (model, optimizer, step, RNG states).

The package: :mod:`._errors` (the error types), :mod:`._atomic` (atomic writes, :class:`StagedOutputs`,
:func:`check_not_input`), :mod:`._lock` (:class:`FolderLock`), :mod:`._load` (safe loading and the checks of a
state dict), :mod:`._save` (safetensors saving) and :mod:`._checkpointer` (:class:`Checkpointer`).  Every name is
importable from ``fip_fast.io``; a monkeypatch must target the module that looks the name up (e.g.
``fip_fast.io._atomic._fsync``): rebinding it here changes nothing.
"""
from __future__ import annotations

from fip_fast.io._atomic import (
    StagedOutputs,
    atomic_path,
    atomic_savefig,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_not_input,
)
from fip_fast.io._checkpointer import Checkpointer
from fip_fast.io._errors import CheckpointError, OutputWriteError, OverwriteInputError, UnsafeCheckpointError
from fip_fast.io._load import load_state_dict, load_weights, read_weights, validate_state_dict
from fip_fast.io._lock import LOCK_NAME, FolderBusyError, FolderLock
from fip_fast.io._save import save_model, save_state_dict

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

# Every other name of the single-module form, so that ``fip_fast.io.<name>`` keeps resolving
# (``fip_fast.cli.render`` imports ``_plain_tensors``).
from fip_fast.io._atomic import (  # noqa: E402, F401, I001
    _fsync, _fsync_dir, _publish_mode, _same_file, _temp_beside, _umask)
from fip_fast.io._checkpointer import _plain, _rng_state, _set_rng_state  # noqa: E402, F401
from fip_fast.io._errors import PathLike, _naming, _write_failure  # noqa: E402, F401
from fip_fast.io._load import (  # noqa: E402, F401
    _UNSAFE_HINT, _is_safetensors, _read_safetensors, _running_var_names, _unwrap)
from fip_fast.io._save import _plain_tensors  # noqa: E402, F401
