"""recipes/evaluate.py, recipes/plot_runs.py and codistill/metrics.py.

Metrics are checked against numbers computed by hand; the scripts run on two tiny real
2-group runs (different seeds) shared by all tests of this module (one session fixture,
two launches).
"""
import json
import math
import shutil

import pytest
import torch
from conftest import launch, load_script, run_python

from codistill.metrics import Totals, churn_sums, count_words, count_words_in_tokens, ensemble_log_probs, nll_sum, ppl

evaluate = load_script("evaluate")
plot_runs = load_script("plot_runs")

SEQ, STEPS = 32, 20


@pytest.fixture(scope="session")
def two_runs(sample_data, tmp_path_factory):
    """Two tiny 2-group codistillation runs that differ only in --seed."""
    base = tmp_path_factory.mktemp("eval_runs")
    runs = []
    for seed in (1, 2):
        run_dir = base / f"seed{seed}"
        launch(["--ds_config", "ds_configs/zero2.json", "--data", sample_data, "--run_dir", run_dir,
                "--max_steps", STEPS, "--export_every", 10, "--burn_in_steps", 5, "--eval_every", 10,
                "--save_every", STEPS, "--eval_batches", 2, "--seq_len", SEQ, "--log_every", 10,
                "--seed", seed])
        runs.append(run_dir)
    return runs


def lp(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()


# ------------------------------------------------------------------ metrics, by hand

def test_nll_ppl_and_word_ppl_by_hand():
    logp = lp([0.5, 0.25, 0.25], [0.25, 0.25, 0.5])
    y = torch.tensor([0, 1])
    assert nll_sum(logp, y) == pytest.approx(math.log(2) + math.log(4))   # = ln 8
    t = Totals()
    t.add_nll(logp, y)
    m = t.model_metrics(words=1)
    assert m["loss"] == pytest.approx(math.log(8) / 2) and m["ppl"] == pytest.approx(math.sqrt(8))
    assert m["word_ppl"] == pytest.approx(8.0)                               # 2 tokens make 1 word
    assert ppl(math.log(8), 3) == pytest.approx(2.0)


def test_word_count_by_hand(sample_data):
    assert count_words(["the cat  sat\n", " on\tthe mat ", ""]) == 6
    pieces = {3: "▁the", 4: "▁ca", 5: "t", 6: "▁sat", 2: "<eos>"}
    decode = lambda ids: "".join(pieces[i] for i in ids).replace("▁", " ")  # noqa: E731
    # "the cat" EOS "sat" (a piece cut by the window end counts as its words)
    assert count_words_in_tokens([3, 4, 5, 2, 6], eos_id=2, decode=decode) == (3, 1)
    import sentencepiece as spm

    from codistill.data import TokenData
    data = TokenData(sample_data)
    sp = spm.SentencePieceProcessor()
    sp.Load(str(data.tokenizer_path))
    ids = sp.EncodeAsIds("The cat sat, quietly.") + [data.eos_id] + sp.EncodeAsIds("On the mat")
    assert count_words_in_tokens(ids, data.eos_id, sp.DecodeIds) == (7, 1)


def test_churn_and_ensemble_by_hand():
    a, b, y = lp([0.6, 0.4]), lp([0.2, 0.8]), torch.tensor([1])
    c = churn_sums(a, b, y)
    assert c["abs_diff"] == pytest.approx(0.4)
    assert c["top1_disagree"] == 1
    # (KL(a||b) + KL(b||a)) / 2 = 0.5 * sum (pa - pb)(ln pa - ln pb) = 0.5 * (0.4 ln3 - 0.4 ln0.5) = 0.2 ln 6
    assert c["sym_kl"] == pytest.approx(0.2 * math.log(6))
    kl = lambda p, q: (p.exp() * (p - q)).sum().item()  # noqa: E731
    assert c["sym_kl"] == pytest.approx((kl(a, b) + kl(b, a)) / 2)
    ens = ensemble_log_probs([a, b])
    assert ens.exp()[0].tolist() == pytest.approx([0.4, 0.6])                # mean of probabilities
    assert nll_sum(ens, y) == pytest.approx(-math.log(0.6))
    assert churn_sums(a, a, y) == {"abs_diff": 0.0, "top1_disagree": 0, "sym_kl": 0.0}


# ------------------------------------------------------------------ evaluate.py on real runs

def test_evaluate_compare_runs(two_runs, tmp_path):
    a, b = two_runs
    out_json = tmp_path / "sub" / "eval.json"
    proc = run_python(["recipes/evaluate.py", "--run_dir", a, "--compare", b, "--max_tokens", 1024,
                       "--state", "fresh", "--json", out_json])
    assert proc.returncode == 0, proc.stderr
    assert "prediction churn" in proc.stdout and "seed1/group_0 vs seed2/group_0" in proc.stdout
    res = json.loads(out_json.read_text())
    assert res["tokens"] == 1024 and res["windows"] == 1024 // SEQ and res["words"] > 100
    assert res["state_mode"] == "fresh"
    assert res["git_commit"] and "recipes/evaluate.py" in res["command"]
    assert set(res["groups"]) == {"seed1/group_0", "seed1/group_1", "seed2/group_0", "seed2/group_1"}
    # the first 1024 tokens in windows of 32 are exactly training's eval set (2 batches x 16):
    # the same val ppl as the run's own last evaluation
    for run, label in ((a, "seed1"), (b, "seed2")):
        summary = json.loads((run / "summary.json").read_text())
        for g in (0, 1):
            m = res["groups"][f"{label}/group_{g}"]
            assert m["ppl"] == pytest.approx(summary["groups"][f"group_{g}"]["val_ppl"], rel=1e-4)
            assert m["ppl"] == pytest.approx(math.exp(m["loss"]))
            assert m["word_ppl"] == pytest.approx(math.exp(m["loss"] * 1024 / res["words"]))
    assert set(res["ensembles"]) == {"seed1", "seed2"}
    pairs = {(c["a"], c["b"]): c for c in res["churn"]}
    assert set(pairs) == {("seed1/group_0", "seed1/group_1"), ("seed2/group_0", "seed2/group_1"),
                          ("seed1/group_0", "seed2/group_0"), ("seed1/group_1", "seed2/group_1"),
                          ("seed1/ensemble", "seed2/ensemble")}
    for c in pairs.values():   # different seeds (and groups on different shards) disagree
        assert c["mean_abs_p_diff"] > 0 and c["top1_disagreement"] > 0 and c["sym_kl"] > 0
        assert c["tokens"] == 1024


def test_self_churn_is_zero_and_self_ensemble_is_the_model(two_runs, tmp_path):
    a, _ = two_runs
    # a run whose two groups are the same model (group_0 of run A)
    same = tmp_path / "same"
    for g in (0, 1):
        shutil.copytree(a / "group_0" / "final", same / f"group_{g}" / "final")
    shutil.copy(a / "config.json", same / "config.json")
    res = evaluate.main(["--run_dir", str(same), "--compare", str(a), "--max_tokens", 2048, "--batch_size", 7])
    single = res["groups"]["same/group_0"]
    assert res["ensembles"]["same"]["ppl"] == pytest.approx(single["ppl"], rel=1e-6)
    assert res["groups"]["seed1/group_0"]["ppl"] == pytest.approx(single["ppl"], rel=1e-6)
    pairs = {(c["a"], c["b"]): c for c in res["churn"]}
    for key in (("same/group_0", "same/group_1"), ("same/group_0", "seed1/group_0")):
        c = pairs[key]
        assert c["mean_abs_p_diff"] == pytest.approx(0, abs=1e-7)
        assert c["top1_disagreement"] == 0
        assert c["sym_kl"] == pytest.approx(0, abs=1e-7)
    assert pairs[("same/group_1", "seed1/group_1")]["sym_kl"] > 0   # group_1 of A is another model


def test_carried_state_evaluation_is_one_call_over_each_row(two_runs):
    """The LSTM default (--state auto = carried): the windows' tokens as --batch_size contiguous
    rows, the state carried across windows - the same NLL as one forward over each whole row,
    and (the model having context at every window start) not the fresh-window number."""
    import numpy as np

    from codistill.data import TokenData
    a, _ = two_runs
    common = ["--run_dir", str(a), "--max_tokens", 1024, "--batch_size", 3]
    carried, fresh = evaluate.main(common), evaluate.main(common + ["--state", "fresh"])
    assert carried["state_mode"] == "carried" and fresh["state_mode"] == "fresh"
    assert carried["tokens"] == 3 * (1024 // 3) and "3 contiguous rows of 341 tokens" in carried["state"]
    data = TokenData(json.loads((a / "config.json").read_text())["args"]["data"])
    toks = torch.from_numpy(np.asarray(data.tokens("val")[:3 * 341 + 1]).astype(np.int64))
    rows = torch.stack([toks[r * 341:(r + 1) * 341 + 1] for r in range(3)])
    for g in (0, 1):
        cfg, sd, _ = evaluate.load_weights(a / f"group_{g}", "final", data)
        model = evaluate.build(cfg, sd, "cpu", a)
        with torch.no_grad():
            logits = model(rows[:, :-1])  # one call over each whole row
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), rows[:, 1:].flatten(), reduction="sum")
        m = carried["groups"][f"seed1/group_{g}"]
        assert m["loss"] == pytest.approx(float(nll) / carried["tokens"], rel=1e-5)
        assert abs(m["loss"] - fresh["groups"][f"seed1/group_{g}"]["loss"]) > 1e-4


def test_evaluate_exports_match_final(two_runs):
    a, _ = two_runs
    common = ["--run_dir", str(a), "--max_tokens", 512]
    final = evaluate.main(common)
    latest = evaluate.main(common + ["--weights", "latest_export"])  # the export of the last step
    early = evaluate.main(common + ["--weights", "step_10"])
    for g in ("seed1/group_0", "seed1/group_1"):
        assert latest["groups"][g]["step"] == STEPS and early["groups"][g]["step"] == 10
        assert latest["groups"][g]["ppl"] == pytest.approx(final["groups"][g]["ppl"], rel=1e-6)
        assert early["groups"][g]["ppl"] > final["groups"][g]["ppl"]


def test_evaluate_clear_errors(two_runs, tmp_path):
    a, _ = two_runs
    with pytest.raises(evaluate.EvalError, match="does not exist"):
        evaluate.main(["--run_dir", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(evaluate.EvalError, match="no group_i"):
        evaluate.main(["--run_dir", str(tmp_path / "empty"), "--data", str(json.loads(
            (a / "config.json").read_text())["args"]["data"])])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(a, unfinished, ignore=shutil.ignore_patterns("final", "checkpoints", "tb"))
    with pytest.raises(evaluate.EvalError, match="no model.safetensors"):
        evaluate.main(["--run_dir", str(unfinished)])
    with pytest.raises(evaluate.EvalError, match="must be final, latest_export or step_N"):
        evaluate.main(["--run_dir", str(unfinished), "--weights", "best"])
    with pytest.raises(evaluate.EvalError, match="step_000011 .* missing"):
        evaluate.main(["--run_dir", str(unfinished), "--weights", "step_11"])
    # B trained with another vocabulary
    other = tmp_path / "other_vocab"
    shutil.copytree(a / "group_0" / "final", other / "group_0" / "final")
    cfg_path = other / "group_0" / "final" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vocab_size"] = 3000
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(evaluate.EvalError, match="vocab_size 3000 .* 2000 pieces"):
        evaluate.main(["--run_dir", str(a), "--compare", str(other), "--max_tokens", 64])
    # a pickle in place of the weights is refused before it is parsed
    torch.save({"x": torch.zeros(2)}, unfinished / "group_0" / "x.pt")
    (unfinished / "group_0" / "final").mkdir()
    shutil.copy(a / "group_0" / "final" / "config.json", unfinished / "group_0" / "final" / "config.json")
    shutil.move(unfinished / "group_0" / "x.pt", unfinished / "group_0" / "final" / "model.safetensors")
    with pytest.raises(evaluate.EvalError, match="pickle"):
        evaluate.main(["--run_dir", str(unfinished)])
    proc = run_python(["recipes/evaluate.py", "--run_dir", tmp_path / "nope"])
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ plot_runs.py

def test_plot_runs_png(two_runs, tmp_path):
    a, b = two_runs
    for x in ("step", "tokens"):
        out = tmp_path / f"curves_{x}.png"
        lines = plot_runs.main([str(a), str(b), "--x", x, "-o", str(out)])
        assert [name for name, _, _ in lines] == ["seed1/group_0", "seed1/group_1", "seed2/group_0", "seed2/group_1"]
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        xs = lines[0][1]
        assert xs == ([10, 20] if x == "step" else [10 * 16 * SEQ, 20 * 16 * SEQ])
        assert not list(tmp_path.glob(".*tmp*"))
    lines = plot_runs.main([str(a), "--x", "time", "--groups", "1", "--metric", "train/loss",
                            "-o", str(tmp_path / "t.png")])
    assert len(lines) == 1 and len(lines[0][1]) == STEPS and lines[0][1][0] >= 0
    proc = run_python(["recipes/plot_runs.py", a, "--metric", "val/nothing", "-o", tmp_path / "x.png"])
    assert proc.returncode == 2 and "val/nothing" in proc.stderr and not (tmp_path / "x.png").exists()
