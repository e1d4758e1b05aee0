"""--peer_models any: a teacher of another architecture or size (the model its export declares),
on the same tokenizer; refused when the declaration is invalid, contradicts itself or its
tensors, or has another vocabulary. codistill/teachers/pool.py declared_config, TeacherPool."""
import time

import pytest
import torch
from conftest import CFG, TOK, Log, e2e_args, export_meta, load_script
from conftest import write_test_export as _export

from codistill.exports import read_export, write_export
from codistill.layout import exports_dir
from codistill.loss import topk_of
from codistill.teachers.loader import TeacherLoader
from codistill.teachers.pool import TeacherPool
from fileio import ExportError
from model import build_model, preset_config

TRANSFORMER = preset_config("transformer", "tiny", vocab_size=CFG.vocab_size)  # CFG: the tiny LSTM, vocab 64


def _take(loader, peer=1, deadline=10.0):
    t = time.time() + deadline
    while time.time() < t:
        exp = loader.take(peer)
        if exp is not None:
            return exp
        time.sleep(0.02)
    raise AssertionError("the loader never handed an export over")


def _probs(cfg, sd, x):
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    m.load_state_dict(sd)
    with torch.no_grad():
        return torch.softmax(m(x).float(), -1)


def test_a_peer_of_another_architecture_teaches_its_own_function_and_may_change_model(tmp_path):
    """An LSTM student's pool loads a Transformer peer's export through the real loader and
    computes that Transformer's probabilities (dense and top-K, with the LSTM's carried states
    given); the peer then restarts as an LSTM and its teacher is rebuilt as one."""
    d = exports_dir(tmp_path, 1)
    sd_t = _export(d, 10, cfg=TRANSFORMER, seed=1)
    dense = TeacherPool(CFG, torch.device("cpu"), peer_models="any")
    topk = TeacherPool(CFG, torch.device("cpu"), peer_models="any", topk=8)
    dense.reserve([1])
    assert dense.configs == {}  # nothing is built before the peer's model is known
    loader = TeacherLoader(tmp_path, [1], dense.config_hash, TOK, mode="latest", poll_interval=0.02,
                           log=lambda m: None, expect=dense.expect)
    x = torch.randint(0, CFG.vocab_size, (2, 12))
    try:
        exp = _take(loader)
        assert exp.step == 10 and exp.meta["model_config"]["arch"] == "transformer"
        for pool in (dense, topk):
            pool.swap({1: (10, exp)})
            assert pool.configs[1] == TRANSFORMER and pool.steps[1] == 10
        want = _probs(TRANSFORMER, sd_t, x)
        q, _ = dense.probs([1], x, states={})  # --carry_state: a Transformer teacher sees the window alone
        torch.testing.assert_close(q, want)
        qk, _ = topk.probs([1], x)
        ref = topk_of(want.reshape(-1, CFG.vocab_size), 8)
        torch.testing.assert_close(qk.values.reshape(-1, 8), ref.values)
        assert torch.equal(qk.indices.reshape(-1, 8), ref.indices)

        time.sleep(0.05)
        sd_l = _export(d, 20, cfg=CFG, seed=2)  # the peer restarted with another --model
        exp = _take(loader)
        assert exp.step == 20
        dense.swap({1: (20, exp)})
        assert dense.configs[1] == CFG and dense.steps[1] == 20
        torch.testing.assert_close(dense.probs([1], x)[0], _probs(CFG, sd_l, x))
    finally:
        loader.close()


def test_same_refuses_another_model_and_names_the_flag(tmp_path):
    d = exports_dir(tmp_path, 1)
    _export(d, 10, cfg=TRANSFORMER)
    pool = TeacherPool(CFG, torch.device("cpu"))  # --peer_models same (the default)
    with pytest.raises(ExportError, match="--peer_models any"):
        read_export(d, 10, pool.config_hash, TOK, expect=pool.expect)
    read_export(d, 10, TeacherPool(CFG, torch.device("cpu"), peer_models="any").config_hash, TOK)  # any: read


def _meta(**change):
    meta = export_meta(TRANSFORMER)
    meta.update(change)
    return meta


@pytest.mark.parametrize("meta, why", [
    (_meta(model_config=None), "declares no model_config"),
    (_meta(model_config={**TRANSFORMER.to_dict(), "arch": "rnn"}), "not a valid model config"),
    (_meta(model_config={**TRANSFORMER.to_dict(), "n_heads": "four"}), "not a valid model config"),
    (_meta(model_config={**TRANSFORMER.to_dict(), "bogus": 1}), "not a valid model config"),
    (_meta(model_config_hash=CFG.config_hash()), "contradicts itself"),
    (export_meta(preset_config("transformer", "tiny", vocab_size=80)), "share the tokenizer"),
], ids=["missing", "arch", "type", "key", "hash", "vocab"])
def test_any_refuses_a_declaration_it_cannot_trust(tmp_path, meta, why):
    """The declared model is the peer's word: it must be a valid config, hash to what it claims
    and have the student's vocabulary - each refusal names the export and what is wrong."""
    d = exports_dir(tmp_path, 1)
    sd = build_model(TRANSFORMER).state_dict()
    write_export(d, 10, sd, meta)
    pool = TeacherPool(CFG, torch.device("cpu"), peer_models="any")
    with pytest.raises(ExportError, match=why) as e:
        read_export(d, 10, pool.config_hash, TOK, expect=pool.expect)
    assert "step_" in str(e.value)  # names the file


def test_any_refuses_tensors_that_are_not_the_declared_model(tmp_path):
    """An export declaring a Transformer whose tensors are an LSTM's is refused on its header."""
    d = exports_dir(tmp_path, 1)
    write_export(d, 10, build_model(CFG).state_dict(), export_meta(TRANSFORMER))
    pool = TeacherPool(CFG, torch.device("cpu"), peer_models="any")
    with pytest.raises(ExportError):
        read_export(d, 10, pool.config_hash, TOK, expect=pool.expect)


def test_a_fixed_teacher_of_another_model_needs_peer_models_any(sample_data, tmp_path):
    """--teacher PATH holding a Transformer for an LSTM student (offline distillation from another
    architecture): refused before anything is written, naming --peer_models any; accepted with it,
    its tensors checked against the model it declares."""
    from codistill.data import TokenData
    tl = load_script("train_lm")
    data = TokenData(sample_data)
    teacher = preset_config("transformer", "tiny", vocab_size=data.vocab_size)
    _export(exports_dir(tmp_path / "teacher", 0), 10, cfg=teacher, tok=data.tokenizer_sha256)
    args = [*e2e_args(sample_data, tmp_path / "run", num_groups=1, teacher=tmp_path / "teacher" / "group_0")]
    plan = tl.plan_run(tl.parse_args(args), Log())
    with pytest.raises(ExportError, match="--peer_models any"):
        tl.load_inputs(plan, Log())
    plan = tl.plan_run(tl.parse_args([*args, "--peer_models", "any"]), Log())
    _, model_cfg, fixed = tl.load_inputs(plan, Log())
    assert model_cfg.arch == "lstm" and fixed.step == 10 and fixed.meta["model_config"]["arch"] == "transformer"
    assert not (tmp_path / "run").exists()


def test_a_teacher_of_another_model_takes_a_bf16_students_working_dtype(tmp_path):
    """Under bf16 (DeepSpeed casts the student's parameters, keeps buffers fp32) a Transformer teacher
    of an LSTM student has no tensor names in common with it: its parameters get the student's
    majority dtype (bf16), its RoPE table stays fp32 as the Transformer computes it."""
    d = exports_dir(tmp_path, 1)
    _export(d, 10, cfg=TRANSFORMER)
    student = build_model(CFG).to(torch.bfloat16)
    pool = TeacherPool(CFG, torch.device("cpu"), like=student, peer_models="any")
    pool.load(1, read_export(d, 10, pool.config_hash, TOK, expect=pool.expect))
    teacher = pool.modules[1]
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    buffers = dict(teacher.named_buffers())
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values()), {k: b.dtype for k, b in buffers.items()}
    q, _ = pool.probs([1], torch.randint(0, CFG.vocab_size, (2, 8)))
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
