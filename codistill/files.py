"""Crash-safe writes: what a reader can see is the old file or the new one, never half of one.

Every file the trainer publishes (exports, LATEST, checkpoint markers and ``latest``,
config.json, summary.json) goes through here: temp file in the same directory -> fsync ->
``os.replace`` (atomic on one filesystem); ``fsync_dir`` makes the rename itself durable.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, fill: Callable[[Path], None]) -> None:
    """``fill(tmp)`` writes the new contents to a temp file beside ``path``; it is then fsynced
    and renamed over ``path``. On any error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        fill(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: Path, obj, indent: int = 2, sort_keys: bool = True) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n").encode())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (a checkpoint tag before its marker)."""
    for d, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(d, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(d))
