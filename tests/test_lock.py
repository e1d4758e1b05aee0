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
