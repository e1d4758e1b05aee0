"""codistill/teachers/pool.py and loader.py: the teacher pool (stale and dead peers) and the loader (restarted peers)."""
import json
import os
import threading
import time

import pytest
import torch
from conftest import CFG, E2E_STEPS, PY, ROOT, TOK, e2e_args, env_for_runs, launch, read_scalars, run_python  # noqa: F401
from conftest import write_test_export as _export

from codistill.exports import read_export
from codistill.layout import exports_dir
from codistill.teachers.loader import TeacherLoader
from codistill.teachers.pool import TeacherPool


def test_teacher_pool_keeps_a_dead_peer_then_drops_it_past_max_staleness(tmp_path):
    d = exports_dir(tmp_path, 1)
    _export(d, 10)
    pool, msgs = TeacherPool(CFG, torch.device("cpu")), []
    pool.load(1, read_export(d, 10))
    for step in range(11, 60):
        active = pool.active(0, step, None, warn_after=20, log=msgs.append)
        assert active == [1]  # no cap: the last good teacher stays, however old
    assert len([m for m in msgs if "published nothing newer" in m]) == 1  # warned once
    assert pool.active(0, 30, 20, log=msgs.append) == [1]
    assert pool.active(0, 31, 20, log=msgs.append) == [] and pool.active(0, 32, 20, log=msgs.append) == []
    assert len([m for m in msgs if "dropped" in m]) == 1


def test_loader_picks_up_a_peer_that_restarted_from_an_older_step(tmp_path):
    d = exports_dir(tmp_path, 1)
    _export(d, 30)
    loader = TeacherLoader(tmp_path, [1], CFG.config_hash(), TOK, mode="latest", poll_interval=0.02,
                           log=lambda m: None)

    def take(deadline=10):
        t = time.time() + deadline
        while time.time() < t:
            exp = loader.take(1)
            if exp is not None:
                return exp
            time.sleep(0.02)

    try:
        assert take().step == 30
        time.sleep(0.05)
        _export(d, 20, seed=3)  # the peer restarted from its step-10 checkpoint and exported step 20
        exp = take()
        assert exp is not None and exp.step == 20
    finally:
        loader.close()


# ---- stuck and refused peers (issue 31 items 2 and 7) -------------------------------------------
# What the training loop does when a peer is stuck (its LATEST or export is a FIFO, a device, or on
# a hung filesystem): nothing different. Each peer has its own reader thread; take()/wait() only
# take a lock that no reader holds during I/O, so they return at once; the stuck read is abandoned
# after read_timeout (logged once) and the loop keeps that peer's last good teacher (or plain CE),
# while every other peer's exports are loaded as usual.

def _within(seconds, fn):
    """fn() run on a helper thread; fails (instead of hanging the suite) if it has not returned."""
    out = {}
    t = threading.Thread(target=lambda: out.update(value=fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} still blocked after {seconds}s"
    return out.get("value")


def _unblock(fifos):
    """Let readers blocked opening a FIFO go: a writer opens and closes it (they read EOF)."""
    for f in fifos:
        try:
            os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # nobody waiting on it


def _wait_for(pred, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_a_fifo_peer_never_blocks_the_loop_nor_a_healthy_peer(tmp_path):
    d1, d2, d3 = (exports_dir(tmp_path, g) for g in (1, 2, 3))
    d1.mkdir(parents=True)
    os.mkfifo(d1 / "LATEST")                          # peer 1: LATEST is a FIFO
    _export(d2, 10)
    (d2 / "step_000010.safetensors").unlink()
    os.mkfifo(d2 / "step_000010.safetensors")         # peer 2: its export's weights are a FIFO
    _export(d3, 10)                                   # peer 3: healthy
    fifos = [d1 / "LATEST", d2 / "step_000010.safetensors"]
    msgs = []
    loader = TeacherLoader(tmp_path, [1, 2, 3], CFG.config_hash(), TOK, mode="latest", poll_interval=0.02,
                           log=msgs.append, read_timeout=0.3)
    try:
        got, slowest = {}, 0.0

        def poll_until(pred):
            nonlocal slowest
            deadline = time.time() + 15
            while time.time() < deadline and not pred():
                for p in (1, 2, 3):
                    t0 = time.perf_counter()
                    exp = loader.take(p)
                    slowest = max(slowest, time.perf_counter() - t0)
                    if exp is not None:
                        got[p] = exp.step
                time.sleep(0.01)

        _within(20, lambda: poll_until(lambda: got.get(3) == 10 and sum("group 1" in m for m in msgs)
                                       and sum("group 2" in m for m in msgs)))
        assert got == {3: 10}, (got, msgs)
        assert any("group 1" in m and str(d1 / "LATEST") in m for m in msgs), msgs
        assert any("group 2" in m and "step_000010" in m for m in msgs), msgs
        _export(d3, 20, seed=1)                       # the healthy peer goes on exporting: still followed
        _within(20, lambda: poll_until(lambda: got.get(3) == 20))
        assert got == {3: 20}
        time.sleep(1.0)                               # ~3 deadlines: the FIFOs are not opened again meanwhile
        names = [t.name for t in threading.enumerate()]
        assert names.count("teacher-loader-1") <= 2 and names.count("teacher-loader-2") <= 2, names
        assert len([m for m in msgs if "group 1" in m]) == 1 and len([m for m in msgs if "group 2" in m]) == 1, msgs
        _export(d1, 30, seed=2)                       # peer 1 replaces its LATEST with a real one: read again
        _within(20, lambda: poll_until(lambda: got.get(1) == 30))
        assert got.get(1) == 30 and 2 not in got
        assert slowest < 0.05, f"take() took {slowest * 1e3:.0f} ms"
        t0 = time.perf_counter()
        _within(5, loader.close)
        assert time.perf_counter() - t0 < 3
    finally:
        loader.close()
        _unblock(fifos)


def test_sync_wait_for_a_stuck_export_returns_without_its_timeout(tmp_path):
    d = exports_dir(tmp_path, 1)
    _export(d, 10)
    (d / "step_000010.json").unlink()
    os.mkfifo(d / "step_000010.json")                 # the metadata the loader reads first: a FIFO
    msgs = []
    loader = TeacherLoader(tmp_path, [1], CFG.config_hash(), TOK, mode="sync", poll_interval=0.02,
                           log=msgs.append, read_timeout=0.3)
    try:
        loader.want(1, 10)
        t0 = time.perf_counter()
        assert _within(20, lambda: loader.wait(1, 10, timeout=60)) is None  # not the 60 s of --teacher_timeout
        assert time.perf_counter() - t0 < 5
        assert any("step_000010.json" in m for m in msgs), msgs
    finally:
        loader.close()
        _unblock([d / "step_000010.json"])


def _nested_json(path):
    path.write_text("[" * 200_000 + "]" * 200_000)   # deep enough for a RecursionError in json.loads


def _json_dir(path):
    path.unlink()
    path.mkdir()                                      # a directory named like the metadata file


def _huge_size(path):
    path.write_text(json.dumps(dict(json.loads(path.read_text()), weights_bytes=1 << 40)))  # 1 TB


@pytest.mark.parametrize("breakage", [_nested_json, _json_dir, _huge_size])
def test_a_refused_export_is_read_once_until_it_is_rewritten(tmp_path, monkeypatch, breakage):
    """Any error of the readers is a refusal naming the file, remembered by the files' identity
    (path, inode, size, mtime): not read again every --poll_interval, read again once rewritten."""
    import codistill.teachers.loader as teacher
    reads = []  # (step, the metadata file's identity when it was read)

    def counting(*a, **kw):
        reads.append((a[1], teacher.file_identity(a[0] / "step_000010.json")))
        return read_export(*a, **kw)

    monkeypatch.setattr(teacher, "read_export", counting)
    d = exports_dir(tmp_path, 1)
    _export(d, 10)
    meta = d / "step_000010.json"
    good = meta.read_text()
    breakage(meta)
    msgs = []
    loader = TeacherLoader(tmp_path, [1], CFG.config_hash(), TOK, mode="latest", poll_interval=0.02,
                           log=msgs.append)
    try:
        assert _wait_for(lambda: msgs)
        time.sleep(0.5)                               # 25 polls
        assert reads == [(10, teacher.file_identity(meta))], reads
        assert len(msgs) == 1 and "refusing export step 10" in msgs[0] and "step_000010" in msgs[0], msgs
        assert loader.take(1) is None
        tmp = meta.with_name(".rewrite.tmp")
        tmp.write_text(good)
        if meta.is_dir():
            meta.rmdir()
        os.replace(tmp, meta)  # the peer rewrites it (atomically, as exports are): another identity, read again
        assert _wait_for(lambda: (exp := loader.take(1)) is not None and exp.step == 10)
        # the new file read once; a poll landing between the directory's removal and the rename may
        # also have tried the missing file (the directory case: no atomic swap of a directory for a file)
        assert reads[-1] == (10, teacher.file_identity(meta)), reads
        assert reads[1:-1] == [] or reads[1:-1] == [(10, None)] and breakage is _json_dir, reads
    finally:
        loader.close()
