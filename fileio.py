"""Crash-safe writes and bounded reads of untrusted files, shared by the trainer (codistill/) and
the data preparation (data_prep/, which imports nothing from codistill).

Writes: what a reader can see is the old file or the new one, never half of one.

Every file the trainer publishes (exports, LATEST, checkpoint markers and ``latest``,
config.json, summary.json) goes through here: temp file in the same directory -> fsync ->
``os.replace`` (atomic on one filesystem); ``fsync_dir`` makes the rename itself durable.

Reading what another process may have written (a peer's exports, LATEST and metadata, a group's
LOCK) goes through ``open_regular`` / ``read_bounded``, the one safe-open primitive: the path
itself must not be a symlink (``O_NOFOLLOW``; a directory on the way may be), the file must be a
regular file (``fstat`` after the open: a FIFO, a device such as /dev/zero, a socket or a
directory is refused; ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for
a writer), and every read has a size limit the caller states. Every refusal is an ExportError
naming the file (``MissingFile``, a subclass, when it does not exist).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


class ExportError(Exception):
    """A peer's file that must not be used (missing, partial, corrupt, hostile or mismatched);
    the message names the file."""


class MissingFile(ExportError):
    """The file does not exist (the peer has not written it yet, or pruned it meanwhile)."""


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644, single_link: bool = False) -> int:
    """A file descriptor of ``path``, which must be a regular file and not itself a symlink (see
    the module docstring); ``flags`` e.g. ``os.O_RDWR | os.O_CREAT`` for a lock file.
    ``single_link``: also refuse a file with other hard links (one written to must not be a
    second name of a file outside the run directory). Raises ExportError / MissingFile."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except FileNotFoundError:
        raise MissingFile(f"{path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
            raise ExportError(f"{path} is a symbolic link; refusing it (files a peer writes must be regular "
                              "files in its directory: remove the link)") from None
        if e.errno == errno.EISDIR:  # a directory opened for writing
            raise ExportError(f"{path} is a directory, not a file; refusing it (remove it)") from None
        raise ExportError(f"{path}: cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise ExportError(f"{path} is {kind}, not a regular file; refusing it (remove it)")
        if single_link and st.st_nlink > 1:
            raise ExportError(f"{path} has {st.st_nlink} hard links (another name of some other file?); "
                              "refusing to write into it (remove it)")
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def open_bounded(path: Path, limit: int, what: str = "file") -> Iterator[tuple[BinaryIO, int]]:
    """(unbuffered binary file, size) of the regular file ``path`` (``open_regular``), refused
    (ExportError naming the file) when it is larger than ``limit`` bytes; a reader must not read
    past the size returned (the file may grow meanwhile)."""
    f = os.fdopen(open_regular(path), "rb", buffering=0)
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ExportError(f"{path}: {size} bytes, more than a {what} can be ({limit}); refusing it")
        yield f, size


def read_bounded(path: Path, limit: int, what: str = "file") -> bytes:
    """All bytes of the regular file ``path``, at most ``limit`` of them (larger: ExportError,
    nothing read); what it has when opened, even if it grows meanwhile."""
    with open_bounded(path, limit, what) as (f, size):
        chunks, n = [], 0
        while n < size and (b := f.read(size - n)):
            chunks.append(b)
            n += len(b)
        return b"".join(chunks)


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
