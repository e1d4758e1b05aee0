"""codistill/lock.py: one writer per group."""
import os
import re
import subprocess

import pytest
from conftest import PY, ROOT


def test_group_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    import socket

    from codistill.lock import GroupLock, LockError
    a = GroupLock(tmp_path / "group_0")
    assert a.acquire()
    with pytest.raises(LockError, match=rf"PID {os.getpid()} on host {re.escape(socket.gethostname())}"):
        GroupLock(tmp_path / "group_0").acquire()
    assert GroupLock(tmp_path / "group_1").acquire()  # another group: independent
    a.release()
    b = GroupLock(tmp_path / "group_0")
    assert b.acquire()
    b.release()
    # a holder killed with SIGKILL leaves the file but not the lock
    code = ("import sys, time; from codistill.lock import GroupLock; "
            "GroupLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([PY, "-c", code, str(ROOT), str(tmp_path / "group_2")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LockError, match=f"PID {proc.pid} "):
        GroupLock(tmp_path / "group_2").acquire()
    proc.kill()
    proc.wait()
    assert (tmp_path / "group_2" / "LOCK").exists() and GroupLock(tmp_path / "group_2").acquire()


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo", "directory"])
def test_a_planted_lock_file_is_refused_and_nothing_outside_is_written(tmp_path, plant):
    """A group LOCK replaced by a symlink (or a hard link) to a file outside the run directory
    must not be truncated or written through; a FIFO or a directory is refused without blocking."""
    from codistill.lock import GroupLock, LockError
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    g = tmp_path / "run" / "group_0"
    g.mkdir(parents=True)
    lock = g / "LOCK"
    {"symlink": lambda: lock.symlink_to(outside), "hardlink": lambda: os.link(outside, lock),
     "fifo": lambda: os.mkfifo(lock), "directory": lambda: lock.mkdir()}[plant]()
    kind = {"symlink": "symbolic link", "hardlink": "2 hard links", "fifo": "a FIFO", "directory": "a directory"}
    with pytest.raises(LockError, match=re.escape(kind[plant])) as e:
        GroupLock(g).acquire()
    assert str(lock) in str(e.value)
    assert outside.read_text() == "precious\n"


def test_a_lock_file_holding_garbage_still_names_no_holder_without_a_traceback(tmp_path):
    from codistill.lock import GroupLock
    p = tmp_path / "LOCK"
    p.write_text("[" * 4000)  # deeply nested JSON: RecursionError in json.loads
    fd = os.open(p, os.O_RDONLY)
    try:
        assert GroupLock.holder(fd) == {}
    finally:
        os.close(fd)
