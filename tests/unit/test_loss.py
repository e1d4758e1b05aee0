"""The codistillation loss against hand computation."""
import math

import pytest
import torch
import torch.nn.functional as F

from codistill.exports import Export
from codistill.loss import codistill_loss, distill_alpha, row_argmax
from codistill.teachers.pool import TeacherPool
from model import build_model, preset_config


def _inputs(n=23, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    q = F.softmax(torch.randn(n, v, generator=g), -1)
    return s, y, q


def test_equals_hand_computed_small_example():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    q = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    loss, st = codistill_loss(s, y, q, alpha=0.5)
    p = [[math.exp(a) / sum(math.exp(b) for b in row) for a in row] for row in s.tolist()]
    ce = -(math.log(p[0][0]) + math.log(p[1][2])) / 2
    psi = -sum(qi * math.log(pi) for qr, pr in zip(q.tolist(), p) for qi, pi in zip(qr, pr)) / 2
    assert loss.item() == pytest.approx(ce + 0.5 * psi, abs=1e-6)
    assert st.ce == pytest.approx(ce, abs=1e-6) and st.distill == pytest.approx(psi, abs=1e-6)
    assert st.agreement == pytest.approx(0.5)  # row 0 agrees (argmax 0), row 1 does not (0 vs 2)
    kl = sum(qi * math.log(qi / pi) for qr, pr in zip(q.tolist(), p) for qi, pi in zip(qr, pr)) / 2
    assert st.kl == pytest.approx(kl, abs=1e-6)  # what the logs show: psi less the teacher's entropy


def test_kl_is_zero_when_the_student_is_the_teacher():
    s, y, _ = _inputs(v=50)
    for t in (1.0, 2.0):
        _, st = codistill_loss(s, y, F.softmax(s.detach() / t, -1), temperature=t)
        assert abs(st.kl) < 1e-5 and st.distill > 1.0


@pytest.mark.parametrize("alpha,temp,ls", [(1.0, 1.0, 0.0), (0.3, 2.0, 0.0), (1.0, 1.0, 0.1), (2.0, 1.0, 0.1)])
@pytest.mark.parametrize("v", [7, 300])
def test_matches_autograd_reference(alpha, temp, ls, v):
    s, y, q = _inputs(v=v)
    loss, _ = codistill_loss(s, y, q, alpha, temp, ls, chunk_tokens=4)
    loss.backward()
    g = s.grad.clone()
    s.grad = None
    ref = F.cross_entropy(s, y, label_smoothing=ls) - alpha * temp ** 2 * (q * F.log_softmax(s / temp, -1)).sum(-1).mean()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(g, s.grad, atol=1e-6)


@pytest.mark.parametrize("v", [1, 63, 64, 128, 300, 8000])
def test_row_argmax_is_argmax(v):
    g = torch.Generator().manual_seed(v)
    for x in (torch.randn(37, v, generator=g),                        # distinct values
              torch.randint(0, 3, (37, v), generator=g).float(),      # many ties: the first index wins
              torch.full((5, v), -1.0).index_fill_(1, torch.tensor([v - 1]), 2.0)):  # maximum in the tail
        assert torch.equal(row_argmax(x), x.argmax(-1))
    assert torch.equal(row_argmax(x.bfloat16()), x.bfloat16().argmax(-1))


def test_agreement_counts_top1_matches():
    s, y, q = _inputs(n=64, v=300)
    _, st = codistill_loss(s, y, q, 1.0, chunk_tokens=10)
    assert st.agreement == pytest.approx((s.argmax(-1) == q.argmax(-1)).float().mean().item())
    _, st = codistill_loss(s, y, F.softmax(s.detach() * 3, -1), 1.0)
    assert st.agreement == 1.0


def test_alpha_zero_is_exactly_the_baseline():
    s, y, q = _inputs()
    base, _ = codistill_loss(s, y, None)
    base.backward()
    g_base = s.grad.clone()
    s.grad = None
    with_teacher, _ = codistill_loss(s, y, q, alpha=0.0)
    with_teacher.backward()
    assert with_teacher.item() == base.item()
    assert torch.equal(s.grad, g_base)
    assert base.item() == pytest.approx(F.cross_entropy(s, y).item(), abs=1e-6)


def test_chunked_equals_unchunked():
    s, y, q = _inputs(n=50)
    results = []
    for chunk in (1, 7, 50, 4096):
        s.grad = None
        loss, st = codistill_loss(s, y, q, 1.0, chunk_tokens=chunk)
        loss.backward()
        results.append((loss.item(), s.grad.clone(), st))
    for loss, grad, _ in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-5)
        assert torch.allclose(grad, results[0][1], atol=1e-7)


def test_no_gradient_reaches_a_teacher():
    cfg = preset_config("lstm", "tiny", vocab_size=50)
    torch.manual_seed(0)
    student, teacher_src = build_model(cfg), build_model(cfg)
    pool = TeacherPool(cfg, torch.device("cpu"))
    pool.load(1, Export(step=5, meta={}, state_dict=teacher_src.state_dict()))
    x = torch.randint(0, 50, (2, 8))
    q, _ = pool.probs([1], x)
    loss, _ = codistill_loss(student(x), torch.randint(0, 50, (2, 8)), q, alpha=1.0)
    loss.backward()
    teacher = pool.modules[1]
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert all(p.grad is not None for p in student.parameters())


def test_teacher_probs_average_peers():
    cfg = preset_config("lstm", "tiny", vocab_size=40)
    pool = TeacherPool(cfg, torch.device("cpu"))
    for peer in (1, 2):
        torch.manual_seed(peer)
        pool.load(peer, Export(step=10 * peer, meta={}, state_dict=build_model(cfg).state_dict()))
    x = torch.randint(0, 40, (2, 5))
    both, _ = pool.probs([1, 2], x)
    expected = (F.softmax(pool.modules[1](x), -1) + F.softmax(pool.modules[2](x), -1)) / 2
    assert torch.allclose(both, expected, atol=1e-6)
    assert pool.active(student=1, step=30, max_staleness=None) == [2]
    assert pool.active(student=0, step=30, max_staleness=15) == [2]  # peer 1 (step 10) is 20 steps stale


def test_alpha_schedule():
    assert distill_alpha(10, 1.0, burn_in_steps=10) == 0.0
    assert distill_alpha(11, 1.0, burn_in_steps=10) == 1.0
    assert distill_alpha(15, 2.0, burn_in_steps=10, ramp_steps=10) == pytest.approx(1.0)
    assert distill_alpha(100, 2.0, burn_in_steps=10, ramp_steps=10) == 2.0
    assert distill_alpha(100, 0.0, burn_in_steps=0) == 0.0
