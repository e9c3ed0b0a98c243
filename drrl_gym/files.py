"""Crash-safe file writes: write beside the target, then rename over it.

A rename within one directory is atomic on POSIX and Windows, so a reader (or a run resumed after a crash) sees the
old file or the new one, never a truncated one. The temporary file is hidden (``.NAME.PID.tmp``), so nothing that
lists a directory for its files (checkpoints, say) picks it up, and carries the process id, so parallel processes
(RLlib runners, several envs calibrating the same basis) never write into each other's. ``write`` receives the
temporary path, so writers that insist on a path (SB3's ``save``, ``savefig`` with an explicit format) work too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file next to ``path``, then rename it to ``path``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))
