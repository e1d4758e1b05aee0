"""codistill/teachers/health.py and the per-step guard of TeacherPool.probs: a bad teacher never reaches
the student as a NaN, and a much worse one is dropped after a window, then let back in."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from codistill.exports import Export
from codistill.loss import codistill_loss
from codistill.teachers.health import DROP, USE, TeacherGuard
from codistill.teachers.pool import TeacherPool
from model import build_model, preset_config

CFG = preset_config("lstm", "tiny", vocab_size=40)


def _pool(nan_peers=()):
    pool = TeacherPool(CFG, torch.device("cpu"))
    for peer in (1, 2):
        torch.manual_seed(peer)
        sd = build_model(CFG).state_dict()
        if peer in nan_peers:
            sd["head.weight"] = torch.full_like(sd["head.weight"], float("nan"))
        pool.load(peer, Export(step=10, meta={}, state_dict=sd))
    return pool


def test_a_teacher_with_non_finite_probabilities_is_left_out_of_the_average():
    x, y = torch.randint(0, 40, (2, 5)), torch.randint(0, 40, (2, 5))
    q, health = _pool(nan_peers=(2,)).probs([1, 2], x, targets=y, num_groups=3)
    good = F.softmax(_pool().modules[1](x), -1)
    assert torch.allclose(q, good, atol=1e-6)  # peer 2 left out, peer 1 alone (not halved)
    assert health[4 + 1].item() == 0 and health[4 + 2].item() == 1  # non-finite flags (groups 0..2 + fixed)
    assert math.isclose(health[1].item(), -good.gather(-1, y[..., None]).log().mean().item(), rel_tol=1e-5)
    q, _ = _pool(nan_peers=(1, 2)).probs([1, 2], x, targets=y, num_groups=3)
    assert torch.equal(q, torch.zeros_like(q))  # all left out: no distillation this step
    s = torch.randn(10, 40, requires_grad=True)
    loss, _ = codistill_loss(s, y.flatten(), q.reshape(-1, 40), alpha=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_a_dropped_teacher_still_runs_but_is_not_used():
    x, y = torch.randint(0, 40, (2, 5)), torch.randint(0, 40, (2, 5))
    pool = _pool()
    q, health = pool.probs([1, 2], x, targets=y, use=[1], num_groups=3)
    assert torch.allclose(q, F.softmax(pool.modules[1](x), -1), atol=1e-6)
    assert health[2].item() > 0  # peer 2 measured anyway
    q, health = pool.probs([2], x, targets=y, use=[], num_groups=3)
    assert q is None and health[2].item() > 0


def test_guard_drops_after_a_full_window_then_lets_a_passing_export_back():
    msgs = []
    guard = TeacherGuard([0], {0}, 2, max_ratio=3.0, window=3, log=lambda m, force=False: msgs.append(m))
    bad = {1: 7.0 + math.log(10)}  # 10x the student's perplexity
    for step in (1, 2):
        guard.observe(0, 7.0, bad, {})
        guard.apply(guard.proposals(), {1: 20}, step)
        assert not guard.excluded(0, 1)  # not on a partial window
    guard.observe(0, 7.0, bad, {})
    assert guard.proposals() == {(0, 1): DROP}
    guard.apply(guard.proposals(), {1: 20}, 3)
    assert guard.excluded(0, 1) and len(msgs) == 1 and "10.0x the student's" in msgs[0] and "g1@20" in msgs[0]
    guard.apply(guard.proposals(), {1: 20}, 4)
    assert len(msgs) == 1  # said once per change
    guard.observe(0, 7.0, {1: 7.1}, {})  # the same bad export measuring well: still dropped
    assert guard.proposals() == {(0, 1): DROP}
    guard.on_swap(1)                      # a newer export: probation, measured over a new window
    for _ in range(3):
        guard.observe(0, 7.0, {1: 7.2}, {})
    guard.apply(guard.proposals(), {1: 30}, 9)
    assert not guard.excluded(0, 1) and "passes again" in msgs[-1] and "g1@30" in msgs[-1]


def test_guard_counts_non_finite_batches_as_bad_and_never_judges_healthy_stale_teachers():
    guard = TeacherGuard([0], {0}, 2, max_ratio=3.0, window=2, log=lambda m, force=False: None)
    for _ in range(2):
        guard.observe(0, 7.0, {1: 7.0}, {1: True})
    assert guard.proposals() == {(0, 1): DROP}
    guard = TeacherGuard([0], {0}, 2, max_ratio=3.0, window=2, log=lambda m, force=False: None)
    for ratio in (1.6, 1.7, 2.9, 1.1):  # a stale but healthy peer
        guard.observe(0, 7.0, {1: 7.0 + math.log(ratio)}, {})
    assert guard.proposals() == {(0, 1): USE}
    off = TeacherGuard([0], {0}, 2, max_ratio=None, window=2, log=print)
    off.observe(0, 7.0, {1: 100.0}, {})
    assert off.proposals() == {} and not off.excluded(0, 1)


def test_non_leaders_follow_the_announced_state():
    follower = TeacherGuard([0], set(), 2, max_ratio=3.0, window=2, log=print)
    follower.observe(0, 7.0, {1: 100.0}, {})  # a non-leader's own batches decide nothing
    assert follower.proposals() == {}
    follower.apply({(0, 1): DROP}, {1: 20}, 5)
    assert follower.excluded(0, 1)
