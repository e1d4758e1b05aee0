"""The analytic memory model of benchmarks/teacher_memory.py: its accounting against hand-computed
values, the scaling laws it claims, and its activation formula against what autograd saves."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from conftest import ROOT


@pytest.fixture(scope="module")
def tm():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark imports its sibling common.py
    spec = importlib.util.spec_from_file_location("teacher_memory", ROOT / "benchmarks" / "teacher_memory.py")
    mod = sys.modules["teacher_memory"] = importlib.util.module_from_spec(spec)  # dataclasses need it registered
    spec.loader.exec_module(mod)
    return mod


def test_llama_shapes_have_their_published_sizes(tm):
    assert tm.SHAPES["7b"].params == 6_738_415_616     # Llama 2 7B
    assert tm.SHAPES["70b"].params == 68_976_648_192   # Llama 2 70B
    assert round(tm.SHAPES["1b"].params / 1e9, 2) == 1.04


def test_shape_params_match_the_trainers_model(tm):
    from model import build_model, count_params, hf_model_config
    shape = tm.CONFIGS["W"][0]
    assert count_params(build_model(hf_model_config(shape.hf_config()))) == shape.params == 37_659_136


def test_zero3_student_is_18_bytes_per_param_over_n(tm):
    """bf16 weights 2 + fp32 master 4 + fp32 gradients 4 + Adam 8, all partitioned by ZeRO-3."""
    P, n = 10**9, 8
    state, step = tm.student_bytes(P, n, 3, 2, fused_adam=True, reduce_bucket=0, layer=0)
    assert sum(state.values()) == 18 * P // n
    assert sum(step.values()) == 0


def test_zero_stages_partition_what_deepspeed_partitions(tm):
    P, n = 8 * 10**9, 8
    s1, _ = tm.student_bytes(P, n, 1, 2, True, 0, 0)  # BF16_Optimizer: full bf16 weights and fp32 grads
    s2, _ = tm.student_bytes(P, n, 2, 2, True, 0, 0)
    assert sum(s1.values()) == (2 + 4) * P + 12 * P // n
    assert sum(s2.values()) == 2 * P + 16 * P // n
    s0, step0 = tm.student_bytes(P, 1, 0, 4, False, 0, 0)  # fp32 stage 0 on CPU: no master copy
    assert sum(s0.values()) + sum(step0.values()) == 20 * P  # 4 + 8 kept, 4 grads + 4 AdamW temporary per step
    with pytest.raises(ValueError):
        tm.student_bytes(P, 1, 0, 2, True, 0, 0)


def teacher_bytes(m) -> int:
    return sum(v for k, v in {**m.state, **m.host}.items() if k.startswith("teacher_weights"))


def test_partition_divides_teacher_weights_by_ranks_and_offload_moves_them_to_the_host(tm):
    shape = tm.SHAPES["7b"]
    full = tm.bytes_per_rank(shape, 8, 8, teachers="full")
    part = tm.bytes_per_rank(shape, 8, 8, teachers="partition")
    off = tm.bytes_per_rank(shape, 8, 8, teachers="offload")
    assert full.state["teacher_weights"] == 7 * shape.params * 2
    assert part.state["teacher_weights"] == full.state["teacher_weights"] // 8
    assert part.teacher["teacher_gathered"] == shape.largest_layer * 2
    assert "teacher_weights" not in off.state and off.host["teacher_weights_offloaded"] == 7 * shape.params * 2
    assert off.teacher["teacher_streamed"] == 2 * shape.largest_layer * 2
    assert teacher_bytes(full) == teacher_bytes(part) * 8 == teacher_bytes(off)
    with pytest.raises(ValueError):
        tm.bytes_per_rank(shape, 2, 1, teachers="partition")


def test_topk_probabilities_scale_with_k_not_vocab(tm):
    small, big = tm.SHAPES["125m"], tm.Shape("v128k", 128256, 768, 12, 12, 12, 2048, tied=False)
    B, T, K = 4, 2048, 64
    for shape in (small, big):
        m = tm.bytes_per_rank(shape, 4, 8, topk=K, micro_batch=B, seq=T)
        assert m.state["teacher_topk"] == B * T * (K * 12 + 4)
        assert "teacher_probs" not in m.state
    assert tm.bytes_per_rank(small, 4, 8, topk=2 * K).state["teacher_topk"] - B * T * 4 == \
        2 * (tm.bytes_per_rank(small, 4, 8, topk=K).state["teacher_topk"] - B * T * 4)
    dense = tm.bytes_per_rank(big, 4, 8, micro_batch=B, seq=T)
    assert dense.state["teacher_probs"] == dense.state["teacher_probs_spare"] == B * T * big.vocab * 4
    assert tm.bytes_per_rank(big, 2, 8).state["teacher_probs_spare"] == 0  # one teacher: one buffer


def test_hand_computed_7b_case(tm):
    """7B, ZeRO-3 over 8 ranks, 2 groups, full dense teachers, one sequence of 2048 tokens."""
    shape, GiB = tm.SHAPES["7b"], 2**30
    P, V, d, L, tokens = shape.params, 32000, 4096, 32, 2048
    m = tm.bytes_per_rank(shape, 2, 8, micro_batch=1, seq=tokens)
    state = 18 * P // 8 + int(5e8) * 2 + P * 2 + tokens * V * 4          # student, bucket, teacher, probs
    acts = int(tokens * d * (L * (2 * (8 + 2 + 4 * 11008 / 4096) + 4) + 3 * 2 + 4))
    step = shape.largest_layer * 2 + acts + 2 * tokens * V * 2 + 32 * 2**20
    assert m.device_peak == state + step
    assert round(m.device_peak / GiB, 1) == 40.0  # 27.9 GiB of states, 12.1 of the step
    assert m.host_peak == P * 2 + P * 2 + P * 4  # loader buffer + (at the end) final copy + fp32 hf model


def test_7b_with_8_groups_fits_80gb_only_partitioned_or_offloaded(tm):
    shape = tm.SHAPES["7b"]
    fits = {mode: tm.bytes_per_rank(shape, 8, 8, teachers=mode, micro_batch=1).fits for mode in tm.MODES}
    assert fits == {"full": False, "partition": True, "offload": True}
    assert tm.bytes_per_rank(shape, 1, 8, micro_batch=1).fits


def test_activation_checkpointing_keeps_layer_inputs(tm):
    shape = tm.SHAPES["70b"]
    full, ckpt = shape.activation_bytes(2048, 2), shape.activation_bytes(2048, 2, checkpointing=True)
    assert ckpt < full / 10
    assert ckpt > 2048 * shape.d_model * 2 * shape.n_layers


def saved_bytes(shape, tokens: int, dtype) -> int:
    """Bytes autograd saves in a forward of the trainer's Llama (parameters excluded)."""
    from model import build_model, hf_model_config
    model = build_model(hf_model_config(shape.hf_config())).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, shape.vocab, (2, tokens // 2)))
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,d_ff", [(4, 512), (1, 688)])
def test_activation_formula_matches_what_autograd_saves(tm, dtype, kv_heads, d_ff):
    shape = tm.Shape("probe", 500, 128, 3, 4, kv_heads, d_ff, tied=True)
    w = torch.finfo(dtype).bits // 8
    measured = saved_bytes(shape, 256, dtype)
    predicted = shape.activation_bytes(256, w)
    assert abs(predicted / measured - 1) < 0.03, (predicted, measured)
