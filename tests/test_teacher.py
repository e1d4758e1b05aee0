"""codistill/teacher.py: the teacher pool (stale and dead peers) and the loader (restarted peers)."""
import time

import torch

from codistill.exchange import (read_export)
from codistill.teacher import TeacherLoader, TeacherPool, exports_dir
from conftest import (CFG, TOK, E2E_STEPS, PY, ROOT, e2e_args, env_for_runs, export_meta as _meta,  # noqa: F401
                      launch, read_scalars, run_python, write_test_export as _export)


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
