"""Run folders: one :class:`RunFolder` for every reader and writer, checkpoints and exports.

- :mod:`lipgan.runs.folder`: :class:`RunFolder` (config, status, metrics, eval, samples,
  checkpoints and exports of one run; exclusive create, one writer, atomic writes);
- :mod:`lipgan.runs.manifest`: ``manifest.json``, the sha256 of every checkpoint and export;
- :mod:`lipgan.runs.checkpoint`: serialization, validation and loading of checkpoints and
  safetensors exports (imports torch, so it is loaded on first use: ``lipgan report`` and the
  folder readers stay torch-free);
- :mod:`lipgan.runs.files`: atomic writes, one-line OS errors, the advisory lock.
"""

from __future__ import annotations

import importlib
from typing import Any

from lipgan.runs.files import (
    FolderLock,
    atomic_write_bytes,
    atomic_write_text,
    make_dirs,
    os_error,
)
from lipgan.runs.folder import RunFolder, expand_paths, is_run_folder
from lipgan.runs.manifest import Manifest

#: the name this class had before it became the one reader and writer (kept for callers)
Run = RunFolder

_CHECKPOINT_NAMES = (
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "Export",
    "checkpoint_bytes",
    "export_bytes",
    "export_network",
    "load_checkpoint",
    "load_network",
    "plain_state_dict",
    "save_checkpoint",
    "validate_checkpoint",
)

__all__ = [
    "FolderLock",
    "Manifest",
    "Run",
    "RunFolder",
    "atomic_write_bytes",
    "atomic_write_text",
    "expand_paths",
    "is_run_folder",
    "make_dirs",
    "os_error",
    *_CHECKPOINT_NAMES,
]


def __getattr__(name: str) -> Any:  # PEP 562: torch is imported only when a checkpoint is used
    if name in _CHECKPOINT_NAMES:
        return getattr(importlib.import_module("lipgan.runs.checkpoint"), name)
    raise AttributeError(f"module 'lipgan.runs' has no attribute {name!r}")
