"""One writer per group: ``group_i/LOCK`` held by the process that trains group i.

Two launches with the same run_dir and group (a job submitted twice, a requeued task whose
predecessor is still alive) would interleave checkpoints and exports. The group's leader takes
an exclusive ``fcntl.flock`` on ``group_i/LOCK`` and writes its PID, host and start time into
it, so the second launch refuses with a message naming the holder. The kernel drops the lock
when the holder dies, even by kill -9, so a crashed run never leaves a stale lock behind: the
file's contents are only for the message.

Filesystems without flock support (some Lustre/NFS mounts; the call fails with ENOLCK or
EOPNOTSUPP) cannot enforce this: the trainer then warns and goes on unlocked.

The file is opened with fileio.py ``open_regular``: a LOCK replaced by a symlink (to a
file outside the run directory), a second hard link of another file, a FIFO or a directory is
refused with a LockError naming it - never truncated or written through.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from codistill.layout import GroupLayout
from fileio import ExportError, open_regular


class LockError(RuntimeError):
    pass


class GroupLock:
    def __init__(self, group_dir: Path):
        self.path = GroupLayout(Path(group_dir), -1).lock
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when held; False when this filesystem cannot lock. Raises LockError if another
        live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT, 0o644, single_link=True)
        except ExportError as e:
            raise LockError(f"{e}; it is this group's lock file ({self.path.parent} is not safe to train "
                            "into until it is a plain file again)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self.holder(fd)
                os.close(fd)
                who = (f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
                       if holder else "another process")
                raise LockError(f"{self.path.parent} is already being trained by {who} ({self.path}); two launches "
                                f"must not write one group's checkpoints and exports. Stop that run first, or use "
                                f"another --run_dir") from None
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n").encode(), 0)
        self.fd = fd
        return True

    @staticmethod
    def holder(fd: int) -> dict:
        try:
            got = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError, RecursionError):
            return {}
        return got if isinstance(got, dict) else {}

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock; the file stays (its contents are only informative)
            self.fd = None
