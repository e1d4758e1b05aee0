"""Teachers that do not fit (issue 17), on one rank: top-K teacher distributions (the sparse loss
and its gradient against a dense reference), the pool's chunked top-K against its dense
average, and an offloaded teacher (weights in host memory, on the device only during a
submodule's forward, every parameter moved once per forward). The partitioned (ZeRO-3) teacher
and the matrix of placements x dtypes x architectures need a group of ranks:
tests/scripts/teacher_modes.py, run by tests/e2e/test_teachers_placement.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codistill.exports import Export
from codistill.loss import TopK, chunk_rows, codistill_loss, topk_of
from codistill.teachers.pool import TeacherPool
from model import build_model, preset_config

V = 40
CFG = preset_config("lstm", "tiny", vocab_size=V)
TCFG = preset_config("transformer", "tiny", vocab_size=V)


def _llama(tied: bool):
    from transformers import LlamaConfig

    from model import hf_model_config
    return hf_model_config(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=tied).to_dict(), max_seq_len=64)


def _dense_of(t: TopK, v: int) -> torch.Tensor:
    """The reference: the sparse distribution written out densely (rest spread uniformly)."""
    k = t.values.shape[-1]
    u = t.rest / (v - k) if v > k else torch.zeros_like(t.rest)
    q = u[..., None].expand(*t.rest.shape, v).clone()
    return q.scatter_(-1, t.indices, t.values)


def _case(n=37, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    q = F.softmax(2 * torch.randn(n, v, generator=g), -1)
    return s, y, q


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_with_k_equal_to_v_is_the_dense_loss(temperature):
    s, y, q = _case()
    dense, st_d = codistill_loss(s, y, q, 0.7, temperature, 0.1, chunk_tokens=8)
    g_dense, = torch.autograd.grad(dense, s)
    sparse, st_s = codistill_loss(s, y, topk_of(q, 50), 0.7, temperature, 0.1, chunk_tokens=8)
    g_sparse, = torch.autograd.grad(sparse, s)
    # equal up to float32 rounding: the two paths sum in another order, which vectorised kernels
    # (AVX2 vs AVX-512) may or may not make bit-identical (1 ulp apart on some CPUs)
    torch.testing.assert_close(sparse, dense, rtol=2e-7, atol=0)
    torch.testing.assert_close(g_sparse, g_dense, rtol=0, atol=1e-8)
    torch.testing.assert_close(st_s.values[:3], st_d.values[:3], rtol=0, atol=1e-6)  # ce, psi, agreement


@pytest.mark.parametrize("k,temperature", [(1, 1.0), (5, 1.0), (10, 2.0), (49, 1.0)])
def test_top_k_loss_and_gradient_match_the_dense_form_of_the_sparse_distribution(k, temperature):
    s, y, q = _case(seed=k)
    t = topk_of(q, k)
    assert torch.allclose(t.values.sum(-1) + t.rest, torch.ones(37), atol=1e-6)
    assert torch.equal(t.indices[:, 0], q.argmax(-1))
    loss, st = codistill_loss(s, y, t, 0.7, temperature, 0.1, chunk_tokens=8)
    grad, = torch.autograd.grad(loss, s)
    ref_q = _dense_of(t, 50)
    ref, ref_st = codistill_loss(s, y, ref_q, 0.7, temperature, 0.1, chunk_tokens=8)
    ref_grad, = torch.autograd.grad(ref, s)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(st.values, ref_st.values, rtol=1e-5, atol=1e-5)  # incl. KL (entropy of q)
    # and by autograd: psi of the reference distribution, written from scratch
    s2 = s.detach().clone().requires_grad_()
    logp = F.log_softmax(s2, -1)
    ce = F.cross_entropy(s2, y, label_smoothing=0.1)
    psi = -(ref_q * F.log_softmax(s2 / temperature, -1)).sum(-1).mean() * temperature ** 2
    (ce + 0.7 * psi).backward()
    torch.testing.assert_close(grad, s2.grad, rtol=1e-4, atol=1e-7)
    assert logp.shape == s.shape
    if k < 49:  # (K = V - 1 is exact: the one token off the top K gets the whole rest)
        dense, _ = codistill_loss(s, y, q, 0.7, temperature, 0.1)
        assert abs(dense.item() - loss.item()) > 1e-6


def test_chunks_are_sized_in_bytes():
    assert chunk_rows(50_000, 32) == 32 * 2**20 // (4 * 50_000)   # 167 tokens at a 50 k vocabulary
    assert chunk_rows(2000, 32) == 4194
    assert chunk_rows(10**9, 1) == 1


def _pool(placement="full", topk=0, cfg=CFG, chunk_mb=32.0, nan_peers=(), device="cpu"):
    pool = TeacherPool(cfg, torch.device(device), placement=placement, topk=topk, chunk_mb=chunk_mb)
    for peer in (1, 2):
        torch.manual_seed(peer)
        sd = build_model(cfg).state_dict()
        if peer in nan_peers:
            sd = dict(sd)
            key = "head.weight" if "head.weight" in sd else next(k for k in sd if k.endswith("lm_head.weight"))
            sd[key] = torch.full_like(sd[key], float("nan"))
        pool.load(peer, Export(step=10, meta={}, state_dict=sd))
    return pool


@pytest.mark.parametrize("cfg", [CFG, TCFG], ids=["lstm", "transformer"])
def test_pool_top_k_is_the_top_k_of_the_dense_average_chunk_by_chunk(cfg):
    x, y = torch.randint(0, V, (3, 7)), torch.randint(0, V, (3, 7))
    q, health = _pool(cfg=cfg).probs([1, 2], x, 2.0, y, num_groups=3)
    # 0.0005 MiB = 131 tokens of V=40 fp32... make chunks of a few tokens to cross boundaries
    t, t_health = _pool(topk=5, cfg=cfg, chunk_mb=4 * V * 4 / 2**20).probs([1, 2], x, 2.0, y, num_groups=3)
    ref = topk_of(q.reshape(-1, V), 5)
    torch.testing.assert_close(t.values.reshape(-1, 5), ref.values, rtol=1e-5, atol=1e-6)
    assert torch.equal(t.indices.reshape(-1, 5), ref.indices)
    torch.testing.assert_close(t.rest.reshape(-1), ref.rest, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t_health, health, rtol=1e-5, atol=1e-6)
    full, _ = _pool(topk=V, cfg=cfg).probs([1, 2], x, 2.0, y, num_groups=3)
    torch.testing.assert_close(_dense_of(full, V), q, rtol=1e-5, atol=1e-7)


def test_pool_top_k_leaves_a_non_finite_teacher_out():
    x, y = torch.randint(0, V, (2, 5)), torch.randint(0, V, (2, 5))
    t, health = _pool(topk=4, nan_peers=(2,)).probs([1, 2], x, targets=y, num_groups=3)
    alone = topk_of(F.softmax(_pool().modules[1](x), -1).reshape(-1, V), 4)
    torch.testing.assert_close(t.values.reshape(-1, 4), alone.values, rtol=1e-5, atol=1e-6)
    assert health[4 + 1].item() == 0 and health[4 + 2].item() == 1
    t, _ = _pool(topk=4, nan_peers=(1, 2)).probs([1, 2], x, targets=y, num_groups=3)
    assert t.values.abs().sum() == 0 and t.rest.abs().sum() == 0  # no distillation
    s = torch.randn(10, V, requires_grad=True)
    loss, _ = codistill_loss(s, y.flatten(), t, alpha=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("cfg", [CFG, TCFG], ids=["lstm", "transformer"])
def test_offloaded_teacher_computes_what_the_full_teacher_does_and_holds_nothing_between_forwards(cfg):
    x, y = torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 6))
    full, off = _pool(cfg=cfg), _pool("offload", cfg=cfg)
    q_full, h_full = full.probs([1, 2], x, targets=y, num_groups=3)
    q_off, h_off = off.probs([1, 2], x, targets=y, num_groups=3)
    assert torch.equal(q_off, q_full) and torch.equal(h_off, h_full)
    assert off.resident_bytes() < 0.01 * full.resident_bytes()  # parameters off the device between forwards
    assert all(p.numel() == 0 for p in off.modules[1].parameters())
    t_off, _ = _pool("offload", topk=5, cfg=cfg).probs([1, 2], x, targets=y, num_groups=3)
    t_full, _ = _pool(topk=5, cfg=cfg).probs([1, 2], x, targets=y, num_groups=3)
    assert torch.equal(t_off.values, t_full.values) and torch.equal(t_off.indices, t_full.indices)
    # a new export goes into the host copies
    torch.manual_seed(9)
    sd = build_model(cfg).state_dict()
    off.load(1, Export(step=20, meta={}, state_dict=sd))
    full.load(1, Export(step=20, meta={}, state_dict=sd))
    assert torch.equal(off.probs([1], x)[0], full.probs([1], x)[0])


def test_top_k_refuses_an_hf_model_whose_logits_are_not_its_head(tmp_path):
    import json

    from model import ModelConfig
    from model.hf import read_hf_config
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps({"model_type": "gemma2", "vocab_size": V, "hidden_size": 16, "intermediate_size": 32,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                    "head_dim": 8, "final_logit_softcapping": 0.5}))
    hf = ModelConfig(arch="hf", vocab_size=V, hf_config=read_hf_config(cfg_path))
    with pytest.raises(ValueError, match="--teacher_topk"):
        TeacherPool(hf, torch.device("cpu"), topk=4).reserve([1])
    cfg_path.write_text(json.dumps({"model_type": "gpt2", "vocab_size": V, "n_embd": 16, "n_layer": 1, "n_head": 2}))
    ok = ModelConfig(arch="hf", vocab_size=V, hf_config=read_hf_config(cfg_path))
    TeacherPool(ok, torch.device("cpu"), topk=4).reserve([1])


@pytest.mark.parametrize("arch", ["lstm", "transformer_untied", "transformer_tied", "llama_tied", "llama_untied"])
@pytest.mark.parametrize("topk", [0, 5], ids=["dense", "topk"])
def test_offloaded_teacher_moves_each_parameter_to_the_device_once_per_forward(arch, topk):
    """Bytes copied to the device per probs() call = the unique parameter bytes: a tied
    embedding/head matrix once (it was fetched by the embedding and again by the head), and with
    top-K the head's weight once between the body-only forward and the chunked heads."""
    cfg = {"lstm": CFG, "transformer_untied": preset_config("transformer", "tiny", V, tie_embeddings=False),
           "transformer_tied": TCFG, "llama_tied": _llama(True), "llama_untied": _llama(False)}[arch]
    x, y = torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 6))
    full = _pool(topk=topk, cfg=cfg)
    unique = sum(p.numel() * p.element_size() for p in full.modules[1].parameters())  # tied: one Parameter
    tied = cfg.tie_embeddings or (cfg.hf_config or {}).get("tie_word_embeddings", False)
    assert (len(list(full.modules[1].parameters())) < len(full.modules[1].state_dict())) == tied
    q_full, h_full = full.probs([1], x, targets=y, num_groups=3)
    q_full = q_full.clone() if not topk else TopK(q_full.values.clone(), q_full.indices.clone(), q_full.rest.clone())
    # prefetch: the CUDA side-stream bookkeeping (the next submodule's copy queued during the current
    # one's forward, in the order the last forward of the kind ran), with synchronous copies on the CPU
    for prefetch in (False, True):
        off = _pool("offload", topk=topk, cfg=cfg)
        teacher = off.teachers[1]
        teacher.prefetch = prefetch
        for i in range(3):
            before, ahead = teacher.bytes_moved, teacher.prefetched_bytes
            q_off, h_off = off.probs([1], x, targets=y, num_groups=3)
            assert teacher.bytes_moved - before == unique, (prefetch, i)
            # once the order is known (a forward of the kind ran), most weights are copied ahead
            if i > 0:
                assert (teacher.prefetched_bytes - ahead > unique // 2) == prefetch, (prefetch, i)
            assert all(p.numel() == 0 for p in off.modules[1].parameters())  # nothing left on the device
            if topk:
                assert torch.equal(q_off.values, q_full.values) and torch.equal(q_off.indices, q_full.indices)
            else:
                assert torch.equal(q_off, q_full)
            assert torch.equal(h_off, h_full)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run `pytest -m gpu` on a GPU node")
@pytest.mark.parametrize("arch", ["lstm", "llama_tied", "llama_untied"])
@pytest.mark.parametrize("topk", [0, 5], ids=["dense", "topk"])
def test_offloaded_teacher_prefetches_on_a_side_stream_and_computes_what_the_full_teacher_does(arch, topk):
    """On CUDA: pinned host weights, the next submodule copied on a side stream while the current
    one computes; many forwards and a swap in between (the allocator reusing the copies' memory,
    receive writing the host copies) give the full teacher's probabilities, moving each parameter once."""
    cfg = {"lstm": CFG, "llama_tied": _llama(True), "llama_untied": _llama(False)}[arch]
    x, y = torch.randint(0, V, (4, 32), device="cuda"), torch.randint(0, V, (4, 32), device="cuda")
    full, off = _pool(topk=topk, cfg=cfg, device="cuda"), _pool("offload", topk=topk, cfg=cfg, device="cuda")
    teacher = off.teachers[1]
    assert teacher.stream is not None and all(t.is_pinned() for t in teacher.host.values())
    unique = sum(p.numel() * p.element_size() for p in full.modules[1].parameters())
    for i in range(12):
        if i == 6:  # a new export into the host copies while earlier copies may still be queued
            torch.manual_seed(9)
            sd = build_model(cfg).state_dict()
            for pool in (full, off):
                pool.load(1, Export(step=20, meta={}, state_dict=sd))
        before = teacher.bytes_moved
        q_off, h_off = off.probs([1], x, targets=y, num_groups=3)
        q_off = q_off.values.clone() if topk else q_off.clone()
        assert teacher.bytes_moved - before == unique
        q_full, h_full = full.probs([1], x, targets=y, num_groups=3)
        torch.testing.assert_close(q_off, q_full.values if topk else q_full, rtol=0, atol=1e-6)
        torch.testing.assert_close(h_off, h_full, rtol=0, atol=1e-5)
    assert teacher.prefetched_bytes > 0


@pytest.mark.parametrize("arch", ["lstm", "llama_tied"])
def test_an_offloaded_teachers_host_weights_are_one_exact_pinned_block(arch):
    """--teacher_offload on a CUDA student: the teacher's parameters are views into one host block
    of exactly their bytes (each start 512-aligned), registered once (exports.pinned_copies) - not
    per-tensor pin_memory(), which rounds each up to a power of two and keeps the blocks cached -
    with the values of an unpinned build, a tied matrix once; the block is unregistered when the
    teacher is dropped. On a CPU: the registration recorded (FakePinning, test_hostile_files)."""
    import gc

    from test_hostile_files import FakePinning

    from codistill.teachers.pool import build_frozen
    cfg = {"lstm": CFG, "llama_tied": _llama(True)}[arch]
    pins = FakePinning()
    torch.manual_seed(0)
    plain = build_frozen(cfg, torch.device("cpu"), dtype=torch.bfloat16)
    torch.manual_seed(0)
    pinned = build_frozen(cfg, torch.device("cpu"), dtype=torch.bfloat16, pin=pins)
    params = list(pinned.parameters())  # tied weights once
    nbytes = [p.numel() * p.element_size() for p in params]
    assert len(pins.pinned) == 1
    (ptr, size), = pins.pinned.items()
    assert sum(nbytes) <= size < sum(nbytes) + 512 * len(params)
    assert all(ptr <= p.data_ptr() and p.data_ptr() + n <= ptr + size for p, n in zip(params, nbytes))
    assert {p.dtype for p in params} == {torch.bfloat16}
    for (k, a), (_, b) in zip(plain.state_dict().items(), pinned.state_dict().items()):
        assert torch.equal(a, b) and a.dtype == b.dtype, k
    if arch == "llama_tied":
        sd = pinned.state_dict()
        assert sd["hf.model.embed_tokens.weight"].data_ptr() == sd["hf.lm_head.weight"].data_ptr()
        del sd
    assert all(b.data_ptr() < ptr or b.data_ptr() >= ptr + size for b in pinned.buffers())  # buffers: not pinned
    del pinned, params
    gc.collect()
    assert pins.unpinned == [ptr]
